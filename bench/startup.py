"""Start-up time of the commands, side by side with ``python -c "import torch"`` (issue #12).

    python bench/startup.py                     # 5 runs of each command, medians, ratios, targets
    python bench/startup.py --runs 3 --only infer.py --image demo/gan_fake_1.jpg
    python bench/startup.py --check             # exit status 1 when a target is missed

Each row is the median wall time of a fresh ``python ...`` process (``sys.executable``, from the repository
root): bare ``import torch`` (the floor every command that scores or trains pays), ``python infer.py IMAGE``
(scoring one image with the shipped weights: imports, loading the model and its base, one forward pass),
and ``--help`` of every command. Runs go round-robin over the commands, so that a change in the machine's
load falls on all rows alike; the machine's load average and torch's CPU threads are printed with the
table, since both move the figures.

Targets: ``--help`` under 2 s; one image under 2x bare ``import torch``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "demo/dfdc_fake_1.jpg"
HELP_TARGET_S = 2.0
IMAGE_TARGET_X_TORCH = 2.0
# The commands whose --help is timed, as a user types them after ``python``; evaluation/ adds its own.
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("infer.py",), ("export.py",), ("serve.py",),
    ("train/joint.py",), ("train/heads.py",), ("train/token_cache.py",), ("train/merge.py",),
    ("data_prep/cluster.py",), ("data_prep/index.py",), ("data_prep/faces.py",), ("data_prep/augment_edits.py",),
    ("data_prep/sd_augment.py",),
    ("-m", "experts.fetch"),
)


@dataclass
class Case:
    """One command to time: ``python *argv`` from the repository root, and what it is held to.

    ``kind``: ``"torch"`` (the baseline), ``"image"`` (under ``IMAGE_TARGET_X_TORCH`` x the baseline) or
    ``"help"`` (under ``HELP_TARGET_S`` seconds).
    """

    label: str
    argv: tuple[str, ...]
    kind: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def evaluation_commands(root: Path = ROOT) -> list[tuple[str, ...]]:
    """``evaluation/*.py`` files that are commands (a ``main`` run under ``__main__``)."""
    found = []
    for path in sorted((root / "evaluation").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "\ndef main(" in text and 'if __name__ == "__main__"' in text:
            found.append((path.relative_to(root).as_posix(),))
    return found


def default_cases(image: str = DEFAULT_IMAGE, root: Path = ROOT) -> list[Case]:
    """The baseline, one image scored, then ``--help`` of every command."""
    cases = [Case('python -c "import torch"', ("-c", "import torch"), "torch"),
             Case(f"python infer.py {image}", ("infer.py", image), "image")]
    for command in [*COMMANDS, *evaluation_commands(root)]:
        cases.append(Case(f"python {' '.join(command)} --help", (*command, "--help"), "help"))
    return cases


def select(cases: Sequence[Case], only: Sequence[str]) -> list[Case]:
    """The baseline plus the cases whose label contains one of ``only`` (all of them when ``only`` is empty)."""
    if not only:
        return list(cases)
    return [c for c in cases if c.kind == "torch" or any(o in c.label for o in only)]


def time_once(argv: Sequence[str], cwd: Path = ROOT, timeout: float = 600) -> float:
    """Wall seconds of one ``python *argv`` run; a failing command is an error, not a time."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"python {' '.join(argv)} exited with {result.returncode}: {tail}")
    return seconds


def measure(cases: Sequence[Case], runs: int, cwd: Path = ROOT, progress: bool = False) -> list[Case]:
    """Time every case ``runs`` times, round-robin; returns the cases with their times."""
    for r in range(runs):
        for case in cases:
            case.times.append(time_once(case.argv, cwd))
            if progress:
                print(f"run {r + 1}/{runs}: {case.times[-1]:6.2f} s  {case.label}", file=sys.stderr)
    return list(cases)


def torch_threads(cwd: Path = ROOT) -> int:
    """torch's default number of CPU threads in a fresh process (what ``import torch`` starts with)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], cwd=cwd,
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def verdict(case: Case, torch_median: float) -> tuple[str, bool | None]:
    """The target of ``case`` in words and whether its median meets it (None: the baseline has none)."""
    if case.kind == "image":
        return f"< {IMAGE_TARGET_X_TORCH:g}x torch", case.median < IMAGE_TARGET_X_TORCH * torch_median
    if case.kind == "help":
        return f"< {HELP_TARGET_S:g} s", case.median < HELP_TARGET_S
    return "(baseline)", None


def format_table(cases: Sequence[Case], threads: int | None = None, load: Sequence[float] | None = None) -> str:
    """A Markdown table: median and range of each case, its ratio to bare ``import torch`` and its target."""
    base = next((c.median for c in cases if c.kind == "torch"), float("nan"))
    runs = max((len(c.times) for c in cases), default=0)
    lines = [f"median of {runs} runs each; python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
             + (f"; torch threads {threads}" if threads is not None else "")
             + (f"; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if os.environ.get("OMP_NUM_THREADS") else "")
             + (f"; load average {' '.join(f'{x:.2f}' for x in load)}" if load is not None else ""),
             "",
             "| command | median s | min-max s | x torch | target | met |",
             "|---|---|---|---|---|---|"]
    for case in cases:
        target, ok = verdict(case, base)
        spread = f"{min(case.times):.2f}-{max(case.times):.2f}" if case.times else "-"
        met = "" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| `{case.label}` | {case.median:.2f} | {spread} | {case.median / base:.2f} | {target} | {met} |")
    return "\n".join(lines)


def missed(cases: Sequence[Case]) -> list[Case]:
    """The cases whose median misses their target."""
    base = next((c.median for c in cases if c.kind == "torch"), float("nan"))
    return [c for c in cases if verdict(c, base)[1] is False]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs of each command; the median is reported (default: 5)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the image infer.py scores (default: {DEFAULT_IMAGE})")
    p.add_argument("--only", nargs="*", default=[], metavar="TEXT",
                   help="time only the commands whose line contains one of these (and the torch baseline)")
    p.add_argument("--check", action="store_true", help="exit status 1 when a median misses its target")
    p.add_argument("--quiet", action="store_true", help="no line per run on stderr")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    cases = select(default_cases(args.image), args.only)
    threads = torch_threads()
    measure(cases, args.runs, progress=not args.quiet)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(format_table(cases, threads, load))
    bad = missed(cases)
    if bad:
        print(f"\ntargets missed: {', '.join(c.label for c in bad)}", file=sys.stderr)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
