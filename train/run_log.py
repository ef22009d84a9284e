"""A run's record: CSV files anyone can read with pandas, and the same numbers in TensorBoard.

``OUT_DIR/train_log.csv``  one row every ``log_every`` steps: every loss term, the learning rate, images/s
``OUT_DIR/log.csv``        one row per epoch: validation metrics per expert and for the ensemble
``OUT_DIR/tensorboard/``   both, for ``tensorboard --logdir OUT_DIR``

A resumed run appends to the same files; rows from steps after the resumed checkpoint (written before the
interrupt, then redone) are dropped first so that no step appears twice.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

TRAIN_LOG = "train_log.csv"
EPOCH_LOG = "log.csv"


class RunLog:
    """The CSV logs (and TensorBoard events) of one run in ``out_dir``, continued from ``resume_step``."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        self.out_dir = Path(out_dir)
        for name in (TRAIN_LOG, EPOCH_LOG):
            _truncate_after(self.out_dir / name, resume_step)
        self.writer = _summary_writer(self.out_dir / "tensorboard", resume_step) if tensorboard else None

    def train_step(self, step: int, values: Mapping[str, float]) -> None:
        self._append(TRAIN_LOG, {"step": step, **values})
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def epoch(self, epoch: int, step: int, values: Mapping[str, float]) -> None:
        self._append(EPOCH_LOG, {"epoch": epoch, "step": step, **values})
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"val/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        path = self.out_dir / name
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != list(row):  # a new column (e.g. a loss switched on at resume): rewrite with the union
                df = pd.concat([pd.read_csv(path), pd.DataFrame([row])], ignore_index=True)
                df.to_csv(path, index=False)
                return
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=list(row)).writerow(row)
        else:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerow(row)


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists() or not path.stat().st_size:
        return
    df = pd.read_csv(path)
    if "step" in df and (df["step"] > step).any():
        df[df["step"] <= step].to_csv(path, index=False)


def _summary_writer(folder: Path, resume_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt, but a trimmed install may lack it
        warnings.warn("tensorboard is not installed: logging to CSV only (pip install tensorboard)")
        return None
    # purge_step drops events a crashed run wrote after the checkpoint it resumes from
    return SummaryWriter(str(folder), purge_step=resume_step or None)
