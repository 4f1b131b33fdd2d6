"""Swin-3D encoder (SwinUNETR's `swinViT` design) on channel-last volumes.

Patch embedding (stride-2 conv), four stages of windowed self-attention blocks
(every second block shifts its windows by half a window) each followed by patch
merging. `features(images)` returns the layer-normalised hidden states at strides
2, 4, 8, 16 and 32, exactly like MONAI's `SwinUNETR.swinViT`; MONAI weights load
one to one (tests/models/test_swin.py checks the forward against MONAI).

Layout: images (B, X, Y, Z, C); MONAI's (B, C, D, H, W) maps D->X, H->Y, W->Z.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lnfm.models import layers
from lnfm.models.config import ModelConfig
from lnfm.models.layers import LN_EPS, MLP, PatchEmbed, layer_norm, linear, param, run_block

MLP_RATIO = 4  # MLP hidden width / stage width
MASK_NEG = -1e9  # logit added where the shifted-window mask forbids attention


@dataclass(frozen=True)
class SwinSize:
    feature_size: int  # channels after patch embedding; stage i works at feature_size * 2**i
    depths: tuple[int, ...]  # blocks per stage
    num_heads: tuple[int, ...]  # attention heads per stage


# Preset sizes (ModelConfig.size with arch="swin"); the window comes from ModelConfig.window_size.
SWIN_SIZES = {
    "tiny": SwinSize(12, (2, 2, 2, 2), (3, 6, 12, 24)),
    "s": SwinSize(24, (2, 2, 2, 2), (3, 6, 12, 24)),
    "b": SwinSize(48, (2, 2, 2, 2), (3, 6, 12, 24)),
}


def effective_window(dims, window, shift):
    """Window and shift actually used on a grid: an axis no longer than the window
    gets one window spanning it and no shift (as in Video Swin / SwinUNETR)."""
    w, s = list(window), list(shift)
    for i, d in enumerate(dims):
        if d <= window[i]:
            w[i], s[i] = d, 0
    return tuple(w), tuple(s)


def window_partition(x: jax.Array, window) -> jax.Array:
    """(B, X, Y, Z, C) -> (B, nW, N, C) with windows in raster order and tokens of a
    window in raster order; every spatial size must be a multiple of the window."""
    b, gx, gy, gz, c = x.shape
    wx, wy, wz = window
    x = x.reshape(b, gx // wx, wx, gy // wy, wy, gz // wz, wz, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, wx * wy * wz, c)


def window_reverse(windows: jax.Array, window, dims) -> jax.Array:
    """Inverse of `window_partition` for a grid of spatial size `dims`."""
    b, _, _, c = windows.shape
    wx, wy, wz = window
    gx, gy, gz = dims
    x = windows.reshape(b, gx // wx, gy // wy, gz // wz, wx, wy, wz, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, gx, gy, gz, c)


def shifted_window_mask(dims, window, shift) -> np.ndarray:
    """Boolean (nW, N, N): True where query and key token of a window may attend.

    After rolling the grid by -shift, a window at the far edge holds tokens that were
    not neighbours before the roll (wrapped around); each axis splits into three
    regions [0, D-w), [D-w, D-s), [D-s, D) and only tokens of the same region
    combination may attend to each other."""
    region = np.zeros((1, *dims, 1), np.int32)
    label = 0
    cuts = [((0, d - w), (d - w, d - s), (d - s, d)) for d, w, s in zip(dims, window, shift)]
    for (x0, x1), (y0, y1), (z0, z1) in itertools.product(*cuts):
        region[:, x0:x1, y0:y1, z0:z1] = label
        label += 1
    ids = np.asarray(window_partition(region, window))[0, :, :, 0]  # (nW, N)
    return ids[:, :, None] == ids[:, None, :]


def relative_position_index(window) -> np.ndarray:
    """(N, N) index into the (2wx-1)(2wy-1)(2wz-1) bias table for a full window."""
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij")).reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel = rel + np.asarray(window) - 1
    wx, wy, wz = window
    return rel[..., 0] * (2 * wy - 1) * (2 * wz - 1) + rel[..., 1] * (2 * wz - 1) + rel[..., 2]


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim, num_heads, window, *, qkv_bias, rngs, dtype, param_dtype):
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by {num_heads} heads")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = num_heads
        self.window = tuple(window)
        self.qkv = linear(dim, 3 * dim, ("embed", "qkv"), bias=qkv_bias, **kw)
        self.proj = linear(dim, dim, ("heads", "embed"), **kw)
        rows = int(np.prod([2 * w - 1 for w in self.window]))
        table = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (rows, num_heads)) * 0.02
        self.relative_position_bias_table = param(table.astype(param_dtype), (None, None))

    def __call__(self, windows: jax.Array, allowed: np.ndarray | None) -> jax.Array:
        """windows (B, nW, N, C); allowed (nW, N, N) boolean or None."""
        b, nw, n, c = windows.shape
        h = self.num_heads
        qkv = self.qkv(windows).reshape(b, nw, n, 3, h, c // h)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * (c // h) ** -0.5, k).astype(jnp.float32)
        # A window shrunk to a small grid reuses the first n rows/columns of the full
        # window's index (SwinUNETR / Video Swin behaviour, kept for weight compatibility).
        index = relative_position_index(self.window)[:n, :n]
        bias = self.relative_position_bias_table[...][index.reshape(-1)].reshape(n, n, h)
        logits = logits + bias.transpose(2, 0, 1).astype(jnp.float32)
        if allowed is not None:
            logits = jnp.where(allowed[None, :, None], logits, MASK_NEG)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(b, nw, n, c)
        return self.proj(out)


class SwinBlock(nnx.Module):
    """Pre-norm block: (shifted) window attention then MLP, each with a residual."""

    def __init__(self, dim, num_heads, window, shifted, *, qkv_bias, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.window = tuple(window)
        self.shift = tuple(w // 2 for w in window) if shifted else (0, 0, 0)
        self.norm1 = layer_norm(dim, **kw)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, **kw)
        self.norm2 = layer_norm(dim, **kw)
        self.mlp = MLP(dim, MLP_RATIO * dim, **kw)

    def attend(self, x: jax.Array) -> jax.Array:
        dims = x.shape[1:4]
        window, shift = effective_window(dims, self.window, self.shift)
        pad = [(0, (-d) % w) for d, w in zip(dims, window)]
        # Padded tokens are zeros after the norm and are attended to, as in SwinUNETR.
        x = jnp.pad(x, [(0, 0), *pad, (0, 0)])
        padded = x.shape[1:4]
        shifted = any(shift)
        if shifted:
            x = jnp.roll(x, [-s for s in shift], axis=(1, 2, 3))
        allowed = shifted_window_mask(padded, window, shift) if shifted else None
        out = window_reverse(self.attn(window_partition(x, window), allowed), window, padded)
        if shifted:
            out = jnp.roll(out, shift, axis=(1, 2, 3))
        return out[:, :dims[0], :dims[1], :dims[2]]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nnx.Module):
    """2x downsampling: concatenate each 2x2x2 neighbourhood (SwinUNETR's v0.9 order),
    layer-norm, then a linear map 8C -> 2C."""

    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))

    def __init__(self, dim, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = layer_norm(8 * dim, **kw)
        self.reduction = linear(8 * dim, 2 * dim, ("mlp", "embed"), bias=False, **kw)

    def __call__(self, x):
        dims = x.shape[1:4]
        x = jnp.pad(x, [(0, 0), *[(0, d % 2) for d in dims], (0, 0)])
        x = jnp.concatenate([x[:, i::2, j::2, k::2] for i, j, k in self.OFFSETS], axis=-1)
        return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
    """`depth` blocks alternating plain and shifted windows, then patch merging."""

    def __init__(self, dim, depth, num_heads, window, remat, *, qkv_bias, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat
        self.blocks = nnx.List([SwinBlock(dim, num_heads, window, i % 2 == 1, qkv_bias=qkv_bias, **kw)
                                for i in range(depth)])
        self.downsample = PatchMerging(dim, **kw)

    def __call__(self, x):
        for block in self.blocks:
            x = run_block(block, x, self.remat)
        return self.downsample(x)


def _normalize(x: jax.Array) -> jax.Array:
    """Affine-free layer norm over channels (SwinUNETR's `proj_out(normalize=True)`)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + LN_EPS)).astype(x.dtype)


def swin_size(cfg: ModelConfig) -> SwinSize:
    """Stage layout from the preset size; `cfg.width` overrides the feature size."""
    if cfg.size not in SWIN_SIZES:
        raise ValueError(f"unknown swin size '{cfg.size}' (choices: {', '.join(SWIN_SIZES)})")
    spec = SWIN_SIZES[cfg.size]
    return SwinSize(cfg.width or spec.feature_size, spec.depths, spec.num_heads)


class SwinEncoder(nnx.Module):
    """Hierarchical Swin-3D encoder returning five feature grids (strides 2..32 for patch 2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, normalize: bool = True):
        size = swin_size(cfg)
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if cfg.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy '{cfg.remat}' (choices: {', '.join(layers.REMAT_POLICIES)})")
        patch = tuple(int(p) for p in cfg.swin_patch_size)
        n = len(size.depths)
        self.normalize = normalize
        self.feature_strides = tuple(tuple(p * 2 ** i for p in patch) for i in range(n + 1))
        self.feature_channels = tuple(size.feature_size * 2 ** i for i in range(n + 1))
        self.input_multiple = self.feature_strides[-1]
        self.patch_embed = PatchEmbed(cfg.in_channels, size.feature_size, patch, **kw)
        self.stages = nnx.List([
            SwinStage(size.feature_size * 2 ** i, d, h, cfg.window_size, cfg.remat, qkv_bias=cfg.qkv_bias, **kw)
            for i, (d, h) in enumerate(zip(size.depths, size.num_heads))])

    def units(self) -> list[nnx.Module]:
        """Freezable units in input-to-output order: patch embedding, then each stage."""
        return [self.patch_embed, *self.stages]

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens (B, gx, gy, gz, feature_size) of images zero-padded to `input_multiple`."""
        return self.patch_embed(pad_to_multiple(images, self.input_multiple))

    def features_from_tokens(self, tokens: jax.Array) -> list[jax.Array]:
        """Stage outputs from patch tokens (lets SimMIM swap in mask tokens in between)."""
        out = [tokens]
        x = tokens
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return [_normalize(f) for f in out] if self.normalize else out

    def features(self, images: jax.Array) -> list[jax.Array]:
        """images (B, X, Y, Z, C) -> [(B, gx, gy, gz, C_i) at each of `feature_strides`];
        the input is zero-padded at the far end to a multiple of `input_multiple` first."""
        return self.features_from_tokens(self.embed(images))

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        return self.features(images)


def pad_to_multiple(x: jax.Array, multiple) -> jax.Array:
    """Zero-pad the spatial axes of (B, X, Y, Z, C) at the far end to multiples of `multiple`
    (an int or one int per axis)."""
    mult = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    pad = [(0, (-d) % m) for d, m in zip(x.shape[1:4], mult)]
    if not any(p for _, p in pad):
        return x
    return jnp.pad(x, [(0, 0), *pad, (0, 0)])


def build_swin_encoder(cfg: ModelConfig, rngs: nnx.Rngs) -> SwinEncoder:
    """Swin encoder for `cfg` (arch 'swin'); what `lnfm.models.build_encoder` returns."""
    return SwinEncoder(cfg, rngs)
