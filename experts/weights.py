"""The weights folder format: one ``manifest.json`` plus one sub-folder per expert.

::

    weights/
      manifest.json                  format version, experts, sha256 of every file, training record
      efficientnet_lite0/
        config.json                  ExpertConfig (rebuilds the network offline)
        model.safetensors            the expert's EMA weights

Like ``save_pretrained``/``from_pretrained``, but for an ensemble. Only JSON and safetensors are ever
read, and every file is checked against the sha256 in the manifest before it is used.

The manifest may also record the decision threshold chosen on validation data (``evaluation/threshold.py``
writes it with :func:`set_threshold`)::

    "threshold": {"value": 0.62, "rule": "balanced", "target_fpr": null, "set": "...", "n": 1753, ...}

A folder without one gets 0.5.

``export.py`` writes the same format with ONNX graphs (``KEY/model.onnx``, ``"backend": "onnx"`` in each
expert entry; :mod:`experts.onnx_expert`); :func:`load_ensemble` loads either kind into an :class:`Ensemble`.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import Expert, ExpertConfig
from core.files import atomic_folder, atomic_write, sha256_file

from .base_weights import BASE_WEIGHTS, BaseWeightsError
from .ensemble import DEFAULT_THRESHOLD, Ensemble, check_threshold
from .registry import build_from_config

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
THRESHOLD = "threshold"  # the manifest's top-level entry for the decision threshold
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BACKENDS = ("pytorch", "onnx")  # an expert entry's "backend": what runs it (absent: pytorch)


class WeightsError(ValueError):
    """A weights folder that cannot be trusted or used: the message names the file and the problem."""


def save_ensemble(
    experts: Mapping[str, Expert],
    folder: str | Path,
    *,
    weights: Mapping[str, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    expert_metadata: Mapping[str, Mapping[str, Any]] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write experts (keyed by a unique name) as a weights folder, atomically.

    The folder is built beside the target and renamed into place, so a crash mid-save leaves the previous
    weights intact. Floating-point tensors are stored as ``dtype`` (fp16 halves the size; the scores
    move by about 1e-4) and cast back to float32 when loaded.
    """
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        _write_folder(staging, experts, weights, metadata, expert_metadata, dtype)
    return folder


def _write_folder(staging: Path, experts: Mapping[str, Expert], weights: Mapping[str, float] | None,
                  metadata: Mapping[str, Any] | None, expert_metadata: Mapping[str, Mapping[str, Any]] | None,
                  dtype: torch.dtype) -> None:
    entries = []
    for key, expert in experts.items():
        sub = staging / key
        sub.mkdir()
        (sub / CONFIG_FILE).write_text(json.dumps(expert.config.to_dict(), indent=2) + "\n")
        tensors = {
            k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in changed_state_dict(expert).items()
        }
        save_file(tensors, str(sub / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = expert.config
        base = {"base": cfg.base, "base_sha256": BASE_WEIGHTS[cfg.base].sha256} if cfg.base else {}
        entries.append({
            "key": key,
            "name": cfg.name,
            "family": cfg.family,
            "arch": cfg.arch,
            "input_size": cfg.input_size,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "weight": float((weights or {}).get(key, 1.0)),
            "dtype": str(dtype).replace("torch.", ""),
            "config": f"{key}/{CONFIG_FILE}",
            "config_sha256": sha256_file(sub / CONFIG_FILE),
            "file": f"{key}/{WEIGHTS_FILE}",
            "sha256": sha256_file(sub / WEIGHTS_FILE),
            **base,
            **dict((expert_metadata or {}).get(key, {})),
        })
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experts": entries,
        **dict(metadata or {}),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def changed_state_dict(expert: Expert) -> dict[str, torch.Tensor]:
    """The tensors a saved expert must store: all of them, or for an expert on offline base weights
    (``config.base``) only those that differ from the base (its head, tuned LayerNorms...).

    The base (hundreds of MB for a CLIP tower) is then fetched once per machine, sha256-checked, rather
    than copied into every weights folder: a shipped CLIP expert is a few MB.
    """
    state = expert.state_dict()
    if not expert.config.base:
        return state
    reference = build_from_config(ExpertConfig.from_dict(expert.config.to_dict())).state_dict()
    return {k: v for k, v in state.items()
            if k not in reference or v.shape != reference[k].shape or not torch.equal(v.cpu(), reference[k])}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Parse and check a manifest; refuses unknown format versions and missing or malformed fields."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"{path}: no manifest; is {folder} a weights folder written by save_ensemble?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from e
    if not isinstance(manifest, dict):
        raise WeightsError(f"{path}: not a manifest (a JSON {type(manifest).__name__}, not an object)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(f"{path}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    if not manifest.get("experts") or not isinstance(manifest["experts"], list):
        raise WeightsError(f"{path}: lists no experts")
    for i, entry in enumerate(manifest["experts"]):
        if not isinstance(entry, dict):
            raise WeightsError(f"{path}: expert #{i} is not an object")
        missing = {"key", "file", "sha256", "config", "config_sha256"} - set(entry)
        if missing:
            raise WeightsError(f"{path}: expert #{i} lacks {sorted(missing)}")
    return manifest


def _verified(folder: Path, relative: str, expected_sha256: str) -> Path:
    """``folder / relative`` once its sha256 matches; a path leading out of the folder is refused."""
    path = folder / str(relative)
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise WeightsError(f"{folder / MANIFEST}: file {relative!r} lies outside the weights folder")
    if not path.is_file():
        raise WeightsError(f"{path}: file listed in the manifest is missing")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise WeightsError(
            f"{path}: sha256 {actual} does not match the manifest ({expected_sha256}); "
            "the file is corrupt or was changed, refusing to load it"
        )
    return path


def scores_fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short id of what the scores depend on: each expert's file hash and weight, not the threshold.

    ``infer.py --resume`` compares it, so re-choosing the threshold does not void a half-scored submission.
    """
    parts = [(e["key"], e["sha256"], e.get("config_sha256"), float(e.get("weight", 1.0))) for e in manifest["experts"]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def load_expert(folder: str | Path, entry: Mapping[str, Any]) -> Expert:
    """Rebuild one expert of a weights folder from its verified config and weights (float32, eval mode)."""
    folder = Path(folder)
    config_path = _verified(folder, entry["config"], entry["config_sha256"])
    weights_path = _verified(folder, entry["file"], entry["sha256"])
    try:
        config = ExpertConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        _check_base(folder, entry, config)
        expert = build_from_config(config, pretrained=False)
    except BaseWeightsError as e:
        raise WeightsError(f"{config_path}: the expert's base weights are unavailable: {e}") from e
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON, fields, unknown family
        raise WeightsError(f"{config_path}: invalid expert config ({e})") from e
    try:
        loaded = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001  safetensors raises its own error type on a malformed file
        raise WeightsError(f"{weights_path}: not a readable safetensors file ({e})") from e
    state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}
    expected = expert.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if config.base:  # the rest came from the base weights, which build_from_config has loaded
        missing = []
    if missing or unexpected:
        raise WeightsError(f"{weights_path}: does not fit {config.name}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise WeightsError(f"{weights_path}: tensor {k} has shape {tuple(v.shape)}, "
                               f"{config.name} needs {tuple(expected[k].shape)}")
    expert.load_state_dict(state, strict=not config.base)
    return expert.eval()


def _check_base(folder: Path, entry: Mapping[str, Any], config: ExpertConfig) -> None:
    """An expert saved on base weights loads only over the very base it was trained on."""
    if not config.base:
        return
    if config.base not in BASE_WEIGHTS:
        raise WeightsError(f"{folder / entry['config']}: unknown base weights {config.base!r}; "
                           f"this code knows {sorted(BASE_WEIGHTS)}")
    pinned = BASE_WEIGHTS[config.base].sha256
    if entry.get("base_sha256") != pinned:
        raise WeightsError(f"{folder / MANIFEST}: expert {entry['key']!r} was trained on base {config.base!r} "
                           f"with sha256 {entry.get('base_sha256')}, but this code pins {pinned}")


def manifest_threshold(manifest: Mapping[str, Any], path: str | Path) -> float:
    """The decision threshold a manifest records, 0.5 when it records none (folders older than thresholds).

    ``path`` (the manifest file) names the culprit in the error for a malformed entry.
    """
    if THRESHOLD not in manifest:
        return DEFAULT_THRESHOLD
    return _threshold_value(manifest[THRESHOLD], path)


def _threshold_value(entry: Any, path: str | Path) -> float:
    if not isinstance(entry, Mapping) or "value" not in entry:
        raise WeightsError(f"{path}: \"{THRESHOLD}\" must be an object with a \"value\", got {entry!r}")
    try:
        return check_threshold(entry["value"])
    except ValueError as e:
        raise WeightsError(f"{path}: \"{THRESHOLD}\": {e}") from None


def set_threshold(folder: str | Path, threshold: Mapping[str, Any]) -> None:
    """Record ``threshold`` (a dict with at least ``value``) as the manifest's ``"threshold"`` entry.

    Only the manifest changes, and every other entry is kept as it was: the sha256 entries cover the
    experts' files, not the manifest, so the folder loads as before. The new manifest is written beside the
    old one and renamed over it, so a crash leaves either the old or the new one, never half a file.
    """
    path = Path(folder) / MANIFEST
    manifest = read_manifest(folder)
    _threshold_value(threshold, path)  # refuse before writing anything
    manifest[THRESHOLD] = dict(threshold)
    atomic_write(path, json.dumps(manifest, indent=2) + "\n")  # as save_ensemble writes it


def load_ensemble(folder: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load a weights folder as an :class:`Ensemble` ready for inference, with its recorded threshold.

    Each expert entry's ``backend`` says what runs it: ``"pytorch"`` (the default: config plus safetensors) or
    ``"onnx"`` (a graph exported by ``export.py``, run by onnxruntime on ``device``; :mod:`experts.onnx_expert`).
    """
    manifest = read_manifest(folder)
    threshold = manifest_threshold(manifest, Path(folder) / MANIFEST)  # before the (slow) expert loads
    experts = {e["key"]: load_backend_expert(folder, e, device) for e in manifest["experts"]}
    weights = {e["key"]: float(e.get("weight", 1.0)) for e in manifest["experts"]}
    ensemble = Ensemble(experts, weights, threshold=threshold)
    return ensemble.to(device, memory_format=torch.channels_last).eval()


def load_backend_expert(folder: str | Path, entry: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """One expert of a weights folder, by its entry's ``backend``: :func:`load_expert` for PyTorch, or an
    onnxruntime session (imported only here, only for an ONNX entry) behind the same interface."""
    backend = entry.get("backend", "pytorch")
    if backend == "pytorch":
        return load_expert(folder, entry)
    if backend == "onnx":
        from .onnx_expert import load_onnx_expert

        return load_onnx_expert(folder, entry, device)
    raise WeightsError(f"{Path(folder) / MANIFEST}: expert {entry['key']!r} has backend {backend!r}; "
                       f"this code reads {', '.join(BACKENDS)}")
