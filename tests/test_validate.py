"""evaluation/validate.py: the command behind the README's AUC table."""
from __future__ import annotations

import torch

from evaluation import validate
from experts import create_expert, save_ensemble


def test_validate_prints_a_table_per_set(tmp_path, labelled_csv, capsys):
    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w")
    validate.main([str(labelled_csv), "--weights", str(weights), "--whole"])
    out = capsys.readouterr().out
    assert "all rows, 16 images (8 fake), JPEG 75" in out
    assert "| eff " in out and "| ensemble " in out and "auc" in out
    validate.main([str(labelled_csv), "--weights", str(weights), "--val-fraction", "0.5"])
    assert "validation part (50% of groups)" in capsys.readouterr().out
