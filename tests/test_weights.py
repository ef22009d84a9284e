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
    with pytest.raises(WeightsError, match="format_version 99 is not supported"):
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
    with pytest.raises(WeightsError, match=r"tensor head.(weight|bias) has shape \(3,"):
        load_ensemble(folder)


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
