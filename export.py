"""Export a weights folder to ONNX, one graph per expert, checked against PyTorch before it is kept.

    python export.py --onnx onnx_weights/                        # the shipped weights/, checked on demo/
    python export.py --onnx out/ --weights runs/my_weights --images val/labels.csv --overwrite
    python infer.py photos/ --weights onnx_weights/              # then score with ONNX Runtime

Each expert of --weights becomes OUT_DIR/KEY/model.onnx (float32, weights inside the file; opset --opset):
input ``images`` [batch, 3, S, S], RGB in [0, 1] (the expert's normalisation is inside the graph), outputs
``logits`` [batch, 2] and ``prob`` [batch], the fake probability; ``batch`` is dynamic. OUT_DIR/manifest.json
has the format of a PyTorch weights folder (each expert's config, file and sha256, with ``"backend": "onnx"``,
the opset and the graph's inputs and outputs), keeps the source's threshold and training record, and adds an
``export`` record (command, source, versions, parity). ``infer.py``, ``serve.py`` and the benchmarks load it
with ``--weights OUT_DIR`` (onnxruntime runs it; Grad-CAM heat maps need the PyTorch folder).

Before OUT_DIR is written, each graph is checked against PyTorch: the same images (--images: files, folders,
CSV lists or globs; default demo/) are scored by the scoring pipeline with both, and the largest difference
of each expert's fake probability and of the ensemble's is printed. Above --tolerance (default 1e-4) the
export fails (exit status 1) and nothing is written. The folder is built beside OUT_DIR and renamed into
place; an existing OUT_DIR is replaced only with --overwrite. Exit status 2: unusable options, weights or
images.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # the heavy imports happen after the options are read: --help stays instant
    import numpy as np

    from experts import Ensemble

ROOT = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = ROOT / "weights"
DEFAULT_IMAGES = ROOT / "demo"
DEFAULT_OPSET = 18  # experts.onnx_expert.DEFAULT_OPSET, without importing torch for --help
DEFAULT_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot start: the destination, the source folder or an option."""


class ParityError(RuntimeError):
    """An exported graph whose scores differ from PyTorch's by more than the tolerance."""


@dataclass
class Parity:
    """How far the exported folder's scores are from PyTorch's on ``images`` readable images: the largest
    absolute difference of each expert's fake probability (``experts``, by key) and of the ensemble's."""

    images: int
    experts: dict[str, float] = field(default_factory=dict)
    ensemble: float = 0.0
    unreadable: int = 0

    @property
    def worst(self) -> float:
        return max([self.ensemble, *self.experts.values()])

    def lines(self, tolerance: float) -> list[str]:
        width = max(len(k) for k in [*self.experts, "ensemble"])
        rows = [f"  {k:<{width}}  {v:.3g}" for k, v in self.experts.items()]
        return [f"parity with PyTorch on {self.images} images, max |difference| of the fake probability "
                f"(tolerance {tolerance:g}):", *rows, f"  {'ensemble':<{width}}  {self.ensemble:.3g}"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, metavar="OUT_DIR", help="the folder to write (one graph per expert)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), metavar="DIR",
                   help="the PyTorch weights folder to export (default: the shipped weights/)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--images", nargs="+", default=[str(DEFAULT_IMAGES)], metavar="SOURCE",
                   help="images the graphs are checked on: files, folders, CSV lists or globs (default: demo/)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest accepted |difference| of a fake probability (default: {DEFAULT_TOLERANCE:g})")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass of the check (default: 8)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch and onnxruntime CPU threads (default: 0, one per CPU not busy with other work)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_destination(weights: str | Path, out: str | Path, overwrite: bool) -> None:
    """Refuse to write over an existing folder unasked, over a file, or over the source itself."""
    weights, out = Path(weights), Path(out)
    if out.exists() and out.resolve() == weights.resolve():
        raise ExportError(f"{out}: is the source weights folder; export into another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")


def check_source(weights: str | Path) -> dict[str, Any]:
    """The source's manifest, once it is a PyTorch weights folder (an exported one cannot be exported again)."""
    from experts import read_manifest
    from experts.weights import MANIFEST

    manifest = read_manifest(weights)
    onnx = [e["key"] for e in manifest["experts"] if e.get("backend", "pytorch") != "pytorch"]
    if onnx:
        raise ExportError(f"{Path(weights) / MANIFEST}: experts {onnx} are not PyTorch experts; "
                          "export from the PyTorch weights folder")
    return manifest


def scores(ensemble: "Ensemble", paths: Sequence[str], batch_size: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Each image's expert probabilities ``[N, E]`` and ensemble probability ``[N]`` (NaN: unreadable)."""
    import numpy as np

    from scoring.pipeline import score_batches

    batches = list(score_batches(ensemble, paths, batch_size=batch_size, progress=False))
    return (np.concatenate([b.expert_probs for b in batches]), np.concatenate([b.probs for b in batches]))


def compare(reference: "Ensemble", exported: "Ensemble", paths: Sequence[str], batch_size: int = 8) -> Parity:
    """:class:`Parity` of ``exported`` against ``reference`` on the images at ``paths``, both through the
    scoring pipeline (decoding and resizing as ``infer.py`` does them)."""
    import numpy as np

    ref_experts, ref = scores(reference, paths, batch_size)
    got_experts, got = scores(exported, paths, batch_size)
    ok = ~np.isnan(ref) & ~np.isnan(got)
    if not ok.any():
        raise ExportError(f"none of the {len(paths)} images to check the graphs on could be read")
    diffs = np.abs(got_experts[ok] - ref_experts[ok]).max(axis=0)
    return Parity(images=int(ok.sum()), experts={k: float(d) for k, d in zip(reference.names, diffs)},
                  ensemble=float(np.abs(got[ok] - ref[ok]).max()), unreadable=int((~ok).sum()))


def versions() -> dict[str, str]:
    """The versions of the libraries that made the graphs."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """``manifest.json`` inside the (staging) folder, formatted as ``save_ensemble`` writes it."""
    import json

    from experts.weights import MANIFEST

    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def export_onnx(weights: str | Path, out: str | Path, images: Sequence[str] = (str(DEFAULT_IMAGES),),
                opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE, batch_size: int = 8,
                overwrite: bool = False, command: str = "", log: Callable[[str], Any] = print) -> Parity:
    """Export every expert of ``weights`` into ``out`` and check the graphs on ``images``; returns the parity.

    Raises :class:`ParityError` (and writes nothing) when a fake probability moves by more than ``tolerance``;
    :class:`ExportError`, ``WeightsError`` or ``ImageListError`` when it cannot start.
    """
    from core.files import atomic_folder
    from core.image_lists import read_image_list
    from experts import load_ensemble, scores_fingerprint
    from experts.onnx_expert import export_entry, onnx_manifest

    check_destination(weights, out, overwrite)
    source = check_source(weights)
    paths = read_image_list(list(images))["path"].tolist()
    reference = load_ensemble(weights, "cpu")
    record = {"command": command, "source": str(weights), "source_fingerprint": scores_fingerprint(source),
              "exporter": "torch.onnx.export(dynamo=True)", "opset": opset, "versions": versions()}
    with atomic_folder(out) as staging:
        entries = []
        for entry in source["experts"]:
            start = time.perf_counter()
            entries.append(export_entry(reference.experts[entry["key"]], entry, staging, opset))
            size = (staging / entries[-1]["file"]).stat().st_size / 1e6
            log(f"exported {entry['key']} ({entry.get('name')}, {entry.get('input_size')} px) in "
                f"{time.perf_counter() - start:.1f} s: {entries[-1]['file']}, {size:.1f} MB")
        write_manifest(staging, onnx_manifest(source, entries, record))  # so that the staging folder loads
        parity = compare(reference, load_ensemble(staging, "cpu"), paths, batch_size)
        for line in parity.lines(tolerance):
            log(line)
        if parity.worst > tolerance:
            raise ParityError(f"the exported graphs differ from PyTorch by {parity.worst:.3g} > tolerance "
                              f"{tolerance:g}; {out} was not written")
        for e in entries:
            e["parity"] = {"max_abs_diff_prob": parity.experts[e["key"]], "images": parity.images}
        record["parity"] = {"images": parity.images, "tolerance": tolerance,
                            "ensemble_max_abs_diff_prob": parity.ensemble}
        write_manifest(staging, onnx_manifest(source, entries, record))
    return parity


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.device import DeviceError, set_threads
    from core.image_lists import ImageListError
    from experts import WeightsError
    from experts.onnx_expert import OnnxExportError

    command = shlex.join(["python", "export.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.opset < 7 or args.tolerance < 0 or args.batch_size < 1:
            raise ExportError("--opset must be at least 7, --tolerance at least 0 and --batch-size at least 1")
        set_threads(args.threads)
        start = time.perf_counter()
        export_onnx(args.weights, args.onnx, args.images, args.opset, args.tolerance, args.batch_size,
                    args.overwrite, command)
        print(f"wrote {args.onnx} in {time.perf_counter() - start:.0f} s; score with: "
              f"python infer.py IMAGES --weights {args.onnx}")
        return 0
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ExportError, ImageListError, WeightsError, DeviceError, OnnxExportError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
