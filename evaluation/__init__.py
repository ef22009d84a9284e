"""Measurement only: validation, ensembles of experts, thresholds, held-out clusters, submissions, ablations.

The metrics themselves live one stage down, in :mod:`scoring.metrics`, because training validates with
them too; nothing below this package imports from it.
"""
