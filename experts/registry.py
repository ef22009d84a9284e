"""A name -> builder registry of experts, in the style of timm's ``register_model``/``create_model``.

Each family module registers one tiny builder per variant; ``create_expert(name, ...)`` looks it up, so a
new variant is one function and one cfg entry, and configs and weight manifests refer to experts by name.

Families are imported lazily: :data:`FAMILY_MODULES` names the module of each, imported the first time an
expert of that family is asked for. Loading a weights folder (:func:`build_from_config`) imports only the
families it uses, so scoring with the shipped CLIP model never imports timm (and torchvision behind it);
:func:`list_experts` and an unknown name in :func:`create_expert` import them all.
"""
from __future__ import annotations

import fnmatch
import importlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .base import Expert, ExpertConfig

# family -> module that registers its variants and its family builder (imported on first use)
FAMILY_MODULES: dict[str, str] = {
    "clip": "experts.clip",
    "convnext": "experts.convnext",
    "efficientnet": "experts.efficientnet",
}

_BUILDERS: dict[str, Callable[..., Expert]] = {}
_FAMILY_BUILDERS: dict[str, Callable[..., Expert]] = {}


def import_family(family: str) -> bool:
    """Import the module of ``family`` (registering its variants); False for a family nobody declared."""
    if family in _FAMILY_BUILDERS:
        return True
    if family not in FAMILY_MODULES:
        return False
    importlib.import_module(FAMILY_MODULES[family])
    return family in _FAMILY_BUILDERS


def import_all_families() -> None:
    """Import every family module (what listing all experts needs)."""
    for family in FAMILY_MODULES:
        import_family(family)


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
    """Registered expert names matching a shell-style pattern, sorted (imports every family)."""
    import_all_families()
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def create_expert(name: str, pretrained: bool | str = False, **overrides: Any) -> Expert:
    """Build a registered expert.

    Args:
        name: A name from :func:`list_experts`.
        pretrained: ``False`` for random init; ``True`` to download the variant's hub weights (needs
            internet); or a path to a local weights file or folder (see each family for the formats).
        **overrides: ExpertConfig fields to change (``drop_rate``, ``frozen_stages``, ``input_size``...).
    """
    if name not in _BUILDERS:  # first the family its name mentions ("test_clip": clip), then all of them
        for family in FAMILY_MODULES:
            if family in name and import_family(family) and name in _BUILDERS:
                break
        else:
            import_all_families()
    if name not in _BUILDERS:
        raise KeyError(f"unknown expert {name!r}; registered experts: {', '.join(list_experts())}")
    return _BUILDERS[name](pretrained=pretrained, **overrides)


def build_from_config(config: ExpertConfig, pretrained: bool | str = False) -> Expert:
    """Rebuild an expert from its saved config (used when loading a weights folder: no hub access); imports
    the module of ``config.family`` only."""
    if not import_family(config.family):
        known = sorted(set(FAMILY_MODULES) | set(_FAMILY_BUILDERS))
        raise KeyError(f"unknown expert family {config.family!r}; known: {known}")
    return _FAMILY_BUILDERS[config.family](config, pretrained=pretrained)
