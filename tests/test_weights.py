"""The weights folder: round trip, checksums, and clear refusals."""
from __future__ import annotations

import json

import pytest
import torch

from experts import WeightsError, create_expert, load_ensemble, read_manifest, save_ensemble


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    experts = {"eff": create_expert("test_efficientnet"), "cnx": create_expert("test_convnext"),
               "clip": create_expert("test_clip")}
    for e in experts.values():
        e.eval()
    folder = save_ensemble(experts, tmp_path / "weights", dtype=torch.float32, metadata={"note": "test"})
    return experts, folder


def test_round_trip_gives_the_same_scores(saved):
    experts, folder = saved
    ensemble = load_ensemble(folder)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack([e(x)[0].softmax(-1)[:, 1] for e in experts.values()], 1)
    got = ensemble.expert_probs({64: x})
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(ensemble({64: x}), expected.mean(1), atol=1e-5)
    manifest = read_manifest(folder)
    assert manifest["note"] == "test" and [e["key"] for e in manifest["experts"]] == ["eff", "cnx", "clip"]
    assert not list(folder.rglob("*.pt*")), "no pickles in a weights folder"


def test_fp16_storage_moves_scores_by_little(tmp_path):
    expert = create_expert("test_convnext").eval()
    folder = save_ensemble({"cnx": expert}, tmp_path / "w16")
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = expert(x)[0].softmax(-1)[:, 1]
    assert torch.allclose(load_ensemble(folder)({64: x}), expected, atol=2e-3)


def test_saving_replaces_the_previous_folder_completely(saved, tmp_path):
    experts, folder = saved
    save_ensemble({"eff": experts["eff"]}, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["eff", "manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folders left behind"


def test_tampered_weights_are_refused_naming_the_file(saved):
    _, folder = saved
    path = folder / "cnx" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"cnx/model.safetensors: sha256 .* does not match"):
        load_ensemble(folder)


def test_tampered_config_is_refused(saved):
    _, folder = saved
    path = folder / "eff" / "config.json"
    path.write_text(path.read_text().replace('"drop_rate": 0.0', '"drop_rate": 0.5'))
    with pytest.raises(WeightsError, match="eff/config.json"):
        load_ensemble(folder)


def test_missing_expert_file_is_refused(saved):
    _, folder = saved
    (folder / "clip" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="clip/model.safetensors: file listed in the manifest is missing"):
        load_ensemble(folder)


def test_unknown_format_version_is_refused(saved):
    _, folder = saved
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="manifest.json: format_version 99 is not supported"):
        load_ensemble(folder)


def test_wrong_tensor_shapes_are_refused(saved, tmp_path):
    from safetensors.torch import save_file

    from experts.weights import sha256_file

    _, folder = saved
    # A weights file for a wider head, re-hashed so that only the shape check can catch it.
    other = create_expert("test_convnext")
    other.reset_head(3)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(folder / "cnx" / "model.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["experts"][1]["sha256"] = sha256_file(folder / "cnx" / "model.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match=r"cnx/model.safetensors: tensor head.(weight|bias) has shape \(3,"):
        load_ensemble(folder)


def _rewrite_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_malformed_manifests_are_refused_naming_it(saved):
    _, folder = saved
    (folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="manifest.json: not a manifest"):
        load_ensemble(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(WeightsError, match="manifest.json: not valid JSON"):
        load_ensemble(folder)


def test_paths_leading_out_of_the_folder_are_refused(saved, tmp_path):
    _, folder = saved
    (tmp_path / "elsewhere.safetensors").write_bytes((folder / "eff" / "model.safetensors").read_bytes())
    _rewrite_manifest(folder, lambda m: m["experts"][0].update(file="../elsewhere.safetensors"))
    with pytest.raises(WeightsError, match=r"manifest.json: file '../elsewhere.safetensors' lies outside"):
        load_ensemble(folder)


def test_corrupt_safetensors_with_a_matching_hash_is_refused(saved):
    from experts.weights import sha256_file

    _, folder = saved
    path = folder / "eff" / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    _rewrite_manifest(folder, lambda m: m["experts"][0].update(sha256=sha256_file(path)))
    with pytest.raises(WeightsError, match="eff/model.safetensors: not a readable safetensors file"):
        load_ensemble(folder)


def test_unknown_expert_family_is_refused(saved):
    from experts.weights import sha256_file

    _, folder = saved
    path = folder / "eff" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "family": "no_such_family"}))
    _rewrite_manifest(folder, lambda m: m["experts"][0].update(config_sha256=sha256_file(path)))
    with pytest.raises(WeightsError, match="eff/config.json: invalid expert config .*no_such_family"):
        load_ensemble(folder)


def test_every_torch_load_in_the_repo_is_weights_only():
    """torch.load without weights_only=True unpickles, i.e. runs code from the file; none may slip in."""
    import ast

    from tests.conftest import ROOT

    offenders, calls = [], 0
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("venv", "site-packages") for part in path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls > 0, "the scan found no torch.load at all; is it looking in the right place?"
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_not_a_weights_folder(tmp_path):
    with pytest.raises(WeightsError, match="no manifest"):
        load_ensemble(tmp_path)


def test_merge_runs_into_one_ensemble(tmp_path):
    from train.merge import main as merge_main

    torch.manual_seed(0)
    a = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "a", metadata={"training": {"run": "a"}})
    b = save_ensemble({"cnx": create_expert("test_convnext")}, tmp_path / "b", metadata={"training": {"run": "b"}})
    assert merge_main([str(a), str(b), "--out", str(tmp_path / "m"), "--weight", "3", "1"]) == 0
    merged = load_ensemble(tmp_path / "m")
    assert merged.names == ["eff", "cnx"] and merged.weights.tolist() == [0.75, 0.25]
    assert [r["training"]["run"] for r in read_manifest(tmp_path / "m")["merged_from"]] == ["a", "b"]
    assert merge_main([str(a), str(a), "--out", str(tmp_path / "m2")]) == 2  # the key "eff" twice
    assert merge_main([str(a), "--out", str(tmp_path / "m")]) == 2  # exists, no --overwrite


def test_merge_keeps_only_the_chosen_experts(tmp_path, capsys):
    from train.merge import main as merge_main

    torch.manual_seed(0)
    both = save_ensemble({"eff": create_expert("test_efficientnet"), "cnx": create_expert("test_convnext")},
                         tmp_path / "both")
    assert merge_main([str(both), "--keep", "cnx", "--out", str(tmp_path / "k")]) == 0
    assert load_ensemble(tmp_path / "k").names == ["cnx"]
    assert merge_main([str(both), "--keep", "clip", "--out", str(tmp_path / "k2")]) == 2
    assert "--keep ['clip']: no such expert; the folders hold ['cnx', 'eff']" in capsys.readouterr().err
