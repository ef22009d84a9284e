"""The ONNX Runtime backend: experts exported as ONNX graphs, and loaded back behind the expert interface.

An exported weights folder has the format of :mod:`experts.weights` (the same ``manifest.json``, read by the
same :func:`experts.weights.read_manifest`), with one graph per expert instead of safetensors::

    onnx_weights/
      manifest.json              each expert entry: "backend": "onnx", "opset", the graph's inputs and outputs
      clip_vit_b16_l12_lib/
        config.json              the source expert's ExpertConfig (input size, mean/std: what the pipeline reads)
        model.onnx               the whole expert, its normalisation included, weights inside

The graph's contract: input ``images``, float32 ``[batch, 3, S, S]``, RGB in [0, 1] (``S``: the expert's
``input_size``), exactly what a PyTorch expert takes, so the scoring pipeline feeds both alike; the mean and
std of the manifest are applied inside the graph. Outputs: ``logits`` ``[batch, 2]`` (index 1: fake) and
``prob`` ``[batch]``, the fake probability (softmax). ``batch`` is dynamic.

Exported with ``torch.onnx.export(dynamo=True)`` (``torch.export`` and onnxscript). The legacy TorchScript
exporter (``dynamo=False``) traces the timm CNNs and the linear-head CLIP expert but not the CLIP LIB head
of the shipped model (its region pooling computes a grid side with ``round()`` on a traced shape); the dynamo
exporter handles every family here (fake probabilities within 1e-5 of PyTorch's for the shipped model on
the demo images, 1e-7 for the tiny test experts). Graphs stay float32: onnxruntime's
dynamically quantised (INT8) matmuls give wrong results on AVX2 CPUs without VNNI, so none are offered.

Loading (:func:`load_onnx_expert`) imports onnxruntime, and only then: scoring with a PyTorch folder never
imports it. Every file is sha256-checked against the manifest before it is used, as for safetensors.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from .base import Expert, ExpertConfig
from .weights import CONFIG_FILE, MANIFEST, WeightsError, _verified, sha256_file

if TYPE_CHECKING:
    import onnxruntime

BACKEND = "onnx"
GRAPH_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "prob")
BATCH_AXIS = "batch"
DEFAULT_OPSET = 18  # what torch 2.14's dynamo exporter writes natively (lower ones go through a converter)
# A protobuf file holds at most 2 GiB: larger experts keep their tensors in an external data file beside the
# graph (hashed in the manifest too). Below this, everything is in one .onnx file, which the sha256 covers.
MAX_EMBEDDED_BYTES = int(1.8 * 2**30)
EXPORT_BATCH = 2  # the traced example's batch: 1 would let torch.export specialise the batch axis to 1


class OnnxExportError(RuntimeError):
    """An expert the exporter could not turn into a graph; the message names it and the exporter's reason."""


class ProbabilityGraph(nn.Module):
    """What is exported: an expert's logits (float32) and its fake probability, from images in [0, 1]."""

    def __init__(self, expert: Expert):
        super().__init__()
        self.expert = expert

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.expert(images)[0].float()
        return logits, logits.softmax(-1)[:, 1]


def export_expert(expert: Expert, path: str | Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Write ``expert`` (float32, eval mode) as an ONNX graph at ``path`` with a dynamic batch axis; returns
    the files written: the graph, and its external data file when the weights would not fit in one.

    The exporter's progress lines go to a buffer, not to the user's terminal.
    """
    path = Path(path)
    graph = ProbabilityGraph(expert.float().eval()).eval()
    size = expert.config.input_size
    example = torch.rand(EXPORT_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=opset, verbose=False,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                        dynamic_shapes={"images": {0: batch}})
    except Exception as e:  # noqa: BLE001  the exporter raises its own error types from several layers
        raise OnnxExportError(f"{expert.config.name}: ONNX export (opset {opset}) failed: {e}") from e
    external = tensor_bytes(expert) > MAX_EMBEDDED_BYTES
    program.save(str(path), external_data=external)
    return [path, *sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as float32: about the size of its ONNX graph."""
    return sum(t.numel() * 4 for t in [*module.parameters(), *module.buffers()])


def export_entry(expert: Expert, source_entry: Mapping[str, Any], folder: Path, opset: int) -> dict[str, Any]:
    """Export one expert into ``folder / key`` (its config and graph) and return its manifest entry.

    The entry keeps the source's fields (name, family, input size, mean/std, weight, base...) and replaces
    what describes the files: the graph, its hash, the backend and the graph's inputs and outputs.
    """
    key = source_entry["key"]
    sub = folder / key
    sub.mkdir()
    (sub / CONFIG_FILE).write_text(json.dumps(expert.config.to_dict(), indent=2) + "\n")
    files = export_expert(expert, sub / GRAPH_FILE, opset)
    size = expert.config.input_size
    entry = {k: v for k, v in source_entry.items() if k not in ("file", "sha256", "config", "config_sha256", "dtype")}
    entry.update({
        "dtype": "float32",
        "config": f"{key}/{CONFIG_FILE}",
        "config_sha256": sha256_file(sub / CONFIG_FILE),
        "file": f"{key}/{GRAPH_FILE}",
        "sha256": sha256_file(files[0]),
        "backend": BACKEND,
        "opset": opset,
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": [BATCH_AXIS, 3, size, size],
                    "layout": "NCHW, RGB in [0, 1]"}],
        "outputs": [{"name": OUTPUT_NAMES[0], "dtype": "float32", "shape": [BATCH_AXIS, 2],
                     "meaning": "logits; index 1 is fake"},
                    {"name": OUTPUT_NAMES[1], "dtype": "float32", "shape": [BATCH_AXIS],
                     "meaning": "fake probability, softmax of the logits"}],
        "normalization": "mean and std are applied inside the graph: feed RGB in [0, 1], not normalised",
    })
    if len(files) > 1:
        entry["external_data"] = [{"file": f"{key}/{p.name}", "sha256": sha256_file(p)} for p in files[1:]]
    return entry


class OnnxExpert(nn.Module):
    """An expert run by an onnxruntime ``InferenceSession``: ``forward`` as an :class:`experts.base.Expert`'s,
    ``(logits [B, 2], None)`` on the input's device, so :class:`experts.Ensemble` uses it unchanged.

    It has no parameters, features or gradients: what needs them (Grad-CAM heat maps, training) needs the
    PyTorch weights folder; :attr:`experts.Ensemble.backend` tells commands which one they hold.
    """

    backend = BACKEND

    def __init__(self, config: ExpertConfig, session: "onnxruntime.InferenceSession", path: str | Path = ""):
        super().__init__()
        self.config = config
        self.session = session
        self.path = str(path)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on (CUDA first where it was given)."""
        return self.session.get_providers()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``[B, 3, S, S]`` floats in [0, 1] (any device, any memory format) -> ``(logits [B, 2], None)``."""
        array = images.detach().float().cpu().contiguous().numpy()
        logits = self.session.run([OUTPUT_NAMES[0]], {INPUT_NAME: array})[0]
        return torch.from_numpy(logits).to(images.device), None

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.path}: an ONNX expert gives logits only; features, heads and gradients "
                           "(heat maps, training) need the PyTorch weights folder it was exported from")

    forward_head = forward_features


def providers_for(device: torch.device, available: list[str]) -> list[str]:
    """CUDA (then CPU, for what CUDA lacks) when ``device`` is a GPU and onnxruntime was built with it; else CPU."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, device: torch.device) -> "onnxruntime.InferenceSession":
    """An onnxruntime session on ``path`` with torch's current CPU thread count (``infer.py`` sets it first),
    on the GPU of ``device`` where onnxruntime has CUDA."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise WeightsError(f"{path}: an ONNX graph needs onnxruntime (pip install onnxruntime): {e}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings (node placement, unused initializers) are not ours
    providers = providers_for(device, ort.get_available_providers())
    if device.type == "cuda" and providers[0] != "CUDAExecutionProvider":
        warnings.warn(f"{path}: this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu has); the graph runs "
                      "on the CPU", stacklevel=2)
    if providers[0] == "CUDAExecutionProvider":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001  onnxruntime raises its own (pybind) error types
        raise WeightsError(f"{path}: not a readable ONNX graph ({e})") from None


def check_graph(session: "onnxruntime.InferenceSession", config: ExpertConfig, path: Path) -> None:
    """Refuse a graph whose input or outputs are not the contract's for this expert's input size."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    size = config.input_size
    shape = inputs.get(INPUT_NAME)
    if shape is None or len(shape) != 4 or list(shape[1:]) != [3, size, size]:
        raise WeightsError(f"{path}: expected input {INPUT_NAME!r} of shape [batch, 3, {size}, {size}] "
                           f"({config.name}'s input size), the graph has {inputs}")
    if OUTPUT_NAMES[0] not in outputs:
        raise WeightsError(f"{path}: the graph has no {OUTPUT_NAMES[0]!r} output (outputs: {sorted(outputs)})")


def load_onnx_expert(folder: str | Path, entry: Mapping[str, Any], device: str | torch.device = "cpu") -> OnnxExpert:
    """Open one exported expert of a weights folder once its config, graph and any external data match the
    manifest's sha256."""
    folder = Path(folder)
    config_path = _verified(folder, entry["config"], entry["config_sha256"])
    graph_path = _verified(folder, entry["file"], entry["sha256"])
    for extra in entry.get("external_data", []):
        if not isinstance(extra, Mapping) or not {"file", "sha256"} <= set(extra):
            raise WeightsError(f"{folder / MANIFEST}: expert {entry['key']!r}: external_data entries need "
                               f"\"file\" and \"sha256\", got {extra!r}")
        _verified(folder, extra["file"], extra["sha256"])
    try:
        config = ExpertConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as e:
        raise WeightsError(f"{config_path}: invalid expert config ({e})") from e
    session = open_session(graph_path, torch.device(device))
    check_graph(session, config, graph_path)
    return OnnxExpert(config, session, graph_path).eval()


def onnx_manifest(source: Mapping[str, Any], entries: list[dict[str, Any]], export: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of an exported folder: the source manifest's own records (threshold, training...) kept,
    its experts replaced by the exported ``entries``, and ``export``: how and from what they were made."""
    kept = {k: v for k, v in source.items() if k not in ("format_version", "created", "experts", "export")}
    return {
        "format_version": source["format_version"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experts": entries,
        **kept,
        "export": dict(export),
    }
