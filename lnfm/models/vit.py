"""3D Vision Transformer encoder (channel-last volumes) in Flax NNX.

`ViT(images)` returns the final LayerNorm-ed tokens and the raw outputs of the
blocks listed in `feature_layers` (what UNETR-style decoders consume).
Parameter names mirror MONAI's ViT closely so `lnfm.models.interop` maps one
to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models import layers
from lnfm.models.config import ModelConfig
from lnfm.models.layers import TOKENS, Block, PatchEmbed, layer_norm, param, run_block
from lnfm.models.sharding import constrain


@dataclass(frozen=True)
class ViTDims:
    width: int
    depth: int
    heads: int
    mlp_dim: int


# Preset sizes: width / depth / heads (MLP = 4 x width).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 4, 4),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}


def vit_dims(cfg: ModelConfig) -> ViTDims:
    """Encoder dimensions from the preset size and any explicit overrides."""
    if cfg.size not in SIZES:
        raise ValueError(f"unknown vit size '{cfg.size}' (choices: {', '.join(SIZES)})")
    width, depth, heads = SIZES[cfg.size]
    width = cfg.width or width
    return ViTDims(width, cfg.depth or depth, cfg.heads or heads, cfg.mlp_dim or 4 * width)


def default_feature_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced 1-based block indices ending at the last block (3/6/9/12 for depth 12)."""
    return tuple(sorted({max(1, round(depth * k / 4)) for k in range(1, 5)}))


def token_grid(spatial: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(int(n) // int(p) for n, p in zip(spatial, patch))


class Embedding(nnx.Module):
    """Patch conv + position embedding (+ optional class token): the first freezable unit."""

    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.width = width
        self.pos_type = cfg.pos_embed
        self.base_grid = token_grid(cfg.img_size, cfg.patch_size)
        self.patch = PatchEmbed(cfg.in_channels, width, cfg.patch_size, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype)
        if cfg.pos_embed == "learnable":
            n = math.prod(self.base_grid)
            init = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (n, width)) * 0.02
            self.pos_table = param(init.astype(param_dtype), ("pos", "embed"))
        elif cfg.pos_embed != "sincos":
            raise ValueError(f"unknown pos_embed '{cfg.pos_embed}' (choices: sincos, learnable)")
        if cfg.cls_token:
            init = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (1, 1, width)) * 0.02
            self.cls_token = param(init.astype(param_dtype), (None, None, "embed"))
        else:
            self.cls_token = None

    def position_table(self, grid: tuple[int, int, int]) -> jax.Array:
        """(gx*gy*gz, width) position embedding for a token grid of any size."""
        if self.pos_type == "sincos":
            return jnp.asarray(layers.sincos_3d(grid, self.width))
        return layers.resize_table(self.pos_table[...], self.base_grid, grid)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        """(B, X, Y, Z, C) -> patch tokens (B, N, D) with positions added (no class token), and the grid."""
        x = self.patch(images)
        grid = tuple(x.shape[1:4])
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.position_table(grid).astype(x.dtype)
        return constrain(x, TOKENS), grid


class ViT(nnx.Module):
    """ViT-3D encoder. Input (B, X, Y, Z, C) channel-last; patch tokens in C order of the (gx, gy, gz) grid."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dims = vit_dims(cfg)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dims = dims
        self.patch_size = tuple(cfg.patch_size)
        self.img_size = tuple(cfg.img_size)
        self.has_cls = bool(cfg.cls_token)
        self.remat = cfg.remat
        if cfg.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy '{cfg.remat}' (choices: {', '.join(layers.REMAT_POLICIES)})")
        self.feature_layers = tuple(cfg.feature_layers or default_feature_layers(dims.depth))
        bad = [i for i in self.feature_layers if not 1 <= i <= dims.depth]
        if bad:
            raise ValueError(f"feature_layers {bad} outside 1..{dims.depth}")
        self.embed = Embedding(cfg, dims.width, **kw)
        self.blocks = nnx.List([Block(dims.width, dims.heads, dims.mlp_dim, qkv_bias=cfg.qkv_bias, **kw)
                                for _ in range(dims.depth)])
        self.norm = layer_norm(dims.width, **kw)

    @property
    def feature_strides(self) -> list[tuple[int, int, int]]:
        """Voxel stride of each `features()` output grid."""
        return [self.patch_size] * len(self.feature_layers)

    def encode_tokens(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Run blocks on embedded tokens (B, T, D); prepends the class token when configured."""
        if self.embed.cls_token is not None:
            cls = jnp.broadcast_to(self.embed.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        hidden = []
        for i, block in enumerate(self.blocks, start=1):
            x = run_block(block, x, self.remat)
            if i in self.feature_layers:
                hidden.append(x)
        return self.norm(x), hidden

    def __call__(self, images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Final normalised tokens (B, T, D) (class token first if any) and the feature-layer block outputs."""
        x, _ = self.embed(images)
        return self.encode_tokens(x)

    def features(self, images: jax.Array) -> list[jax.Array]:
        """Feature-layer outputs as grids (B, gx, gy, gz, D); the last block's output is LayerNorm-ed."""
        x, grid = self.embed(images)
        final, hidden = self.encode_tokens(x)
        out = []
        for layer, h in zip(self.feature_layers, hidden):
            h = final if layer == self.dims.depth else h
            if self.has_cls:
                h = h[:, 1:]
            out.append(h.reshape(h.shape[0], *grid, h.shape[-1]))
        return out

    def units(self) -> list[nnx.Module]:
        """Ordered freezable units: [embedding, block_1, ..., block_depth, final norm]."""
        return [self.embed, *self.blocks, self.norm]
