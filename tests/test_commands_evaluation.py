"""The evaluation commands as commands: instant ``--help`` from anywhere, honest help texts, one protocol,
typed errors below ``main()``, no tqdm of their own."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT

EVALUATION = ROOT / "evaluation"
COMMANDS = ["validate.py", "threshold.py", "ensembles.py", "submission.py", "with_clip.py", "heldout.py"]
WITH_DEVICE = ["validate.py", "threshold.py", "ensembles.py", "with_clip.py"]
HEAVY = ("torch", "sklearn", "pandas", "matplotlib", "transformers", "timm", "experts", "scoring.pipeline", "train")

HELP = """
import runpy, sys
p = sys.argv[1]
sys.argv = [p, "--help"]
code = 0
try:
    runpy.run_path(p, run_name="__main__")
except SystemExit as e:
    code = e.code
print("RESULT", code, ",".join(m for m in {heavy!r} if m in sys.modules) or "-")
""".format(heavy=HEAVY)


def run_help(command: str, cwd) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", HELP, str(EVALUATION / command)], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip(), result.stderr[-2000:]
    *text, last = result.stdout.strip().splitlines()
    return "\n".join(text), last


def option_blocks(text: str) -> dict[str, str]:
    """Option -> its help text (continuation lines joined), from an argparse help screen."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+|\w+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_from_anywhere_without_heavy_imports(command, where, tmp_path):
    text, last = run_help(command, ROOT if where == "repo root" else tmp_path)
    assert last == "RESULT 0 -", f"{command} --help: {last}"
    assert text.startswith("usage:")
    blocks = option_blocks(text)
    assert "-h," in blocks or "-h" in blocks
    for option, block in blocks.items():
        assert "(default: None)" not in block, block
        assert block.count("default") <= 1, f"{command} {option}: default given twice: {block}"


@pytest.mark.parametrize("command", WITH_DEVICE)
def test_device_defaults_to_auto(command, tmp_path):
    text, _ = run_help(command, tmp_path)
    assert "(default: auto" in option_blocks(text)["--device"]


def test_required_options_show_no_default(tmp_path):
    text, _ = run_help("with_clip.py", tmp_path)
    blocks = option_blocks(text)
    for required in ("--cache", "--splits", "--test-clusters"):
        assert "default" not in blocks[required], blocks[required]


def test_help_tells_what_is_written_into_weights_folders(tmp_path):
    threshold = option_blocks(run_help("threshold.py", tmp_path)[0])
    assert "--write" in threshold and "nothing is written" in threshold["--write"]
    assert "--dry-run" not in threshold  # printing only is the default now
    with_clip = option_blocks(run_help("with_clip.py", tmp_path)[0])
    assert "without this option nothing is written" in with_clip["--threshold-into"]
    assert "only read" in with_clip["--weights"]
    submission = option_blocks(run_help("submission.py", tmp_path)[0])
    assert "threshold" in submission["--weights"] and "--threshold" in submission


# ------------------------------------------------------------------------------------------ the source
def sources() -> list:
    return sorted(EVALUATION.glob("*.py"))


def test_protocol_settings_are_not_repeated_as_literals():
    """75, 0.2 and 0.05 (the validation JPEG quality, val fraction and threshold FPR) live in core.protocol."""
    from core import protocol

    values = {protocol.VALIDATION_JPEG_QUALITY, protocol.VAL_FRACTION, protocol.THRESHOLD_FPR}
    found = [f"{path.name}:{node.lineno} {node.value!r}" for path in sources()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in values]
    assert not found


def test_no_tqdm_no_system_exit_no_namespace_outside_main():
    problems = []
    for path in sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] == "tqdm" for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports tqdm (use core.progress)")
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    problems.append(f"{path.name}:{node.lineno} raises SystemExit (return an exit code)")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "main":
                for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                    annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                    if arg.arg == "args" or "Namespace" in annotation:
                        problems.append(f"{path.name}:{node.lineno} {node.name}({arg.arg}) takes the parsed options")
    assert not problems, "\n".join(problems)


def test_heldout_lists_the_clusters_of_a_splits_file(tmp_path, labelled_csv, capsys):
    from evaluation import heldout

    df = pd.read_csv(labelled_csv)
    df["path"] = [str(labelled_csv.parent / n) for n in df["img_name"]]
    df["labels_csv"] = str(labelled_csv)
    df["cluster"] = [i % 2 for i in range(len(df))]
    df.to_csv(tmp_path / "splits.csv", index=False)
    assert heldout.main([str(tmp_path / "splits.csv")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["cluster_0 (set): 8 images, 0 fake", "cluster_1 (set): 8 images, 8 fake"]
    assert heldout.main([str(tmp_path / "splits.csv"), "--clusters", "4"]) == 2
    assert "clusters [4] are not in" in capsys.readouterr().err
    with pytest.raises(heldout.EvaluationSetError):
        heldout.cluster_sets(tmp_path / "splits.csv", [4])


def test_with_clip_writes_a_threshold_only_where_told(tiny_base, tmp_path, capsys):
    """with_clip.py end to end on a tiny cache: it reads --weights and writes only into --threshold-into."""
    import shutil

    import torch

    from evaluation import with_clip
    from experts import create_expert, read_manifest, save_ensemble
    from tests.conftest import TINY_BASE, write_labelled_set
    from train.token_cache import build_cache

    sets = [write_labelled_set(tmp_path / "a", n=24, seed=1), write_labelled_set(tmp_path / "b", n=12, seed=2)]
    cache = build_cache(sets, tmp_path / "tokens", expert_name="test_clip", pretrained=TINY_BASE, input_size=64,
                        batch_size=8, workers=0, shard_size=16, progress=False)
    df = pd.read_csv(sets[0])
    df["path"] = [str(sets[0].parent / n) for n in df["img_name"]]
    df["cluster"] = [i % 3 for i in range(len(df))]
    df.to_csv(tmp_path / "splits.csv", index=False)
    torch.manual_seed(0)
    training = {"validation_sets": {"fold_0": ["eff"], "fold_1": ["eff"]}, "test_sets": ["cluster_2"]}
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w",
                            metadata={"training": training})
    before = (weights / "manifest.json").read_bytes()
    common = ["--weights", str(weights), "--cache", str(cache), "--splits", str(tmp_path / "splits.csv"),
              "--val-clusters", "0", "1", "--val-sets", "b", "--test-clusters", "2", "--layers", "2",
              "--fpr", "0.5", "--workers", "0", "--device", "cpu"]
    assert with_clip.main(common) == 0
    out = capsys.readouterr().out
    assert "-> chosen:" in out and "not written anywhere" in out and "test (report only) cluster 2" in out
    assert (weights / "manifest.json").read_bytes() == before
    into = tmp_path / "head"
    shutil.copytree(weights, into)
    assert with_clip.main([*common, "--threshold-into", str(into)]) == 0
    assert f"wrote the threshold into {into / 'manifest.json'}" in capsys.readouterr().out
    entry = read_manifest(into)["threshold"]
    assert entry["target_fpr"] == 0.5 and entry["command"].startswith("python evaluation/with_clip.py --weights")
    assert (weights / "manifest.json").read_bytes() == before
