"""Running a command of the tree under torchrun in a subprocess: how the tests check sharded commands on CPU.

torchrun's ``--standalone`` picks a free port for its rendezvous, so tests that each start a job can run at
the same time (pytest-xdist, or another person's test run on the machine) without fighting over a port.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tests.conftest import ROOT

# What torchrun sets for its processes: left over from an outer job, they would confuse the inner one.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def run_torchrun(args: Sequence[str | Path], nproc: int = 2, timeout: float = 240,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS...`` from the repository root.

    Each process gets one torch thread (``OMP_NUM_THREADS=1``: the CPUs are shared with the other process and
    with other tests); pass ``--device cpu`` to the command for the gloo backend. stdout and stderr come back
    as text, every process's interleaved. ``env`` adds or overrides variables.
    """
    base = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    full_env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def output_tail(proc: subprocess.CompletedProcess[str], chars: int = 3000) -> str:
    """The end of a finished job's stdout and stderr, for an assertion message."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-chars:]}\n--- stderr\n{proc.stderr[-chars:]}"
