"""Choosing the torch device and CPU threads from a user's options, the same way in every command."""
from __future__ import annotations

import os
from pathlib import Path

import torch


class DeviceError(ValueError):
    """A device the user asked for that this machine does not have."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; ``"cuda[:N]"`` only where CUDA is available."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device {name!r}: {e}") from None


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total: containers and
    ``taskset`` give a process fewer)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Processes of this run on this machine, which share its CPUs: torchrun's ``LOCAL_WORLD_SIZE`` (1 when
    run directly)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def busy_cpus(sample_s: float = 0.1) -> int:
    """CPUs other work keeps busy, rounded: the smaller of the 1-minute load average and the busy time of the
    CPUs this process may use over the next ``sample_s`` seconds (``/proc/stat``); 0 where the OS gives neither.

    The load average alone lags: for a minute or two after a job ends it still counts it, and a command run
    right after another then took half the CPUs it had (measured: 5.5 images/s instead of 8.8 on an idle
    2-core machine). The sample alone would miss a job that pauses for a moment. Call it before starting
    work of one's own: the sample counts every process, this one too.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    now = _busy_now(sample_s)
    return max(0, round(load if now is None else min(load, now)))


def _busy_now(sample_s: float) -> float | None:
    """How many of this process's CPUs were busy, summed, over ``sample_s`` seconds (None without /proc/stat)."""
    import time

    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times() or {}
    busy = 0.0
    for cpu, (idle, total) in first.items():
        idle2, total2 = second.get(cpu, (idle, total))
        if total2 > total:
            busy += 1.0 - (idle2 - idle) / (total2 - total)
    return busy


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle + iowait ticks, all ticks)}`` of the CPUs this process may run on, from /proc/stat."""
    try:
        allowed = os.sched_getaffinity(0)
        lines = Path("/proc/stat").read_text().splitlines()
    except (AttributeError, OSError):
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times or None


def default_threads(workers: int = 0) -> int:
    """torch's CPU threads when the user does not say: one per CPU neither taken by the loader workers nor
    busy with other work (:func:`busy_cpus`), and at least one; under torchrun the free CPUs are shared out
    among the machine's processes (``LOCAL_WORLD_SIZE``).

    torch's own default (one thread per core) ignores both. OpenMP threads that find their core taken spin
    and wait on each other: measured here with a training job on one of 2 cores, scoring one image took
    4.8 s with 2 threads and 2.8 s with 1, and a batch run lost 20 to 30% (``bench/infer_speed.py
    --threads-table``); on an idle machine every core is used.
    """
    return max(1, (cpu_count() - busy_cpus()) // local_processes() - max(0, workers))


def default_workers(n_items: int, batch_size: int) -> int:
    """Loader workers when the user does not say: one decoding process beside the model on a machine with 4
    or more CPUs (under torchrun: this process's share of them), when there is more than one batch to overlap
    with; none otherwise.

    A worker is given a CPU of its own (:func:`default_threads`), and on 2 CPUs that CPU is worth more to
    the model: measured with the shipped model at batch 32 (``bench/sharded_infer.py``, 256 images), on an
    idle machine 2 threads and no worker scored 8.8 images/s, 1 thread and 1 worker 5.5; with a job on one
    core, 1 thread with or without a worker was within noise (``bench/infer_speed.py --threads-table``).
    """
    return 1 if cpu_count() // local_processes() >= 4 and n_items > batch_size else 0


def set_threads(threads: int | None, workers: int = 0) -> int:
    """Set torch's CPU threads (``None`` or 0: :func:`default_threads`); returns the number set."""
    if threads is not None and threads < 0:
        raise DeviceError(f"--threads must be at least 1 (0: automatic), got {threads}")
    n = threads or default_threads(workers)
    torch.set_num_threads(n)
    return n
