"""Make new fakes from real images with Stable Diffusion: img2img at several strengths, and inpainting.

    python data_prep/sd_augment.py ../shared/data/dfdc_faces/labels.csv --out runs/sd_fakes \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --mode img2img,inpaint --strengths 0.3,0.5,0.7 \\
        --steps 30 --guidance 7.5 --seed 0 --batch-size 8 --size 512 --device cuda --limit 500
    python data_prep/sd_augment.py photos/ --model path/to/saved_pipeline --out runs/x --mode inpaint \\
        --inpaint-model stable-diffusion-v1-5/stable-diffusion-inpainting --masks face,box --paste-back
    torchrun --nproc_per_node 4 data_prep/sd_augment.py ../shared/data/dfdc_faces/labels.csv --out runs/sd_fakes \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda        # 4 GPUs, each a share of the jobs

The shared sets hold no diffusion images at all, and a detector meets them in the wild. Each real image
(rows with ``target`` 0 of a labels CSV, or every image of a folder) is turned into one fake per img2img
strength and one per inpainting strength and mask kind:

- ``img2img``: the whole image re-synthesised; low strengths keep the person, high ones change more.
- ``inpaint``: only a masked region is repainted. Masks: ``face`` (an ellipse over the eyes, nose and mouth
  of the face YuNet finds, the central ellipse when none), ``ellipse`` (central), ``box`` (random, seeded).
  ``--paste-back`` puts the original pixels back outside the (feathered) mask, as editing tools do, so
  that only the region carries generator traces; without it the whole image went through the VAE.

``--model`` is a Hugging Face hub id (SD 1.x, 2.x or XL; needs internet once) or a folder written by a
pipeline's ``save_pretrained``. It is loaded once (the inpainting pipeline shares its components unless
``--inpaint-model`` names a dedicated inpainting checkpoint), in fp16 on CUDA and fp32 on CPU.

Output, in ``--out``:

    images/<name>.png    the fakes                  masks/<name>.png    inpainting masks (white = repainted)
    meta/<name>.json     everything needed to redo the image: prompt, negative prompt, seed, steps,
                         guidance, strength, model, origin, mask..., and the sizes of the files written
    labels.csv           img_name,target(=1),group,source(sd-img2img|sd-inpaint),prompt,... in the
                         competition's format; group is the source image's group, so that a fake and its
                         real stay on one side of a group split

Each image gets its own seeded CPU random generator (the same starting noise on any device), with a seed
derived from ``--seed`` and the output name (``data_prep/augment_jobs.py``, shared with
``augment_edits.py``), so adding images or changing ``--batch-size`` never changes the others. Re-running
the same command resumes: an output whose metadata exists and lists its files as written is skipped (even
if the options changed since; a warning says so); one killed half-way or whose image was deleted is made
again. Every file is written atomically (temporary file, then rename), the metadata last, and labels.csv is
rebuilt from the metadata at the end of each run, interrupted or not.

Under torchrun, rank 0 finds which outputs are not done yet and each process generates its own contiguous
share of them, on ``cuda:LOCAL_RANK`` (or the CPU, with the gloo backend); every process loads the
pipelines. Each reports the source images it cannot read. Once every process is done, rank 0 rebuilds
labels.csv and prints the totals (images written per process among them). Images do not depend on how
the jobs are shared out (their seeds do not), up to the rounding that batch composition changes. A process
that fails makes torchrun fail the job; what any process wrote stays, and running the same command again
(with any number of processes) makes only what is missing and rebuilds labels.csv. On several machines
(``--nnodes``), ``--out`` must lie on a filesystem they all share, and the source images and ``--model``
must be readable at the same paths.

The safety checker of SD 1.x/2.x checkpoints stays on unless ``--no-safety-checker`` is passed; an image it
blocks (returned black) is not written and is reported.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from core.progress import progress_bar, write_line
from core.protocol import DEFAULT_DEVICE
from data_prep.augment_jobs import AugmentError, Job, OutputFolder, check_seed, check_unique, image_name, job_seed, \
    mask_name

if TYPE_CHECKING:  # torch, diffusers, cv2 and pandas are imported where used, so that --help is instant
    import pandas as pd
    import torch

    from core.distributed import Dist
    from core.faces import Face

MODES = ("img2img", "inpaint")
MASK_KINDS = ("face", "ellipse", "box")
DEFAULT_PROMPT = "a high quality photo of a person's face, natural skin texture, realistic lighting"
DEFAULT_NEGATIVE = "cartoon, painting, drawing, illustration, deformed, blurry, low quality, watermark, text"
# The labels.csv columns, in order: the competition's four, then what makes each image reproducible.
LABEL_COLUMNS = ["img_name", "target", "group", "source", "prompt", "negative_prompt", "seed", "steps", "guidance",
                 "strength", "model", "origin", "mode", "mask", "mask_kind", "paste_back", "size", "pipeline",
                 "scheduler", "dtype"]
# Options that, if they differ from an existing output's metadata, mean a re-run is mixing settings.
SETTINGS_KEYS = ("prompt", "negative_prompt", "steps", "guidance", "model", "size")


@dataclass
class AugmentConfig:
    """Everything a run needs besides its inputs; the CLI options map one to one onto these fields."""

    model: str
    modes: tuple[str, ...] = MODES
    strengths: tuple[float, ...] = (0.3, 0.5, 0.7)       # img2img
    inpaint_strengths: tuple[float, ...] = (1.0,)         # 1.0: the masked region starts from pure noise
    masks: tuple[str, ...] = ("face",)
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 4
    size: int = 512
    device: str = DEFAULT_DEVICE
    limit: int | None = None                               # source images, not outputs
    include_fakes: bool = False                            # also use rows with target 1 as sources
    paste_back: bool = False
    disable_safety_checker: bool = False
    inpaint_model: str | None = None
    variant: str | None = None                             # e.g. "fp16": download the hub's fp16 files


@dataclass(frozen=True)
class SDJob(Job):
    """One output image to make (name, source, group and seed: see :class:`Job`), and how."""

    mode: str            # img2img | inpaint
    strength: float
    mask_kind: str       # "" for img2img


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0                     # already done in an earlier run
    blocked: int = 0                     # black images from the safety checker, not written
    failed: list[str] = field(default_factory=list)  # unreadable source images
    mixed_settings: int = 0              # skipped outputs made with other options
    labels: Path | None = None
    seconds: float = 0.0
    per_process: list[int] = field(default_factory=list)  # images written by each torchrun process, by rank


# ----------------------------------------------------------------------------------------------------------
# Planning: which outputs, with which names and seeds


def check_config(cfg: AugmentConfig) -> None:
    """Refuse options that would fail deep inside diffusers, naming the option."""
    if not cfg.modes or any(m not in MODES for m in cfg.modes):
        raise AugmentError(f"--mode must be a comma list of {', '.join(MODES)}, got {','.join(cfg.modes)}")
    if any(k not in MASK_KINDS for k in cfg.masks) or ("inpaint" in cfg.modes and not cfg.masks):
        raise AugmentError(f"--masks must be a comma list of {', '.join(MASK_KINDS)}, got {','.join(cfg.masks)}")
    if "inpaint" in cfg.modes and "face" in cfg.masks and not has_detector():
        raise AugmentError("--masks face needs the face detector `yuface` (CPython 3.10/3.11 on Linux x86-64 or "
                           "Windows); use --masks ellipse,box")
    if cfg.size < 8 or cfg.size % 8:
        raise AugmentError(f"--size must be a multiple of 8 (the VAE's downsampling), got {cfg.size}")
    if cfg.steps < 1 or cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise AugmentError("--steps, --batch-size and --limit must be at least 1")
    check_seed(cfg.seed)
    for option, values in (("--strengths", cfg.strengths), ("--inpaint-strengths", cfg.inpaint_strengths)):
        for s in values:
            if not 0 < s <= 1:
                raise AugmentError(f"{option}: {s} is not in (0, 1]")
            if int(cfg.steps * s) < 1:  # diffusers runs int(steps * strength) denoising steps
                raise AugmentError(f"{option}: strength {s} with --steps {cfg.steps} leaves no denoising step; "
                                   f"use at least {math.ceil(1 / s)} steps")


def read_sources(source: str | Path, include_fakes: bool = False, limit: int | None = None) -> pd.DataFrame:
    """The source images: the real rows (``target`` 0) of a labels CSV, or every image of a folder."""
    import pandas as pd

    from core.image_lists import read_image_list

    df = read_image_list(source)
    if "target" in df and not include_fakes:
        df = df[pd.to_numeric(df["target"], errors="coerce") == 0]
    if df.empty:
        raise AugmentError(f"{source}: no real images (target 0) to start from; --include-fakes uses all rows")
    return df.head(limit).reset_index(drop=True) if limit else df.reset_index(drop=True)


def output_stem(img_name: str) -> str:
    """A flat file stem for a source name: ``images/real/1.jpg`` -> ``images__real__1``."""
    return Path(img_name).with_suffix("").as_posix().replace("/", "__")


def plan_jobs(sources: pd.DataFrame, cfg: AugmentConfig) -> list[SDJob]:
    """Every output of the run, grouped by (mode, strength) so that each group can be batched."""
    variants: list[tuple[str, float, str]] = []
    if "img2img" in cfg.modes:
        variants += [("img2img", s, "") for s in cfg.strengths]
    if "inpaint" in cfg.modes:
        variants += [("inpaint", s, k) for s in cfg.inpaint_strengths for k in cfg.masks]
    rows = [(output_stem(row["img_name"]), row) for _, row in sources.iterrows()]
    jobs = []
    for mode, strength, mask in variants:
        for stem, row in rows:
            name = f"{stem}__{mode}-s{strength:.2f}" + (f"-{mask}" if mask else "")
            jobs.append(SDJob(name=name, origin=row["img_name"], path=row["path"], group=str(row["group"]),
                              seed=job_seed(cfg.seed, name), mode=mode, strength=strength, mask_kind=mask))
    return check_unique(jobs)


def batches(jobs: Sequence[SDJob], size: int) -> Iterator[list[SDJob]]:
    """Consecutive runs of jobs with one mode and strength (one pipeline call each), at most ``size`` long."""
    batch: list[SDJob] = []
    for job in jobs:
        if batch and (len(batch) == size or (job.mode, job.strength) != (batch[0].mode, batch[0].strength)):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------------
# Images and masks


def prepare_image(path: str, size: int) -> np.ndarray:
    """The source as a ``[size, size, 3]`` uint8 square: shorter side resized, centre crop (as evaluation)."""
    from core.images import load_image
    from core.transforms import eval_transform

    return eval_transform(size)(image=load_image(path))["image"]


def has_detector() -> bool:
    """Whether the face detector (``core.faces``, YuNet via ``yuface``) can run here."""
    from core.faces import has_detector as detector_available

    return detector_available()


def largest_face(image: np.ndarray) -> Face | None:
    """The largest face :mod:`core.faces` finds in an RGB image, or None."""
    from core.faces import largest_face as find_largest

    return find_largest(image)


def ellipse_mask(size: int, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """A ``[size, size]`` uint8 mask, 255 inside the ellipse (centre and semi-axes in pixels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ((((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) <= 1).astype(np.uint8) * 255


def make_mask(image: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, str]:
    """The region to repaint (255) and the kind actually used (``face`` falls back to ``ellipse``)."""
    size = image.shape[0]
    if kind == "face":
        face = largest_face(image)
        if face is not None:
            x, y, w, h = face.box  # eyes to mouth sit a little below the box centre
            return ellipse_mask(size, x + w / 2, y + 0.55 * h, 0.36 * w, 0.40 * h), "face"
        kind = "ellipse"
    if kind == "ellipse":
        return ellipse_mask(size, 0.5 * size, 0.55 * size, 0.25 * size, 0.30 * size), "ellipse"
    rng = np.random.default_rng(seed)
    w, h = (rng.uniform(0.25, 0.5, 2) * size).astype(int)
    x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y0 + h, x0:x0 + w] = 255
    return mask, "box"


def paste_back(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Original pixels outside the mask, generated inside, blended over a few pixels at the edge."""
    import cv2

    sigma = max(1.0, mask.shape[0] / 128)
    alpha = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), sigma)[..., None]
    return np.clip(original * (1 - alpha) + generated * alpha + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Pipelines


def _device(name: str) -> torch.device:
    from core.device import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as e:
        raise AugmentError(f"--device: {e}") from None


def load_pipelines(cfg: AugmentConfig, device: torch.device) -> dict[str, Any]:
    """``{mode: pipeline}`` for the run's modes, each loaded once, on ``device``, fp16 on CUDA.

    Inpainting shares the img2img pipeline's components (``from_pipe``: no second copy in memory) unless
    ``cfg.inpaint_model`` names a dedicated inpainting checkpoint (a UNet with 9 input channels).
    """
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    kwargs: dict[str, Any] = {"torch_dtype": torch.float16 if device.type == "cuda" else torch.float32}
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    if cfg.disable_safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipes: dict[str, Any] = {}
    if "img2img" in cfg.modes:
        pipes["img2img"] = _from_pretrained(AutoPipelineForImage2Image, cfg.model, kwargs, device)
        unet = getattr(pipes["img2img"], "unet", None)
        if unet is not None and unet.config.in_channels != 4:
            raise AugmentError(f"--model {cfg.model}: an inpainting checkpoint (UNet in_channels="
                               f"{unet.config.in_channels}) cannot do img2img; use --mode inpaint or give it as "
                               f"--inpaint-model")
    if "inpaint" in cfg.modes:
        if cfg.inpaint_model or "img2img" not in pipes:
            model = cfg.inpaint_model or cfg.model
            pipes["inpaint"] = _from_pretrained(AutoPipelineForInpainting, model, kwargs, device)
        else:
            pipes["inpaint"] = AutoPipelineForInpainting.from_pipe(pipes["img2img"])
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole run, ours
    return pipes


def _from_pretrained(auto_cls: Any, model: str, kwargs: dict[str, Any], device: torch.device) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*safety checker.*")  # we say it ourselves
            # diffusers >= 0.36 prefers `dtype`, older ones know only `torch_dtype`: keep the one both read
            warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)
            return auto_cls.from_pretrained(model, **kwargs).to(device)
    except (OSError, ValueError) as e:
        raise AugmentError(f"--model {model}: cannot load a diffusers pipeline ({str(e).splitlines()[0]})") from None


def generate(pipe: Any, jobs: Sequence[SDJob], images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
             cfg: AugmentConfig) -> tuple[list[np.ndarray], list[bool]]:
    """One pipeline call for a batch of one mode and strength: ``([size, size, 3] uint8 images, blocked)``.

    Each image has its own seeded CPU generator, so its result does not depend on the rest of the batch's
    noise, and a seed reproduces the same starting noise on any device.
    """
    import torch
    from PIL import Image

    n = len(jobs)
    kwargs: dict[str, Any] = dict(
        prompt=[cfg.prompt] * n, negative_prompt=[cfg.negative_prompt] * n if cfg.negative_prompt else None,
        image=[Image.fromarray(im) for im in images], strength=jobs[0].strength, num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance, generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
        output_type="np")
    if jobs[0].mode == "inpaint":
        kwargs.update(mask_image=[Image.fromarray(m) for m in masks], height=cfg.size, width=cfg.size)
    with torch.inference_mode():
        out = pipe(**kwargs)
    arrays = [np.clip(np.asarray(im, dtype=np.float32) * 255 + 0.5, 0, 255).astype(np.uint8) for im in out.images]
    blocked = getattr(out, "nsfw_content_detected", None) or [False] * n
    return arrays, [bool(b) for b in blocked]


# ----------------------------------------------------------------------------------------------------------
# Writing


def model_of(job: SDJob, cfg: AugmentConfig) -> str:
    return (cfg.inpaint_model or cfg.model) if job.mode == "inpaint" else cfg.model


def metadata(job: SDJob, cfg: AugmentConfig, pipe: Any, out_dir: Path, mask_kind: str) -> dict[str, Any]:
    """The labels row of one output: its label, group, and everything needed to generate it again."""
    return {
        "img_name": image_name(job.name), "target": 1, "group": job.group, "source": f"sd-{job.mode}",
        "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "seed": job.seed, "steps": cfg.steps,
        "guidance": cfg.guidance, "strength": job.strength, "model": model_of(job, cfg),
        "origin": os.path.relpath(job.path, out_dir.resolve()),
        "mode": job.mode, "mask": mask_name(job.name) if job.mode == "inpaint" else "",
        "mask_kind": mask_kind, "paste_back": bool(cfg.paste_back and job.mode == "inpaint"), "size": cfg.size,
        "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(pipe.dtype).replace("torch.", ""), "origin_name": job.origin,
    }


def _differs(out: OutputFolder, job: SDJob, cfg: AugmentConfig) -> bool:
    """Whether an existing output was made with other settings than this run's."""
    old = out.record(job.name)
    if old is None:
        return False
    now = {**{k: v for k, v in asdict(cfg).items() if k in SETTINGS_KEYS}, "model": model_of(job, cfg)}
    return any(old.get(k) != now[k] for k in SETTINGS_KEYS)


# ----------------------------------------------------------------------------------------------------------
# The run


def augment(source: str | Path, out_dir: str | Path, cfg: AugmentConfig, pipes: dict[str, Any] | None = None,
            progress: bool = True, d: Dist | None = None) -> Summary:
    """Generate every missing output for ``source`` into ``out_dir`` and rebuild its labels.csv.

    ``pipes`` (``{mode: pipeline}``) skips loading, for callers that already hold pipelines.

    Under torchrun (``d`` from :func:`core.distributed.init_distributed`), every process calls this with the
    same arguments: rank 0 decides what is not done yet (one view of the folder, so that the shares cannot
    overlap however fast the others write), each process generates its own contiguous share, and once all
    are done rank 0 rebuilds labels.csv. Every process returns the totals; only rank 0's names ``labels``.
    """
    from core.distributed import Dist, broadcast, process_device, shard_bounds

    d = d or Dist()
    check_config(cfg)
    out = OutputFolder(out_dir)
    start, summary = time.perf_counter(), Summary()
    jobs = plan_jobs(read_sources(source, cfg.include_fakes, cfg.limit), cfg)
    todo: list[SDJob] = []
    if d.is_main:
        todo, done = out.split_done(jobs)
        summary.skipped = len(done)
        summary.mixed_settings = sum(_differs(out, j, cfg) for j in done)
    index = {job.name: i for i, job in enumerate(jobs)}
    todo = [jobs[i] for i in broadcast([index[job.name] for job in todo] if d.is_main else None, d)]
    lo, hi = shard_bounds(len(todo), d.rank, d.world)
    mine = todo[lo:hi]
    try:
        if mine:
            if pipes is None:
                pipes = load_pipelines(cfg, process_device(_device(cfg.device), d))
            total, initial = (len(mine), 0) if d.enabled else (len(jobs), len(jobs) - len(todo))
            _run_jobs(mine, pipes, out, cfg, summary, total, initial, progress and d.is_main)
    finally:  # an interrupted run still leaves labels.csv listing everything written so far
        summary = _totals(summary, d)  # waits for every process
        if d.is_main:
            summary.labels = out.write_labels(LABEL_COLUMNS, extra_columns=True)
        summary.seconds = time.perf_counter() - start
    return summary


def _totals(mine: Summary, d: Dist) -> Summary:
    """Every process's counts added up (under torchrun; a collective, so it returns once all are done).
    ``skipped`` and ``mixed_settings`` are rank 0's, the only one that looks at what was done before."""
    from core.distributed import gather

    parts = gather(mine, d)
    first = parts[0]
    return Summary(written=sum(p.written for p in parts), skipped=first.skipped,
                   blocked=sum(p.blocked for p in parts), failed=[f for p in parts for f in p.failed],
                   mixed_settings=first.mixed_settings, per_process=[p.written for p in parts])


def _run_jobs(todo: list[SDJob], pipes: dict[str, Any], out: OutputFolder, cfg: AugmentConfig, summary: Summary,
              total: int, initial: int, progress: bool) -> None:
    with progress_bar(total=total, initial=initial, desc="sd-augment", enabled=progress) as bar:
        for batch in batches(todo, cfg.batch_size):
            _run_batch(batch, pipes, out, cfg, summary)
            bar.update(len(batch))


def _run_batch(batch: list[SDJob], pipes: dict[str, Any], out: OutputFolder, cfg: AugmentConfig,
               summary: Summary) -> None:
    """Prepare, generate and write one batch (one mode and strength)."""
    from core.images import ImageLoadError

    jobs, images, masks, kinds = [], [], [], []
    for job in batch:
        try:
            image = prepare_image(job.path, cfg.size)
        except ImageLoadError as e:
            summary.failed.append(str(e))
            write_line(f"error: {e}")
            continue
        mask, kind = make_mask(image, job.mask_kind, job.seed) if job.mode == "inpaint" else (None, "")
        jobs.append(job)
        images.append(image)
        masks.append(mask)
        kinds.append(kind)
    if not jobs:
        return
    pipe = pipes[jobs[0].mode]
    outputs, blocked = generate(pipe, jobs, images, masks, cfg)
    for job, image, result, mask, kind, bad in zip(jobs, images, outputs, masks, kinds, blocked):
        if bad:
            summary.blocked += 1
            write_line(f"blocked by the safety checker, not written: {job.name}")
            continue
        if mask is not None and cfg.paste_back:
            result = paste_back(image, result, mask)
        out.save(job.name, metadata(job, cfg, pipe, out.root, kind), result, mask)
        summary.written += 1


# ----------------------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    d = AugmentConfig(model="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a labels CSV (its target-0 rows are used) or a folder of real images")
    p.add_argument("--model", required=True, help="hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) "
                   "or a folder saved with save_pretrained")
    p.add_argument("--out", required=True, help="output folder; re-running with it resumes")
    p.add_argument("--mode", type=_words, default=d.modes,
                   help=f"img2img, inpaint or both (default: {','.join(d.modes)})")
    p.add_argument("--strengths", type=_floats, default=d.strengths,
                   help=f"img2img strengths (default: {','.join(map(str, d.strengths))})")
    p.add_argument("--inpaint-strengths", type=_floats, default=d.inpaint_strengths,
                   help="inpainting strengths (default: 1.0, the region starts from pure noise)")
    p.add_argument("--masks", type=_words, default=d.masks,
                   help=f"inpainting masks: {', '.join(MASK_KINDS)} (default: {','.join(d.masks)})")
    p.add_argument("--inpaint-model", help="a dedicated inpainting checkpoint (default: reuse --model)")
    p.add_argument("--prompt", default=d.prompt, help="(default: %(default)r)")
    p.add_argument("--negative-prompt", default=d.negative_prompt, help="'' for none (default: %(default)r)")
    p.add_argument("--steps", type=int, default=d.steps, help="inference steps at strength 1 (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="run seed; each image's seed is derived from it and "
                   "the image's name (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per pipeline call (default: %(default)s)")
    p.add_argument("--size", type=int, default=d.size, help="square side, a multiple of 8 (default: %(default)s; "
                   "1024 for SDXL)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default: %(default)s, the GPU "
                   "if any)")
    p.add_argument("--limit", type=int, help="use only the first N source images (default: all)")
    p.add_argument("--include-fakes", action="store_true", help="start from every row, not only target 0")
    p.add_argument("--paste-back", action="store_true", help="inpainting: keep the original pixels outside the mask")
    p.add_argument("--variant", help="hub weight variant to download, e.g. fp16")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="disable the checkpoint's NSFW safety checker (it blacks out flagged images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.distributed import SHARD_WAIT, Dist, init_distributed, shutdown
    from core.labels import LabelsError

    cfg = AugmentConfig(
        model=args.model, modes=args.mode, strengths=args.strengths, inpaint_strengths=args.inpaint_strengths,
        masks=args.masks, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, size=args.size, device=args.device,
        limit=args.limit, include_fakes=args.include_fakes, paste_back=args.paste_back,
        disable_safety_checker=args.no_safety_checker, inpaint_model=args.inpaint_model, variant=args.variant)
    d = Dist()
    try:
        # under torchrun: join the others (else nothing happens)
        d = init_distributed(_device(cfg.device), timeout=SHARD_WAIT)
        if cfg.disable_safety_checker and d.is_main:
            print("warning: the safety checker is disabled (--no-safety-checker): outputs are not filtered for "
                  "NSFW content", file=sys.stderr)
        s = augment(args.source, args.out, cfg, progress=not args.quiet, d=d)
    except (AugmentError, LabelsError, ImportError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; what was written is kept and listed in {Path(args.out) / 'labels.csv'}; "
              "run the same command to go on", file=sys.stderr)
        return 130
    finally:
        shutdown(d)
    if d.is_main:
        _print_summary(s, d)
    return 1 if s.failed else 0


def _print_summary(s: Summary, d: Dist) -> None:
    """The run's totals, once (rank 0 under torchrun), on stderr."""
    shares = f" ({' + '.join(map(str, s.per_process))} by {d.world} processes)" if d.enabled else ""
    print(f"{s.written} images written{shares}, {s.skipped} already there, in {s.seconds:.1f}s; labels written to "
          f"{s.labels}", file=sys.stderr)
    if s.mixed_settings:
        print(f"warning: {s.mixed_settings} existing outputs were made with other options (kept; see meta/)",
              file=sys.stderr)
    if s.blocked:
        print(f"{s.blocked} images were blocked by the safety checker and not written", file=sys.stderr)
    if s.failed:
        print(f"{len(s.failed)} source images could not be read (see the errors above)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
