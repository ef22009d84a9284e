"""Choosing the torch device and CPU threads from a user's options, the same way in every command."""
from __future__ import annotations

import os

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


def busy_cpus() -> int:
    """CPUs other work keeps busy: the 1-minute load average, rounded (0 where the OS gives none)."""
    try:
        return max(0, round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        return 0


def default_threads(workers: int = 0) -> int:
    """torch's CPU threads when the user does not say: one per CPU neither taken by the loader workers nor
    busy with other work (:func:`busy_cpus`), and at least one; under torchrun the free CPUs are shared out
    among the machine's processes (``LOCAL_WORLD_SIZE``).

    torch's own default (one thread per core) ignores both. OpenMP threads that find their core taken spin
    and wait on each other: measured here with a training job on one of 2 cores, scoring one image took
    4.8 s with 2 threads and 2.8 s with 1, and a batch run lost 20 to 30% (``bench/infer_speed.py
    --threads-table``); on an idle machine every core is used.
    """
    free = cpu_count() - busy_cpus()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share it
    return max(1, free // max(1, processes) - max(0, workers))


def default_workers(n_items: int, batch_size: int) -> int:
    """Loader workers when the user does not say: one decoding process beside the model on a machine with 2
    or more CPUs, when there is more than one batch to overlap with; none for a single batch (starting a
    process would cost more than it saves). Under torchrun each process counts its share of the CPUs.

    Measured on 2 CPUs, the shipped model at batch 32 (``bench/infer_speed.py --threads-table``): 1 thread +
    1 worker was the fastest setting, 2 threads + 0 workers 30% slower, with another job on one core; see
    the README's threads table for the idle machine.
    """
    cpus = cpu_count() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # this process's share
    return 1 if cpus >= 2 and n_items > batch_size else 0


def set_threads(threads: int | None, workers: int = 0) -> int:
    """Set torch's CPU threads (``None`` or 0: :func:`default_threads`); returns the number set."""
    if threads is not None and threads < 0:
        raise DeviceError(f"--threads must be at least 1 (0: automatic), got {threads}")
    n = threads or default_threads(workers)
    torch.set_num_threads(n)
    return n
