"""Inference speed and peak memory of the default ensemble against the original solution's, on the same images,
and what each expert's forward pass costs.

    python bench/infer_speed.py                          # CPU: default weights at batch 1 and 32, original at 4
    python bench/infer_speed.py --no-original --batch-sizes 1 8 64 --device cuda --images 512
    python bench/infer_speed.py --images 4 --original-images 1 --batch-sizes 1 --original-batch-size 1 --threads 1
    python bench/infer_speed.py --onnx onnx_weights/ --no-original --threads 1   # PyTorch vs ONNX Runtime

Two models are measured, each described by a :class:`ModelSpec`:

* **default**: a weights folder (``weights/``, or ``--weights``), loaded as ``infer.py`` loads it.
* **onnx** (with ``--onnx DIR``): the same experts exported by ``export.py``, run by ONNX Runtime (loaded by
  the same ``load_ensemble``, scored by the same pipeline; onnxruntime's intra-op threads are torch's, set by
  ``--threads``), at the default's batch sizes on the default's images. A line compares it with the default.
* **original**: the original competition solution's 7 timm experts, 2x ConvNeXtV2-tiny, 2x EfficientNet-B4,
  2x EfficientNet-B5 and 1x EfficientNet-B6, all at 512x512 input. Their list is read from
  ``train/configs/original.yaml`` (one source of truth with the training recipe), keeping the registry
  overrides of each entry and dropping what only matters to training (``pretrained``, ``fold``, ``weight``,
  ``lr_scale``). That config also holds a CLIP ViT-L/14 expert with a LIB head, a later addition of this
  project and no part of the 7-expert solution being compared, so only the timm families (ConvNeXt and
  EfficientNet) are kept. The experts are built with **random weights** (``pretrained=False``): speed and
  memory depend on the architecture and input size, not on the weights' values, and nothing is downloaded.

Every (model, batch size) runs in a fresh spawned process, so that its peak resident memory (``ru_maxrss``,
which only ever grows within a process) and its peak GPU memory are that run's alone, not the largest model
measured so far. The timing covers the whole scoring path of ``infer.py`` (``scoring.pipeline.score_images``:
decoding, resizing and the ensemble's forward pass), after one warm-up batch, on real images from
``../shared/data`` when present (else the ``demo/`` images, repeated), or ``--image-dir``. Both models score the
same image list; the original, about 0.2 images/s on a 2-core CPU, scores only its first ``--original-images``.

**Per expert**: in the same process, after the ensemble's timed run (and after its peak memory is read), the
same images are decoded and resized again into the same batches, and on each batch every expert's forward pass
is timed alone (``Ensemble.expert_probs`` of a one-expert ensemble: the channels-last copy, the expert, the
softmax; on CUDA synchronised before and after), so decoding and resizing are not in it. The second table
gives each expert's images/s, its milliseconds per image and its share of the experts' summed forward time,
and (for two experts or more) a row "all N experts" with the sum: set against the ensemble's end-to-end images/s of the first table, the
difference is what decoding and resizing cost. ``--no-per-expert`` skips this pass.

The ratio line compares the fastest run of each model (the batch sizes it used are named in the line).
On a CPU shared with other work (a training job), pass ``--threads 1``: torch's OpenMP threads, one per core
by default, then wait on each other and can make a small model tens of times slower than it is.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_module
import resource
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]

ORIGINAL_CONFIG = ROOT / "train" / "configs" / "original.yaml"
# The original solution's experts are timm backbones; anything else in the config (CLIP) is not part of it.
ORIGINAL_FAMILIES = ("convnext", "efficientnet")
ORIGINAL_INPUT_SIZE = 512
# Keys of a training config's expert entry that do not change the network (see train/joint.py build_experts).
TRAINING_ONLY_KEYS = ("pretrained", "fold", "weight", "lr_scale")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert to build with random weights: registry ``name``, ensemble ``key``, ExpertConfig overrides."""

    name: str
    key: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self):
        from experts import create_expert

        return create_expert(self.name, pretrained=False, **self.overrides)


@dataclass(frozen=True)
class ModelSpec:
    """What to measure: a weights folder (``weights``) or experts built at random (``experts``), never both.

    A spec, not a model, crosses to the measuring process: it is small to pickle, and the model's memory is
    then allocated in the process whose peak is measured.
    """

    label: str
    weights: str | None = None
    experts: tuple[ExpertSpec, ...] = ()
    origin: str = ""  # where ``experts`` were read from, for the report

    def __post_init__(self) -> None:
        if (self.weights is None) == (not self.experts):
            raise ValueError(f"{self.label}: give either a weights folder or a list of experts")

    def build(self, device: str):
        """The :class:`experts.Ensemble`, on ``device``, channels-last and in eval mode as ``load_ensemble`` gives."""
        import torch

        from experts import Ensemble, load_ensemble

        if self.weights is not None:
            return load_ensemble(self.weights, device)
        torch.manual_seed(0)
        keys = [e.key for e in self.experts]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.label}: expert keys must be unique, got {keys}")
        ensemble = Ensemble({e.key: e.build() for e in self.experts})
        return ensemble.to(device, memory_format=torch.channels_last).eval()

    def source(self) -> str:
        if self.weights is not None:
            return self.weights
        return f"random weights, experts from {self.origin}" if self.origin else "random weights"


def original_spec(config: str | Path = ORIGINAL_CONFIG, label: str = "original") -> ModelSpec:
    """The original solution's timm experts from a training config, at 512 px, to build with random weights.

    Each entry's family is read from the expert itself, built on the ``meta`` device (no memory, about a
    second for all): the registry, not a name pattern, says which experts are timm ConvNeXt/EfficientNet.
    The input size is set to 512 whatever the registry's default, since that is the configuration compared.
    """
    import torch
    import yaml

    from experts import create_expert

    entries = yaml.safe_load(Path(config).read_text())["experts"]
    specs = []
    for entry in entries:
        entry = dict(entry)
        name = entry.pop("name")
        key = entry.pop("key", name)
        for training_only in TRAINING_ONLY_KEYS:
            entry.pop(training_only, None)
        with torch.device("meta"):
            family = create_expert(name, pretrained=False, **entry).config.family
        if family in ORIGINAL_FAMILIES:
            specs.append(ExpertSpec(name, key, {**entry, "input_size": ORIGINAL_INPUT_SIZE}))
    if not specs:
        raise ValueError(f"{config}: no {'/'.join(ORIGINAL_FAMILIES)} experts")
    return ModelSpec(label, experts=tuple(specs), origin=f"{config} ({'/'.join(ORIGINAL_FAMILIES)} only)")


@dataclass
class ExpertTiming:
    """One expert's forward pass alone, on the batches of a run: ``images`` scored in ``seconds``."""

    key: str
    name: str
    input_size: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Result:
    """One measured run: a model at one batch size (``per_expert``: its experts timed alone, if asked)."""

    label: str
    source: str
    experts: list[str]
    input_sizes: list[int]
    batch_size: int
    images: int
    images_per_s: float
    peak_rss_mib: float
    peak_gpu_mib: float | None
    threads: int = 0
    workers: int = 0
    per_expert: list[ExpertTiming] = field(default_factory=list)
    backend: str = "pytorch"  # Ensemble.backend: "onnx" for an export.py folder (onnxruntime, as many threads)


def sample_images(n: int, folder: str | Path | None = None) -> list[str]:
    """``n`` image paths from ``folder`` (default: the shared DFDC faces, else ``demo/``), repeated if needed."""
    from core.image_lists import read_image_list

    if folder is None:
        shared = ROOT.parent / "shared" / "data" / "dfdc_faces" / "images"
        folder = shared if shared.is_dir() else ROOT / "demo"
    pool = read_image_list(folder)["path"].tolist()  # ImageListError (a ValueError) names an empty folder
    return [str(pool[i % len(pool)]) for i in range(n)]


def time_experts(ensemble, paths: Sequence[str], batch_size: int, device: str) -> list[ExpertTiming]:
    """Each expert of ``ensemble`` timed alone on the batches ``score_images`` makes of ``paths``.

    The batches are built as ``scoring.pipeline.score_batches`` builds them (the same dataset, transform per
    input size and loader, unreadable images dropped), one at a time so that memory stays flat; each batch is
    moved to ``device`` once, untimed, then every expert's forward pass runs on it under its own clock, through
    ``Ensemble.expert_probs`` of a one-expert ensemble: the code path, autocast included, of the ensemble's
    run. Call it after a warm-up (the ensemble's run is one): the first batch would otherwise pay for it.
    """
    import torch
    from torch.utils.data import DataLoader

    from core.dataset import ImageDataset
    from core.transforms import eval_transform
    from experts import Ensemble

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    singles = {key: Ensemble({key: expert}) for key, expert in ensemble.experts.items()}
    seconds = dict.fromkeys(singles, 0.0)
    dataset = ImageDataset(list(paths), {s: eval_transform(s) for s in ensemble.input_sizes})
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0, pin_memory=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    images_done = 0
    for batch in loader:
        ok = torch.tensor([not e for e in batch["error"]])
        if not ok.any():
            continue
        images = {s: t[ok].to(device) for s, t in batch["images"].items()}
        images_done += int(ok.sum())
        for key, single in singles.items():
            sync()
            start = time.perf_counter()
            with autocast:
                single.expert_probs(images)
            sync()
            seconds[key] += time.perf_counter() - start
    return [ExpertTiming(key, expert.config.name, expert.config.input_size, images_done, seconds[key])
            for key, expert in ensemble.experts.items()]


def measure(spec: ModelSpec, paths: Sequence[str], batch_size: int, device: str, queue: mp.Queue,
            threads: int | None = None, per_expert: bool = True, workers: int = 0) -> None:
    """Build ``spec``, score ``paths`` once (after a warm-up batch) and put a :class:`Result` on ``queue``.

    Runs in a process of its own (see :func:`run_spec`); any exception goes on the queue as text instead.
    ``threads`` sets torch's CPU threads (default: torch's own choice, one per core), ``workers`` the
    image-decoding processes, as ``infer.py`` does. ``per_expert`` then times each expert alone on the same
    batches (:func:`time_experts`), after the peak memory is read.
    """
    try:
        import torch

        from scoring.pipeline import score_images

        if threads:
            torch.set_num_threads(threads)

        cuda = device.startswith("cuda")
        ensemble = spec.build(device)
        # One warm-up batch: allocator, oneDNN/cuDNN kernel choices and lazy imports are paid before the clock.
        list(score_images(ensemble, paths[:batch_size], batch_size=batch_size, workers=workers, device=device,
                          progress=False))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        scores = list(score_images(ensemble, paths, batch_size=batch_size, workers=workers, device=device,
                                   progress=False))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result = Result(
            label=spec.label, source=spec.source(),
            experts=[e.config.name for e in ensemble.experts.values()], input_sizes=ensemble.input_sizes,
            batch_size=batch_size, images=len(scores), images_per_s=len(scores) / seconds,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            threads=torch.get_num_threads(), workers=workers, backend=ensemble.backend,
        )
        if per_expert:  # after the peaks are read: this pass must not count in the ensemble's memory
            result.per_expert = time_experts(ensemble, paths, batch_size, device)
        queue.put(result)
    except BaseException:  # noqa: BLE001  (reported by the parent, which would otherwise wait forever)
        queue.put(traceback.format_exc())


def run_spec(spec: ModelSpec, paths: Sequence[str], batch_size: int, device: str,
             threads: int | None = None, per_expert: bool = True, workers: int = 0) -> Result:
    """:func:`measure` in a fresh spawned process, so its peak memory is its own; errors are re-raised here."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(spec, list(paths), batch_size, device, queue, threads, per_expert,
                                                  workers))
    proc.start()
    try:
        while True:
            try:
                outcome = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive() and queue.empty():
                    raise RuntimeError(f"{spec.label} at batch {batch_size}: the measuring process died "
                                       f"(exit code {proc.exitcode}; killed for memory?)") from None
    finally:
        proc.join()
    if isinstance(outcome, str):
        raise RuntimeError(f"{spec.label} at batch {batch_size} failed in the measuring process:\n{outcome}")
    return outcome


def run_benchmark(plan: Sequence[tuple[ModelSpec, Sequence[int], Sequence[str]]], device: str,
                  threads: int | None = None, log=print, per_expert: bool = True) -> list[Result]:
    """Measure each (spec, batch sizes, image paths) of ``plan``; one spawned process per batch size."""
    results = []
    for spec, batch_sizes, paths in plan:
        for batch_size in batch_sizes:
            log(f"measuring {spec.label} at batch {batch_size} on {len(paths)} images ...")
            results.append(run_spec(spec, paths, batch_size, device, threads, per_expert))
    return results


def threads_table(spec: ModelSpec, paths: Sequence[str], batch_size: int, device: str = "cpu",
                  settings: Sequence[tuple[int, int]] | None = None, log=print) -> list[Result]:
    """The same images scored at each (torch threads, loader workers) of ``settings`` (default: every
    thread count from 1 to the CPUs this process may use, with 0 and 1 workers), one fresh process each:
    the numbers behind ``infer.py``'s default (:func:`core.device.default_threads`)."""
    from core.device import cpu_count

    if settings is None:
        settings = [(t, w) for w in (0, 1) for t in range(1, cpu_count() + 1)]
    results = []
    for threads, workers in settings:
        log(f"measuring {spec.label} at batch {batch_size} with {threads} thread(s), {workers} worker(s) ...")
        results.append(run_spec(spec, paths, batch_size, device, threads, per_expert=False, workers=workers))
    return results


def threads_report(results: Sequence[Result]) -> str:
    """Markdown table of :func:`threads_table`: images/s per (threads, workers), and which one infer.py picks."""
    from core.device import default_threads

    best = max(r.images_per_s for r in results)
    lines = ["| torch threads | loader workers | images/s | vs best | infer.py default |", "|---|---|---|---|---|"]
    for r in results:
        chosen = "yes" if r.threads == default_threads(r.workers) else ""
        lines.append(f"| {r.threads} | {r.workers} | {_rate(r.images_per_s)} | {r.images_per_s / best:.2f} | {chosen} |")
    return "\n".join(lines)


def _runtime(result: Result) -> str:
    """What ran the model, with how many CPU threads (onnxruntime's intra-op threads are torch's)."""
    runtime = "ONNX Runtime" if result.backend == "onnx" else "PyTorch"
    return f"{runtime}, {result.threads} CPU thread{'s' if result.threads != 1 else ''}"


def _composition(names: Sequence[str]) -> str:
    return ", ".join(f"{n}x {name}" for name, n in Counter(names).items())


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}x" if b > 0 else "n/a"


def ratio_line(results: Sequence[Result], default: str = "default", original: str = "original") -> str | None:
    """``default`` against ``original``: the fastest run of each, speed-up and memory ratios (None if one is absent)."""
    fastest = {}
    for label in (default, original):
        runs = [r for r in results if r.label == label]
        if not runs:
            return None
        fastest[label] = max(runs, key=lambda r: r.images_per_s)
    d, o = fastest[default], fastest[original]
    parts = [f"{_ratio(d.images_per_s, o.images_per_s)} the images/s",
             f"{_ratio(d.peak_rss_mib, o.peak_rss_mib)} the peak RSS"]
    if d.peak_gpu_mib is not None and o.peak_gpu_mib is not None:
        parts.append(f"{_ratio(d.peak_gpu_mib, o.peak_gpu_mib)} the peak GPU memory")
    return (f"{default} vs {original} (fastest run of each: batch {d.batch_size} vs batch {o.batch_size}): "
            + ", ".join(parts))


PER_EXPERT_HEADERS = ["model", "batch", "expert", "input px", "images/s", "ms/image", "share of experts' time"]
PER_EXPERT_TITLE = ("per expert: each expert's forward pass timed alone on the same decoded and resized batches, "
                    "in the same process (no decoding or resizing); \"all N experts\" is the sum of their times")


def per_expert_table(results: Sequence[Result]) -> str | None:
    """A Markdown table of each run's experts timed alone, and their sum (None if no run timed them)."""
    from tabulate import tabulate

    rows = []
    for r in results:
        if not r.per_expert:
            continue
        total = sum(t.seconds for t in r.per_expert)
        for t in r.per_expert:
            name = t.key if t.key == t.name else f"{t.key} ({t.name})"
            rows.append([r.label, r.batch_size, name, t.input_size, _rate(t.images_per_s),
                         f"{1000 * t.seconds / max(t.images, 1):.3g}",
                         f"{100 * t.seconds / total:.0f}%" if total > 0 else "-"])
        if len(r.per_expert) < 2:
            continue  # the sum of one expert is that expert
        n = r.per_expert[0].images
        rows.append([r.label, r.batch_size, f"all {len(r.per_expert)} experts", "/".join(map(str, r.input_sizes)),
                     _rate(n / total) if total > 0 else "-", f"{1000 * total / max(n, 1):.3g}", "100%"])
    if not rows:
        return None
    return tabulate(rows, PER_EXPERT_HEADERS, tablefmt="github", missingval="-", disable_numparse=True)


def report(results: Sequence[Result]) -> str:
    """What each model is, a Markdown table of the runs, the ratio line and the per-expert table."""
    from tabulate import tabulate

    lines, seen = [], set()
    for r in results:
        if r.label not in seen:
            seen.add(r.label)
            lines.append(f"{r.label}: {r.source}; {_composition(r.experts)}; {_runtime(r)}")
    rows = [[r.label, len(r.experts), "/".join(map(str, r.input_sizes)), r.batch_size, _rate(r.images_per_s),
             f"{r.peak_rss_mib:.0f}", None if r.peak_gpu_mib is None else f"{r.peak_gpu_mib:.0f}"]
            for r in results]
    headers = ["model", "experts", "input px", "batch", "images/s", "peak RSS MiB", "peak GPU MiB"]
    lines += ["", tabulate(rows, headers, tablefmt="github", missingval="-", disable_numparse=True)]
    ratios = [line for line in (ratio_line(results), ratio_line(results, "onnx", "default")) if line]
    if ratios:
        lines += ["", *ratios]
    experts = per_expert_table(results)
    if experts:
        lines += ["", PER_EXPERT_TITLE, "", experts]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, original: ModelSpec | None = None) -> int:
    """The CLI. ``original`` replaces the spec read from ``--original-config`` (tests pass tiny experts)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="the default ensemble's weights folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes of the default")
    parser.add_argument("--images", type=int, default=256, help="images scored per run of the default")
    parser.add_argument("--image-dir", default=None,
                        help="images to score (default: ../shared/data/dfdc_faces/images, else demo/)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads-table", action="store_true",
                        help="instead: score the default at its largest batch size with 1..N torch threads and 0 or 1 "
                             "loader workers, one table (the choice behind infer.py's default threads)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each measuring process (default: torch's, one per core); "
                             "on a machine busy with other work, 1 avoids OpenMP threads waiting on each other")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="also measure this ONNX export of the default (python export.py --onnx DIR), run by "
                             "ONNX Runtime, at the default's batch sizes on the same images")
    parser.add_argument("--no-original", action="store_true", help="measure the default ensemble only")
    parser.add_argument("--no-per-expert", action="store_true",
                        help="skip timing each expert alone on the same batches (a second pass over the images)")
    parser.add_argument("--original-config", default=str(ORIGINAL_CONFIG),
                        help="training config listing the original experts (its timm experts are kept)")
    parser.add_argument("--original-batch-size", dest="original_batch_sizes", type=int, nargs="+", default=[4],
                        help="batch size(s) of the original")
    parser.add_argument("--original-images", type=int, default=None,
                        help="images scored per run of the original: the first N of the default's list "
                             "(default: 8 on CPU, --images on GPU)")
    args = parser.parse_args(argv)
    import torch

    if (min(args.batch_sizes + args.original_batch_sizes) < 1 or args.images < 1
            or (args.original_images is not None and args.original_images < 1)
            or (args.threads is not None and args.threads < 1)):
        parser.error("batch sizes, image counts and threads must be positive")
    n_original = args.original_images or (8 if args.device == "cpu" else args.images)
    paths = sample_images(max(args.images, n_original), args.image_dir)
    plan = [(ModelSpec("default", weights=args.weights), args.batch_sizes, paths[:args.images])]
    if args.onnx:
        plan.append((ModelSpec("onnx", weights=args.onnx), args.batch_sizes, paths[:args.images]))
    if not args.no_original:
        plan.append((original or original_spec(args.original_config), args.original_batch_sizes, paths[:n_original]))

    if args.threads_table:
        from core.device import cpu_count

        print(f"device: {args.device}; CPUs: {cpu_count()}; default at batch {max(args.batch_sizes)} on "
              f"{args.images} images", flush=True)
        results = threads_table(ModelSpec("default", weights=args.weights), paths[:args.images],
                                max(args.batch_sizes), args.device, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(threads_report(results))
        return 0
    onnx = " (onnxruntime intra-op threads: the same)" if args.onnx else ""
    print(f"device: {args.device}; torch threads: {args.threads or torch.get_num_threads()}{onnx}; images per run: "
          + ", ".join(f"{spec.label} {len(p)}" for spec, _, p in plan), flush=True)
    results = run_benchmark(plan, args.device, args.threads, log=lambda m: print(m, file=sys.stderr, flush=True),
                            per_expert=not args.no_per_expert)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
