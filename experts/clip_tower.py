"""CLIP's ViT vision tower in plain torch: a faithful copy of transformers' ``CLIPVisionModel``.

Why it is written out here. Scoring one image with the shipped model (a frozen CLIP ViT-B/16 at 160 px) is
mostly start-up, not arithmetic. On the 2-core CPU this project is measured on, ``import torch`` takes about
2 s, and ``import torch`` followed by ``from transformers.models.clip import modeling_clip`` 5.3 s: transformers 5
pulls ``torch._dynamo`` and ``torch.distributed.tensor`` in on the way (its loss, masking, hub-kernel and
sharding utilities), for a model that is a convolution, 12 pre-norm transformer blocks and two LayerNorms.
With this tower, ``python infer.py IMAGE`` no longer imports transformers at all (``bench/startup.py``
measures it; ``tests/test_startup.py`` checks it).

"Copied from" ``transformers.models.clip.modeling_clip`` (v5.24), in the spirit of diffusers' copied blocks:
the same module tree, parameter names and state-dict keys (``embeddings.class_embedding``,
``embeddings.patch_embedding.weight``, ``encoder.layers.N.self_attn.q_proj.weight``, ``pre_layrnorm``
with its typo, ``post_layernorm``...), the same arithmetic (quick_gelu, SDPA with scale ``head_dim ** -0.5``,
bicubic ``interpolate_pos_encoding``), the same outputs (``last_hidden_state``, ``pooler_output`` and
``hidden_states``: the embeddings after ``pre_layrnorm``, then each block's output). So weights folders
saved over the transformers model load unchanged, and ``tests/test_clip_tower.py`` checks every output
against ``CLIPVisionModel`` itself (same state dict, 1e-5, native and interpolated sizes, quick_gelu and gelu).

transformers is still the loader of hub checkpoints and ``save_pretrained`` folders
(:func:`tower_from_pretrained`, :meth:`ClipVisionTower.save_pretrained`), imported there only.

A tower whose weights are loaded right after it is built (a base, a checkpoint) is built on the ``meta``
device and its tensors assigned (:func:`build_tower`): no time goes on a random init that is thrown away.
Every module takes ``device`` rather than running under ``with torch.device("meta")``, and no ``normal_``
runs on the meta device: either imports ``torch._dynamo`` (2 s) in torch 2.14.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipVisionConfig", "ClipVisionOutput", "ClipVisionTower", "build_tower", "tower_from_pretrained",
           "ACTIVATIONS"]

# What ExpertConfig.backbone_config records, in this order (as the transformers-based expert wrote it).
ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                     "image_size", "projection_dim", "hidden_act", "layer_norm_eps")


@dataclass
class ClipVisionConfig:
    """The architecture fields of transformers' ``CLIPVisionConfig``, with its defaults.

    ``projection_dim`` is kept for the record only (the projection to the text space is not part of the tower).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP tower: hidden_act {self.hidden_act!r} is not supported; "
                             f"known: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP tower: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClipVisionConfig":
        """From a ``backbone_config`` or a transformers config dict; keys that do not shape the tower
        (``model_type``, ``transformers_version``, ``id2label``...) are ignored, as transformers ignores them."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def architecture(self) -> dict[str, Any]:
        """The dict ``ExpertConfig.backbone_config`` stores (rebuilds this tower offline)."""
        d = asdict(self)
        return {k: d[k] for k in ARCHITECTURE_KEYS}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``QuickGELUActivation``: OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``NewGELUActivation`` (the tanh approximation, written out)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class ClipVisionOutput:
    """What ``CLIPVisionModel`` returns: ``last_hidden_state`` ``[B, 1 + h * w, D]``, ``pooler_output``
    ``[B, D]`` (the class token through ``post_layernorm``) and, when asked, ``hidden_states``: the embeddings
    after ``pre_layrnorm``, then the output of each block (``1 + num_hidden_layers`` tensors)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class ClipVisionEmbeddings(nn.Module):
    """Patch embedding, class token and learnt position embeddings (``CLIPVisionEmbeddings``).

    transformers' non-persistent ``position_ids`` buffer (``arange(num_positions)``) is left out: it is not in
    any state dict, and ``position_embedding(position_ids)`` is the embedding table itself.
    """

    def __init__(self, config: ClipVisionConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(self.embed_dim, device=device))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size, bias=False, device=device)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        # Left uninitialised (ClipVisionTower.init_weights draws it): nn.Embedding's own normal_ init would run
        # on the meta device too.
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim,
                                               _weight=torch.empty(self.num_positions, self.embed_dim, device=device))

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings ``[1, 1 + h * w, D]`` for a ``height x width`` input: the pretrained grid resized
        bicubically (``align_corners=False``) to ``(height // patch, width // patch)``, as transformers does."""
        num_patches = embeddings.shape[1] - 1
        position_embedding = self.position_embedding.weight.unsqueeze(0)
        num_positions = position_embedding.shape[1] - 1
        if num_patches == num_positions and height == width:
            return position_embedding
        class_pos_embed = position_embedding[:, :1]
        patch_pos_embed = position_embedding[:, 1:]
        dim = embeddings.shape[-1]
        new_height, new_width = height // self.patch_size, width // self.patch_size
        side = int(num_positions ** 0.5)
        patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(patch_pos_embed, size=(new_height, new_width), mode="bicubic",
                                        align_corners=False)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({self.image_size}*{self.image_size}).")
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype))  # [B, D, h, w]
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        return embeddings + self.position_embedding.weight.unsqueeze(0)


class ClipAttention(nn.Module):
    """Multi-head self-attention (``CLIPAttention``), through ``scaled_dot_product_attention``."""

    def __init__(self, config: ClipVisionConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        # Registered in transformers' order, so that state dicts list their keys alike.
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, device=device)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, device=device)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, device=device)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, device=device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.out_proj(out)


class ClipMLP(nn.Module):
    """``fc1``, the activation, ``fc2`` (``CLIPMLP``)."""

    def __init__(self, config: ClipVisionConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.activation_fn = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, device=device)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, device=device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ClipEncoderLayer(nn.Module):
    """A pre-norm transformer block (``CLIPEncoderLayer``)."""

    def __init__(self, config: ClipVisionConfig, device: torch.device | str | None = None):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = ClipAttention(config, device)
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps, device=device)
        self.mlp = ClipMLP(config, device)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps, device=device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ClipEncoder(nn.Module):
    """The stack of blocks (``CLIPEncoder``)."""

    def __init__(self, config: ClipVisionConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([ClipEncoderLayer(config, device) for _ in range(config.num_hidden_layers)])


class ClipVisionTower(nn.Module):
    """``CLIPVisionModel`` (transformers >= 5 layout: no ``vision_model`` level; a state dict in the
    transformers 4 layout, ``vision_model.*``, loads too).

    Call it as the transformers model is called: ``tower(pixel_values=x, interpolate_pos_encoding=...,
    output_hidden_states=...)`` -> :class:`ClipVisionOutput`. Built on ``device="meta"``, it holds no data
    until a state dict is loaded with ``assign=True`` (:func:`build_tower`); elsewhere it is randomly
    initialised as transformers initialises ``CLIPVisionModel``.
    """

    def __init__(self, config: ClipVisionConfig | Mapping[str, Any], device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(config, ClipVisionConfig):
            config = ClipVisionConfig.from_dict(config)
        self.config = config
        eps = config.layer_norm_eps
        self.embeddings = ClipVisionEmbeddings(config, device)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=eps, device=device)
        self.encoder = ClipEncoder(config, device)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, device=device)
        self._register_load_state_dict_pre_hook(_from_transformers4_layout)
        if not self.embeddings.class_embedding.is_meta:
            self.init_weights()

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                output_hidden_states: bool = False) -> ClipVisionOutput:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))
        states = [hidden] if output_hidden_states else None
        for layer in self.encoder.layers:
            hidden = layer(hidden)
            if states is not None:
                states.append(hidden)
        pooled = self.post_layernorm(hidden[:, 0, :])
        return ClipVisionOutput(hidden, pooled, tuple(states) if states is not None else None)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as transformers' ``CLIPPreTrainedModel._init_weights`` draws it (same distributions)."""
        cfg, factor = self.config, self.config.initializer_factor
        emb = self.embeddings
        nn.init.normal_(emb.class_embedding, mean=0.0, std=emb.embed_dim ** -0.5 * factor)
        nn.init.normal_(emb.patch_embedding.weight, std=cfg.initializer_range * factor)
        nn.init.normal_(emb.position_embedding.weight, std=cfg.initializer_range * factor)
        depth = (2 * cfg.num_hidden_layers) ** -0.5
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=attn.embed_dim ** -0.5 * depth * factor)
            nn.init.normal_(attn.out_proj.weight, std=attn.embed_dim ** -0.5 * factor)
            nn.init.normal_(mlp.fc1.weight, std=(2 * cfg.hidden_size) ** -0.5 * factor)
            nn.init.normal_(mlp.fc2.weight, std=cfg.hidden_size ** -0.5 * depth * factor)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                nn.init.zeros_(linear.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def to_transformers(self) -> Any:
        """This tower as a transformers ``CLIPVisionModel`` (imports transformers)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        model = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in asdict(self.config).items()}))
        own = model.state_dict()
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in own) else ""  # transformers < 5
        model.load_state_dict({prefix + k: v for k, v in self.state_dict().items()}, strict=True)
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a transformers ``save_pretrained`` folder (``pretrained=FOLDER`` reads it back)."""
        self.to_transformers().save_pretrained(folder)


def _from_transformers4_layout(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """State dicts of transformers 4 nest the tower in ``vision_model.``, and some kept the persistent
    ``embeddings.position_ids`` buffer: map them onto this layout (load hook)."""
    nested = prefix + "vision_model."
    for key in [k for k in state_dict if k.startswith(nested)]:
        state_dict[prefix + key[len(nested):]] = state_dict.pop(key)
    state_dict.pop(prefix + "embeddings.position_ids", None)


def build_tower(config: ClipVisionConfig | Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None,
                ) -> ClipVisionTower:
    """A tower of ``config``: random init, or, given ``state`` (its full state dict), built on the meta device
    with the tensors of ``state`` assigned, so that no random init is paid for and thrown away."""
    if state is None:
        return ClipVisionTower(config)
    tower = ClipVisionTower(config, device="meta")
    tower.load_state_dict(dict(state), strict=True, assign=True)
    for name, tensor in [*tower.named_parameters(), *tower.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(f"CLIP tower: no tensor was loaded for {name}")
    return tower


def tower_from_pretrained(source: str | Path, **config_overrides: Any) -> ClipVisionTower:
    """The tower of a hub repo id or a ``save_pretrained`` folder, loaded by transformers (imported here only)
    and copied into a :class:`ClipVisionTower`. ``num_hidden_layers`` below the checkpoint's truncates it."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(source, **config_overrides)
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return build_tower(ClipVisionConfig.from_dict(model.config.to_dict()), state)
