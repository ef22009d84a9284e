"""Metrics of detection scores, shared by training (validation) and scoring of submissions."""
from .metrics import detection_metrics

__all__ = ["detection_metrics"]
