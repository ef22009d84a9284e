"""Train experts jointly (CE, KL, NCE and LIB losses, an EMA each) and write the best EMA ensemble.

    python train/joint.py train/configs/recipe.yaml    # the joint recipe: 3 families on cluster folds (~1 h, 2 cores)
    python train/joint.py train/configs/default.yaml   # one Lite0 on both face sets, group split (an older default)
    python train/joint.py train/configs/smoke.yaml     # two tiny experts, a few steps: the whole loop in seconds
    python train/joint.py CONFIG --out_dir=runs/x --lr=1e-4          # any option overrides the YAML
    torchrun --nproc_per_node=4 train/joint.py CONFIG                # DistributedDataParallel, 4 GPUs

The shipped weights/ are not trained here: they are a LIB head on a frozen CLIP ViT-B/16
(train/token_cache.py, then train/heads.py; see the README's Training section). The joint recipe's two
Lite0 experts were the previous default.

What each expert trains and validates on: a group split of each labelled CSV (`train:`), or with `splits:`
the leave-one-cluster-out folds of data_prep/cluster.py (each expert validated on the cluster it never saw).
After each epoch the EMA weights are validated on images resized and re-encoded at one JPEG quality for both
classes, and the ensemble with the best mean AUC is written to OUT_DIR/weights in the format infer.py loads.
OUT_DIR/checkpoint.pt holds everything a run needs to go on: the same command again resumes an interrupted
run, and says so and does nothing when the run has finished. The loop itself is train/trainer.py.

Exit status: 0 when the run has trained (or had already finished), 2 when the config, its data or the
device cannot be used (one `error:` line names the problem).
"""
from __future__ import annotations

import shlex
import sys
from typing import Sequence

from train.config import ConfigError, check_config, load_config


def finished_message(out_dir: object, epoch: int, stopped_early: bool = False) -> str:
    """What the command says when ``out_dir`` holds a run with nothing left to do."""
    why, more = (" (stopped early: no better validation score for --patience epochs)", "--patience") \
        if stopped_early else ("", "--epochs")
    return (f"{out_dir}: training already finished at epoch {epoch}{why}; nothing to do (use --out_dir elsewhere "
            f"or delete it to retrain; a larger {more} trains on)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(argv, description=__doc__)
        check_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The heavy imports (torch, the experts) come once the options are known: --help and option errors are instant.
    from core.device import DeviceError
    from core.labels import LabelsError
    from core.distributed import is_main_process
    from train.trainer import finished_run, run

    command = "python train/joint.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        done = finished_run(cfg)
        if done is not None:
            if is_main_process():
                print(finished_message(done.out_dir, done.epoch, done.stopped_early))
            return 0
        run(cfg, command)
    except (ConfigError, DeviceError, LabelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
