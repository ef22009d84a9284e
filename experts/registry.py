"""A name -> builder registry of experts, in the style of timm's ``register_model``/``create_model``.

Each family module registers one tiny builder per variant; ``create_expert(name, ...)`` looks it up, so a
new variant is one function and one cfg entry, and configs and weight manifests refer to experts by name.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

from .base import Expert, ExpertConfig

_BUILDERS: dict[str, Callable[..., Expert]] = {}
_FAMILY_BUILDERS: dict[str, Callable[..., Expert]] = {}


def register_expert(fn: Callable[..., Expert]) -> Callable[..., Expert]:
    """Decorator recording a variant builder under its function name."""
    if fn.__name__ in _BUILDERS:
        raise ValueError(f"expert {fn.__name__!r} is registered twice")
    _BUILDERS[fn.__name__] = fn
    return fn


def register_family(family: str) -> Callable[[Callable[..., Expert]], Callable[..., Expert]]:
    """Decorator recording the function that builds any expert of ``family`` from an ExpertConfig."""

    def wrap(fn: Callable[..., Expert]) -> Callable[..., Expert]:
        _FAMILY_BUILDERS[family] = fn
        return fn

    return wrap


def list_experts(pattern: str = "*") -> list[str]:
    """Registered expert names matching a shell-style pattern, sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def create_expert(name: str, pretrained: bool | str = False, **overrides: Any) -> Expert:
    """Build a registered expert.

    Args:
        name: A name from :func:`list_experts`.
        pretrained: ``False`` for random init; ``True`` to download the variant's hub weights (needs
            internet); or a path to a local weights file or folder (see each family for the formats).
        **overrides: ExpertConfig fields to change (``drop_rate``, ``frozen_stages``, ``input_size``...).
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown expert {name!r}; registered experts: {', '.join(list_experts())}")
    return _BUILDERS[name](pretrained=pretrained, **overrides)


def build_from_config(config: ExpertConfig, pretrained: bool | str = False) -> Expert:
    """Rebuild an expert from its saved config (used when loading a weights folder: no hub access)."""
    if config.family not in _FAMILY_BUILDERS:
        raise KeyError(f"unknown expert family {config.family!r}; known: {sorted(_FAMILY_BUILDERS)}")
    return _FAMILY_BUILDERS[config.family](config, pretrained=pretrained)
