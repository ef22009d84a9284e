"""ConvNeXt experts (timm ``convnextv2_*`` and ``convnext_*``)."""
from __future__ import annotations

from typing import Any

from .base import ExpertConfig
from .registry import register_expert, register_family
from .timm_expert import TimmExpert

_CFGS: dict[str, dict[str, Any]] = {
    "convnextv2_tiny": dict(arch="convnextv2_tiny", input_size=512, hub_id="convnextv2_tiny.fcmae_ft_in22k_in1k_384"),
    "convnext_tiny": dict(arch="convnext_tiny", input_size=224, hub_id="convnext_tiny.fb_in22k_ft_in1k"),
    "convnext_atto": dict(arch="convnext_atto", input_size=224, hub_id="convnext_atto.d2_in1k"),
    "test_convnext": dict(arch="test_convnext", input_size=64),
}


@register_family("convnext")
def _build(config: ExpertConfig, pretrained: bool | str = False) -> TimmExpert:
    return TimmExpert(config, pretrained)


def _create(name: str, pretrained: bool | str, **overrides: Any) -> TimmExpert:
    return TimmExpert(ExpertConfig(name=name, family="convnext", **{**_CFGS[name], **overrides}), pretrained)


@register_expert
def convnextv2_tiny(pretrained: bool | str = False, **overrides: Any) -> TimmExpert:
    """ConvNeXt-V2 tiny at 512 px, the ConvNeXt of the original solution."""
    return _create("convnextv2_tiny", pretrained, **overrides)


@register_expert
def convnext_tiny(pretrained: bool | str = False, **overrides: Any) -> TimmExpert:
    """ConvNeXt tiny at 224 px."""
    return _create("convnext_tiny", pretrained, **overrides)


@register_expert
def convnext_atto(pretrained: bool | str = False, **overrides: Any) -> TimmExpert:
    """ConvNeXt atto (3.7 M parameters) at 224 px: small enough to train on a CPU."""
    return _create("convnext_atto", pretrained, **overrides)


@register_expert
def test_convnext(pretrained: bool | str = False, **overrides: Any) -> TimmExpert:
    """Tiny random ConvNeXt for tests."""
    return _create("test_convnext", pretrained, **overrides)
