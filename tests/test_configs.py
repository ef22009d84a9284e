"""Every shipped training config parses, names registered experts and sets only known options."""
from __future__ import annotations

import pytest

from experts import list_experts
from tests.conftest import ROOT
from train.config import load_config
from train.objective import check_loss_weights

CONFIGS = sorted((ROOT / "train" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = load_config([str(path)])
    assert cfg.experts and all(spec["name"] in list_experts() for spec in cfg.experts)
    assert cfg.train or cfg.splits
    check_loss_weights(cfg.loss_weights)
