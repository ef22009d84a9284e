"""bench/robustness.py: every condition builds, the sweep scores the demo images, the plot is written."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from bench import robustness
from experts import create_expert, save_ensemble
from tests.conftest import ROOT


def test_every_condition_keeps_the_input_size():
    image = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    for kind, strengths in robustness.SWEEPS.items():
        for s in strengths:
            assert robustness.condition_transform(kind, s)(64)(image=image)["image"].shape == (64, 64, 3)


def test_sweep_on_the_demo_images_writes_a_table_and_a_plot(tmp_path, capsys):
    demo = pd.read_csv(ROOT / "demo" / "scores.csv")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"img_name": [str(ROOT / "demo" / n) for n in demo["img_name"]],
                  "target": [int("fake" in n) for n in demo["img_name"]]}).to_csv(labels, index=False)
    torch.manual_seed(0)
    weights = save_ensemble({"tiny": create_expert("test_efficientnet")}, tmp_path / "weights")
    png = tmp_path / "rob.png"
    robustness.main([str(labels), "--whole", "--plot", str(png), "--weights", str(weights)])
    out = capsys.readouterr().out
    assert "jpeg_quality" in out and "noise_std" in out
    assert png.stat().st_size > 5000
