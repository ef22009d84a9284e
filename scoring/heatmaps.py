"""Class-activation heat maps: where in the image each expert finds its evidence that the image is fake.

    maps = expert_heatmaps(ensemble, image_rgb)         # {expert: HxW in [0, 1], ..., "ensemble": weighted mean}
    picture = overlay(display_crop(ensemble, image_rgb), maps["ensemble"])   # RGB uint8, the crop's size
    png = heatmap_png(ensemble, image_rgb)               # the averaged overlay as PNG bytes (the web service)

The maps come from the ``grad-cam`` package (``pytorch_grad_cam``): Grad-CAM++ of the FAKE log-odds
(logit "fake" minus logit "real", the quantity the expert's fake probability is a function of) at one layer
per family (:func:`cam_layer`). Grad-CAM++ was chosen for the shipped CLIP expert by a deletion test (the
ROAD idea with a blur infill: blur away the 20..80% most, or least, relevant pixels by the map and compare
the fake log-odds): on 8 demo images and 30 random fakes of the three training sets it ranked first of
the maps tried (Grad-CAM, Grad-CAM++ and LayerCAM at this layer and at the block's output; on the demo
images also HiResCAM, XGradCAM and EigenCAM), well above a random map; LayerCAM, the runner-up, was flat
(all zero) on 10 of the 30 fakes, Grad-CAM++ here on none of them, nor on 38 other images, reals included.
A map can still be flat (no location has evidence for "fake"): it is then all zero, the overlay uniformly blue.

Each expert sees exactly what scoring gives it (``core.transforms.eval_transform`` at its input size, after
the face crop with ``crop_faces``: the same square as ``scoring.pipeline``): the **centre square of the
image** (or the face crop), so the map covers that square only, never what the crop
cut off. A map is ``min-max`` scaled to [0, 1] per image and expert (grad-cam's convention): it shows where,
relative to the rest of the square, the evidence for "fake" lies, not how strong it is (that is the score).
Maps are upsampled (bilinear) from the layer's grid to the display square: the shipped CLIP ViT-B/16 at
160 px has a 10 x 10 grid of patch tokens, so its map can be no sharper than 16-pixel patches.

Nothing about the experts changes: grad-cam's hooks and the eval mode go on a copy of the expert's module
tree that shares its tensors; parameters are read through detached views (``torch.func.functional_call``),
so no ``.grad`` is written and no ``requires_grad`` flag is touched; the one tensor given a gradient is the
target layer's output (a frozen tower has no parameter that asks for one). So the functions are safe to call
from several threads, beside scoring, with the same ensemble (a web service).
"""
from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from core.dataset import preprocess_image
from core.files import atomic_write
from core.transforms import eval_transform
from experts import Ensemble, Expert
from scoring.pipeline import face_preprocess

ENSEMBLE_KEY = "ensemble"
ALPHA = 0.45


class FakeLogOdds:
    """grad-cam target: ``logit[fake] - logit[real]`` (``log p_fake / p_real``) of one image's logits."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., 1] - logits[..., 0]


class _Logits(nn.Module):
    """What grad-cam runs: the expert's logits, computed with detached views of its parameters (no copy).

    grad-cam calls ``backward`` on the target and ``zero_grad`` on the model; with detached parameters the
    backward pass writes no ``.grad`` anywhere (it stops at the target layer's output, the one leaf that
    asks for a gradient), and ``zero_grad`` here leaves the expert's own gradients (a training run's) alone.
    """

    def __init__(self, expert: Expert):
        super().__init__()
        self.expert = expert

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        params = {name: p.detach() for name, p in self.expert.named_parameters()}
        return torch.func.functional_call(self.expert, params, (images,))[0]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: no gradient of a parameter is ever computed here."""


def cam_layer(expert: Expert) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The layer whose output Grad-CAM reads for ``expert``, and how to lay that output out as ``[B, D, h, w]``
    (``None``: it already is a feature map).

    * timm CNNs (EfficientNet, ConvNeXt): the last stage, whose map the head pools (EfficientNet's final
      1x1 conv block ``bn2``; ConvNeXt's last stage, or ``norm_pre`` where the model has one).
    * CLIP: ``layer_norm1`` of the last encoder block the head reads (block 12 of the shipped model), the
      usual choice of grad-cam's ViT examples: its patch tokens feed that block's attention and MLP, whose
      outputs every patch token (a LIB head's region means) and the class token (a linear head) are made
      of, so every patch gets a gradient. The block's own output would be the head's input itself, but
      the final LayerNorm makes the head blind to each token's scale, which cancels gradient x activation
      there. The class token is dropped and the ``h x w`` patch tokens laid out as a map (10 x 10 at 160 px).
    """
    backbone = getattr(expert, "backbone", None)
    if backbone is not None:  # a timm CNN
        if getattr(backbone, "bn2", None) is not None:
            return backbone.bn2, None
        norm_pre = getattr(backbone, "norm_pre", None)
        if norm_pre is not None and not isinstance(norm_pre, nn.Identity):
            return norm_pre, None
        stages = getattr(backbone, "stages", None)
        if stages is not None:
            return stages[-1], None
        raise ValueError(f"{expert.config.name}: no heat-map layer known for the timm model {expert.config.arch}")
    tower = getattr(expert, "tower", None)
    if tower is None:
        raise ValueError(f"{expert.config.name}: no heat-map layer known for the {expert.config.family} family")
    layers = expert.config.feature_layers or [tower.config.num_hidden_layers]
    block = tower.encoder.layers[max(layers) - 1]
    side = expert.config.input_size // tower.config.patch_size
    return block.layer_norm1, _patch_map(side)


def _patch_map(side: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ViT tokens ``[B, 1 + side * side, D]`` -> ``[B, D, side, side]``: the class token dropped, patches row-major."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        b, n, d = patches.shape
        if n != side * side:
            raise ValueError(f"{n} patch tokens do not form the expected {side}x{side} map")
        return patches.transpose(1, 2).reshape(b, d, side, side)

    return reshape


def _gradient_leaf(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the layer's output as a leaf that asks for its gradient (nothing below it needs one)."""
    return output.detach().requires_grad_(True)


def _hookable_copy(expert: Expert) -> Expert:
    """A new module tree of ``expert`` in eval mode that shares its parameters and buffers (no tensor is copied):
    grad-cam's hooks and the eval mode go on the copy, so the expert itself, which another thread may be
    scoring with or a training run updating, never sees them."""
    memo = {id(t): t for t in itertools.chain(expert.parameters(), expert.buffers())}
    return copy.deepcopy(expert, memo).eval()


def expert_map(expert: Expert, crop: np.ndarray) -> np.ndarray:
    """Grad-CAM++ of the fake log-odds for one expert: ``[S, S]`` float32 in [0, 1] over ``crop``, the
    ``[S, S, 3]`` uint8 RGB square the expert scores (``S`` its input size)."""
    from pytorch_grad_cam import GradCAMPlusPlus

    size = expert.config.input_size
    if crop.shape != (size, size, 3) or crop.dtype != np.uint8:
        raise ValueError(f"{expert.config.name}: expects a {size}x{size}x3 uint8 crop, got {crop.shape} {crop.dtype}")
    device = next(expert.parameters()).device
    images = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float().div(255).to(device)
    model = _hookable_copy(expert)
    layer, reshape = cam_layer(model)
    layer.register_forward_hook(_gradient_leaf, prepend=True)
    cam = GradCAMPlusPlus(_Logits(model), [layer], reshape_transform=reshape)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            heat = cam(images, targets=[FakeLogOdds()])[0]
    finally:
        cam.activations_and_grads.release()
    return np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)


def scored_image(ensemble: Ensemble, image_rgb: np.ndarray, crop_faces: bool = False) -> np.ndarray:
    """``image_rgb`` as scoring prepares it before each expert's resize (``core.dataset.preprocess_image``: the
    aspect limit, then with ``crop_faces`` the face crop at the largest input size; no face found: the whole
    image, whose centre square is scored)."""
    return preprocess_image(image_rgb, face_preprocess(ensemble, crop_faces))[0]


def display_crop(ensemble: Ensemble, image_rgb: np.ndarray, size: int | None = None,
                 crop_faces: bool = False) -> np.ndarray:
    """The square the maps of :func:`expert_heatmaps` lie on: what the experts score, at ``size`` pixels
    (default: the largest expert input size), ``[size, size, 3]`` uint8 RGB."""
    return eval_transform(size or max(ensemble.input_sizes))(image=scored_image(ensemble, image_rgb, crop_faces))["image"]


def expert_heatmaps(ensemble: Ensemble, image_rgb: np.ndarray, size: int | None = None,
                    crop_faces: bool = False) -> dict[str, np.ndarray]:
    """Per expert, its fake-class heat map of ``image_rgb`` (``[H, W, 3]`` uint8 RGB), ``[size, size]`` float32
    in [0, 1] over :func:`display_crop` (default ``size``: the largest expert input size); and under
    ``"ensemble"`` their mean weighted as the ensemble weights the experts' probabilities.

    Each expert's map is made on exactly the pixels scoring gives it (:func:`scored_image`, then
    ``eval_transform`` at its input size), then resized (bilinear) to ``size``."""
    if ENSEMBLE_KEY in ensemble.names:
        raise ValueError(f"an expert named {ENSEMBLE_KEY!r} would hide the averaged map")
    if ensemble.backend != "pytorch":
        raise ValueError(f"heat maps need the experts' gradients, which {ensemble.backend} experts do not give: "
                         "use the PyTorch weights folder the graphs were exported from")
    size = size or max(ensemble.input_sizes)
    image = scored_image(ensemble, image_rgb, crop_faces)
    maps: dict[str, np.ndarray] = {}
    for name, expert in ensemble.experts.items():
        heat = expert_map(expert, eval_transform(expert.config.input_size)(image=image)["image"])
        if heat.shape != (size, size):
            heat = cv2.resize(heat, (size, size), interpolation=cv2.INTER_LINEAR)
        maps[name] = np.clip(heat, 0.0, 1.0)
    weights = ensemble.weights.detach().cpu().double().numpy()
    average = sum(w * maps[name] for w, name in zip(weights, ensemble.names))
    maps[ENSEMBLE_KEY] = np.clip(average, 0.0, 1.0).astype(np.float32)
    return maps


def overlay(image_rgb: np.ndarray, heat: np.ndarray, alpha: float = ALPHA,
            colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """``heat`` (``[S, S]`` in [0, 1]) in ``colormap`` (jet: blue cold, red hot) laid over the image with
    opacity ``alpha``: ``[S, S, 3]`` uint8 RGB. ``image_rgb`` is the crop the map lies on; a whole image is
    first cut to its centre square at the map's size (``eval_transform``)."""
    if heat.ndim != 2:
        raise ValueError(f"a heat map is [H, W], got {heat.shape}")
    if image_rgb.shape[:2] != heat.shape:
        if heat.shape[0] != heat.shape[1]:
            raise ValueError(f"image {image_rgb.shape[:2]} and heat map {heat.shape} do not match")
        image_rgb = eval_transform(heat.shape[0])(image=image_rgb)["image"]
    colour = cv2.applyColorMap(np.uint8(np.round(255 * np.clip(heat, 0, 1))), colormap)[..., ::-1]
    mixed = (1 - alpha) * image_rgb.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """RGB images of one height next to each other, ``gap`` white pixels apart."""
    height = images[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for image in images:
        if image.shape[0] != height:
            raise ValueError("side_by_side needs images of one height")
        parts += [spacer, image] if parts else [image]
    return np.concatenate(parts, axis=1)


def png_bytes(image_rgb: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image_rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def heatmap_png(ensemble: Ensemble, image_rgb: np.ndarray, crop_faces: bool = False) -> bytes:
    """PNG bytes of the experts' averaged fake-class map over the square they score (``image_rgb``: ``[H, W, 3]``
    uint8 RGB, as ``core.images.load_image`` reads it)."""
    maps = expert_heatmaps(ensemble, image_rgb, crop_faces=crop_faces)
    return png_bytes(overlay(display_crop(ensemble, image_rgb, crop_faces=crop_faces), maps[ENSEMBLE_KEY]))


def heatmap_files(ensemble: Ensemble, stem: str) -> dict[str, str]:
    """The file name of each map: ``STEM.heatmap.png`` for the average, ``STEM.EXPERT.heatmap.png`` per expert."""
    return {**{name: f"{stem}.{name}.heatmap.png" for name in ensemble.names}, ENSEMBLE_KEY: f"{stem}.heatmap.png"}


def write_heatmaps(ensemble: Ensemble, image_rgb: np.ndarray, out_dir: str | Path, stem: str,
                   crop_faces: bool = False) -> list[Path]:
    """Write the overlay of every map of :func:`expert_heatmaps` into ``out_dir`` (named by :func:`heatmap_files`),
    each atomically; returns the paths, the average's first."""
    maps = expert_heatmaps(ensemble, image_rgb, crop_faces=crop_faces)
    crop = display_crop(ensemble, image_rgb, crop_faces=crop_faces)
    names = heatmap_files(ensemble, stem)
    return [atomic_write(Path(out_dir) / names[key], png_bytes(overlay(crop, maps[key])))
            for key in [ENSEMBLE_KEY, *ensemble.names]]
