"""ONNX export (export.py) and the ONNX Runtime backend (experts/onnx_expert.py): parity with PyTorch through the
scoring pipeline, a dynamic batch axis, the manifest and its checksums, and infer.py on an exported folder."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import export
import infer
from experts import WeightsError, create_expert, load_ensemble, read_manifest, save_ensemble
from experts.onnx_expert import OnnxExpert
from scoring.pipeline import score_batches
from tests.conftest import ROOT, write_labelled_set

THRESHOLD = {"value": 0.4, "rule": "test"}
TRAINING = {"command": "made by tests/test_onnx.py"}


def tiny_experts() -> dict:
    """A timm CNN and a CLIP expert with a LIB head (the shipped model's head), both tiny and seeded."""
    torch.manual_seed(0)
    return {"eff": create_expert("test_efficientnet"), "clip": create_expert("test_clip", head="lib", lib_dim=8)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny PyTorch weights folder, its ONNX export (checked on the images), and the images with a broken one."""
    root = tmp_path_factory.mktemp("onnx")
    pytorch = save_ensemble(tiny_experts(), root / "pytorch", dtype=torch.float32,
                            metadata={"threshold": THRESHOLD, "training": TRAINING})
    write_labelled_set(root / "set", n=10, size=48)
    images = root / "set" / "images"
    export.export_onnx(pytorch, root / "onnx", images=[str(images)], command="test", log=lambda m: None)
    (images / "zz_broken.jpg").write_bytes(b"not an image")  # after the export: infer.py's runs meet it
    return {"pytorch": pytorch, "onnx": root / "onnx", "images": images, "root": root}


def scores(folder: Path, images: Path, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(str(p) for p in images.iterdir())
    batches = list(score_batches(load_ensemble(folder), paths, batch_size=batch_size, progress=False))
    return np.concatenate([b.probs for b in batches]), np.concatenate([b.expert_probs for b in batches])


def test_the_exported_folder_scores_as_pytorch_through_the_pipeline(folders):
    onnx, onnx_experts = scores(folders["onnx"], folders["images"])
    ref, ref_experts = scores(folders["pytorch"], folders["images"])
    assert np.isnan(onnx[-1]) and np.isnan(ref[-1])  # the broken image: unscored by both
    assert np.nanmax(np.abs(onnx_experts - ref_experts)) < 1e-4 and np.nanmax(np.abs(onnx - ref)) < 1e-4


def test_the_batch_axis_is_dynamic(folders):
    ensemble = load_ensemble(folders["onnx"])
    x = torch.rand(3, 3, 64, 64)
    together = ensemble.expert_probs({64: x})
    alone = torch.cat([ensemble.expert_probs({64: x[i:i + 1]}) for i in range(3)])
    assert together.shape == (3, 2) and torch.allclose(together, alone, atol=1e-6)


def test_ensemble_backend_and_its_interface(folders):
    onnx, pytorch = load_ensemble(folders["onnx"]), load_ensemble(folders["pytorch"])
    assert (onnx.backend, pytorch.backend) == ("onnx", "pytorch")
    assert onnx.names == pytorch.names == ["eff", "clip"] and onnx.input_sizes == [64]
    assert onnx.threshold == THRESHOLD["value"] and onnx.verdict(0.4) == "fake"
    expert = onnx.experts["eff"]
    assert isinstance(expert, OnnxExpert) and expert.providers == ["CPUExecutionProvider"]
    logits, features = expert(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 2) and features is None
    with pytest.raises(RuntimeError, match="eff/model.onnx: an ONNX expert gives logits only"):
        expert.forward_features(torch.rand(1, 3, 64, 64))


def test_the_manifest_describes_the_graphs_and_keeps_the_source_records(folders):
    manifest = read_manifest(folders["onnx"])
    assert manifest["threshold"] == THRESHOLD and manifest["training"] == TRAINING
    assert manifest["export"]["opset"] == 18 and manifest["export"]["parity"]["images"] == 10
    assert manifest["export"]["parity"]["ensemble_max_abs_diff_prob"] < 1e-4
    source = {e["key"]: e for e in read_manifest(folders["pytorch"])["experts"]}
    for entry in manifest["experts"]:
        key = entry["key"]
        assert entry["backend"] == "onnx" and entry["file"] == f"{key}/model.onnx" and "external_data" not in entry
        assert entry["sha256"] == export_sha256(folders["onnx"] / entry["file"])
        for field in ("name", "family", "arch", "input_size", "mean", "std", "weight", "config_sha256"):
            assert entry[field] == source[key][field], field
        assert entry["inputs"][0] == {"name": "images", "dtype": "float32", "shape": ["batch", 3, 64, 64],
                                      "layout": "NCHW, RGB in [0, 1]"}
        assert [o["name"] for o in entry["outputs"]] == ["logits", "prob"] and "inside the graph" in entry["normalization"]
        assert entry["parity"]["max_abs_diff_prob"] < 1e-4
    assert sorted(p.name for p in (folders["onnx"] / "eff").iterdir()) == ["config.json", "model.onnx"]


def export_sha256(path: Path) -> str:
    from core.files import sha256_file

    return sha256_file(path)


def test_the_graph_outputs_the_fake_probability_too(folders):
    import onnxruntime as ort

    session = ort.InferenceSession(str(folders["onnx"] / "clip" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, prob = session.run(None, {"images": np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)})
    assert prob.shape == (2,) and np.allclose(prob, torch.from_numpy(logits).softmax(-1)[:, 1].numpy(), atol=1e-6)


def test_a_tampered_graph_is_refused_naming_the_file(folders, tmp_path):
    folder = Path(shutil.copytree(folders["onnx"], tmp_path / "onnx"))
    path = folder / "clip" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"clip/model.onnx: sha256 .* does not match"):
        load_ensemble(folder)


def test_an_unknown_backend_is_refused(folders, tmp_path):
    folder = Path(shutil.copytree(folders["onnx"], tmp_path / "onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["experts"][0]["backend"] = "tensorrt"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="manifest.json: expert 'eff' has backend 'tensorrt'"):
        load_ensemble(folder)


def test_infer_on_the_exported_folder_writes_the_pytorch_submission_and_resumes(folders, tmp_path, capsys,
                                                                               monkeypatch):
    def run(weights: Path, out: Path, *extra: str) -> int:
        return infer.main([str(folders["images"]), "--weights", str(weights), "--submission", str(out), "--quiet",
                           "--batch-size", "4", "--workers", "0", "--threads", "1", "--per-expert", *extra])

    assert run(folders["pytorch"], tmp_path / "pytorch.csv") == 1  # 1: the broken image, filled with 0.5
    assert run(folders["onnx"], tmp_path / "onnx.csv") == 1
    assert "zz_broken.jpg" in capsys.readouterr().err
    ref, got = pd.read_csv(tmp_path / "pytorch.csv"), pd.read_csv(tmp_path / "onnx.csv")
    assert list(got.columns) == ["img_name", "y_pred", "eff", "clip"] and len(got) == 11
    assert (got["img_name"] == ref["img_name"]).all()
    assert np.allclose(got.drop(columns="img_name"), ref.drop(columns="img_name"), atol=1e-5, equal_nan=True)

    import scoring.pipeline

    def one_batch_then_interrupted(*args, **kwargs):
        yield next(iter(score_batches(*args, **kwargs)))
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring.pipeline, "score_batches", one_batch_then_interrupted)
    assert run(folders["onnx"], tmp_path / "resumed.csv") == 130
    assert (tmp_path / "resumed.csv.partial").exists() and not (tmp_path / "resumed.csv").exists()
    monkeypatch.undo()
    assert run(folders["onnx"], tmp_path / "resumed.csv", "--resume") == 1
    assert (tmp_path / "resumed.csv").read_bytes() == (tmp_path / "onnx.csv").read_bytes()


def test_infer_prints_verdicts_with_the_exported_threshold(folders, capsys):
    images = sorted(str(p) for p in folders["images"].glob("0*.jpg"))[:3]
    assert infer.main([*images, "--weights", str(folders["onnx"]), "--quiet", "--threads", "1"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[2] for line in lines] == images
    assert all(v == ("fake" if float(p) >= THRESHOLD["value"] else "real") for p, v, _ in lines)


def test_export_refuses_an_existing_folder_and_the_source(folders, capsys):
    out = folders["onnx"]
    before = (out / "manifest.json").read_bytes()
    assert export.main(["--onnx", str(out), "--weights", str(folders["pytorch"])]) == 2
    assert f"{out}: exists; pass --overwrite to replace it" in capsys.readouterr().err
    with pytest.raises(export.ExportError, match="is the source weights folder"):
        export.export_onnx(folders["pytorch"], folders["pytorch"], overwrite=True)
    with pytest.raises(export.ExportError, match="experts .* are not PyTorch experts"):
        export.export_onnx(out, folders["root"] / "again")
    assert (out / "manifest.json").read_bytes() == before


def one_expert_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "pytorch", dtype=torch.float32)


def test_a_failed_parity_check_writes_nothing(tmp_path, monkeypatch, capsys):
    source = one_expert_folder(tmp_path)
    write_labelled_set(tmp_path / "set", n=2, size=48)
    monkeypatch.setattr(export, "compare", lambda *a, **k: export.Parity(2, {"eff": 0.2}, 0.2))
    rc = export.main(["--onnx", str(tmp_path / "out"), "--weights", str(source), "--images",
                      str(tmp_path / "set" / "images"), "--threads", "1"])
    assert rc == 1
    out, err = capsys.readouterr()
    assert re.search(r"eff +0.2\n", out) and "differ from PyTorch by 0.2 > tolerance 0.0001" in err and "was not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch", "set"]  # no OUT_DIR, no staging folder


def test_large_experts_keep_their_tensors_beside_the_graph_hashed_too(tmp_path, monkeypatch):
    """Over 2 GiB a graph cannot hold its weights; faked here by lowering the limit to 0."""
    from experts import onnx_expert

    monkeypatch.setattr(onnx_expert, "MAX_EMBEDDED_BYTES", 0)
    source = one_expert_folder(tmp_path)
    write_labelled_set(tmp_path / "set", n=2, size=48)
    export.export_onnx(source, tmp_path / "onnx", images=[str(tmp_path / "set" / "images")], log=lambda m: None)
    entry = read_manifest(tmp_path / "onnx")["experts"][0]
    assert [e["file"] for e in entry["external_data"]] == ["eff/model.onnx.data"]
    data = tmp_path / "onnx" / "eff" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(WeightsError, match=r"eff/model.onnx.data: sha256 .* does not match"):
        load_ensemble(tmp_path / "onnx")


def test_loading_a_pytorch_folder_never_imports_onnxruntime(folders):
    code = (f"import sys, torch\nfrom experts import load_ensemble\n"
            f"load_ensemble({str(folders['pytorch'])!r})({{64: torch.rand(1, 3, 64, 64)}})\n"
            "print('onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_speed_bench_measures_pytorch_and_onnx_runtime_side_by_side(folders, capsys):
    from bench import infer_speed
    from tests.test_bench_infer_speed import markdown_tables

    rc = infer_speed.main(["--weights", str(folders["pytorch"]), "--onnx", str(folders["onnx"]), "--image-dir",
                           str(folders["images"]), "--images", "3", "--batch-sizes", "3", "--no-original",
                           "--no-per-expert", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    runs = markdown_tables(out)[0][2:]
    assert [r[:4] for r in runs] == [["default", "2", "64", "3"], ["onnx", "2", "64", "3"]]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in runs)
    assert "onnx: " in out and "ONNX Runtime, 1 CPU thread" in out and "PyTorch, 1 CPU thread" in out
    assert "onnx vs default (fastest run of each: batch 3 vs batch 3): " in out


def test_heat_maps_are_refused_for_onnx_experts(folders):
    from scoring.heatmaps import expert_heatmaps

    with pytest.raises(ValueError, match="heat maps need the experts' gradients, which onnx experts do not give"):
        expert_heatmaps(load_ensemble(folders["onnx"]), np.zeros((64, 64, 3), np.uint8))


def test_providers_follow_the_device():
    from experts.onnx_expert import DEFAULT_OPSET, providers_for

    cpu_only, with_cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for(torch.device("cpu"), with_cuda) == cpu_only
    assert providers_for(torch.device("cuda:1"), with_cuda) == with_cuda
    assert providers_for(torch.device("cuda"), cpu_only) == cpu_only
    assert export.DEFAULT_OPSET == DEFAULT_OPSET  # export.py's copy, for an instant --help


def test_infer_refuses_heatmaps_of_onnx_weights_before_scoring(folders, tmp_path, capsys):
    status = infer.main([str(folders["images"]), "--weights", str(folders["onnx"]), "--heatmap", str(tmp_path / "maps")])
    assert status == 2
    assert "--heatmap needs the experts' gradients" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


def test_the_service_scores_onnx_weights_and_refuses_their_heatmaps(folders):
    from fastapi.testclient import TestClient

    from service.app import create_app

    image = next(p for p in sorted(folders["images"].iterdir()) if p.suffix == ".jpg" and "broken" not in p.name)
    app = create_app(folders["onnx"], threads=1)
    with TestClient(app) as client:
        assert app.state.service.wait_ready(60), app.state.service.load_error
        assert client.get("/health").json()["features"]["heatmap"] is False
        files = {"file": (image.name, image.read_bytes(), "image/jpeg")}
        scored = client.post("/v1/score", files=files)
        refused = client.post("/v1/score?heatmap=1", files=files)
    ensemble = load_ensemble(folders["pytorch"])
    reference = next(score_batches(ensemble, [str(image)], progress=False)).probs[0]
    assert scored.status_code == 200 and abs(scored.json()["prob"] - reference) < 1e-4
    assert refused.status_code == 501 and "holds ONNX graphs" in refused.json()["error"]
