"""SimMIM masked image modelling around the Swin-3D encoder.

`loss, aux = simmim(images, key)`: the volume (zero-padded to the encoder's
multiple) is split into mask patches of the encoder's deepest stride (32 voxels
for patch 2); each sample hides exactly `round(n * mask_ratio)` of them (argsort
of uniform noise). After patch embedding, tokens inside hidden patches are
replaced by a learned mask token, so the encoder never sees their content. A
linear map of the deepest features to stride^3 * C values, unfolded back into
voxels (pixel shuffle), reconstructs the input; the loss is the L1 error averaged
over hidden voxels only.

`simmim.encoder` is a plain `SwinEncoder`: its state loads into a segmenter as is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models import layers
from lnfm.models.config import ModelConfig
from lnfm.models.layers import linear, param
from lnfm.models.swin import SwinEncoder, pad_to_multiple


def num_masked(n_patches: int, mask_ratio: float) -> int:
    """Hidden patches per sample; at least one."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    return max(1, int(round(n_patches * mask_ratio)))


def random_patch_mask(key: jax.Array, batch: int, grid: tuple[int, int, int], mask_ratio: float) -> jax.Array:
    """(B, gx, gy, gz) float mask, 1 = hidden, exactly `num_masked` ones per sample."""
    n = math.prod(grid)
    noise = jax.random.uniform(key, (batch, n))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return (rank < num_masked(n, mask_ratio)).astype(jnp.float32).reshape(batch, *grid)


def upsample_mask(mask: jax.Array, factor) -> jax.Array:
    """Repeat each mask cell `factor` (per axis) times along X, Y and Z."""
    for axis, f in enumerate(factor, start=1):
        mask = jnp.repeat(mask, f, axis=axis)
    return mask


def pixel_shuffle(x: jax.Array, stride, channels: int) -> jax.Array:
    """(B, gx, gy, gz, sx*sy*sz*C) -> (B, gx*sx, gy*sy, gz*sz, C); values per cell in
    (sx, sy, sz, C) C order."""
    b, gx, gy, gz, _ = x.shape
    sx, sy, sz = stride
    x = x.reshape(b, gx, gy, gz, sx, sy, sz, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, gx * sx, gy * sy, gz * sz, channels)


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean absolute error over voxels where mask (B, X, Y, Z) is 1, averaged over channels."""
    err = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean(-1)
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class SimMIM(nnx.Module):
    """SimMIM: `encoder` (SwinEncoder), a learned `mask_token` and a linear `pred` head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        self.encoder = SwinEncoder(cfg, rngs)
        self.mask_ratio = float(cfg.mask_ratio)
        num_masked(1, self.mask_ratio)
        self.in_channels = cfg.in_channels
        self.mask_patch = tuple(self.encoder.feature_strides[-1])
        self.token_stride = tuple(self.encoder.feature_strides[0])
        width = self.encoder.feature_channels[0]
        init = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (width,)) * 0.02
        self.mask_token = param(init.astype(param_dtype), ("embed",))
        self.pred = linear(self.encoder.feature_channels[-1], math.prod(self.mask_patch) * cfg.in_channels,
                           ("embed", "patch"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def reconstruct(self, images: jax.Array, patch_mask: jax.Array) -> jax.Array:
        """Reconstruction (B, X', Y', Z', C) of the padded volume given a (B, gx, gy, gz) patch mask."""
        tokens = self.encoder.embed(images)
        factor = tuple(m // t for m, t in zip(self.mask_patch, self.token_stride))
        hide = upsample_mask(patch_mask, factor)[..., None].astype(tokens.dtype)
        tokens = tokens * (1 - hide) + self.mask_token[...].astype(tokens.dtype) * hide
        deepest = self.encoder.features_from_tokens(tokens)[-1]
        return pixel_shuffle(self.pred(deepest), self.mask_patch, self.in_channels)

    def __call__(self, images: jax.Array, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(B, X, Y, Z, C) images and an RNG key -> (loss, aux) with aux 'pred'/'recon' the
        reconstruction (B, X, Y, Z, C) and 'mask'/'voxel_mask' the hidden voxels (B, X, Y, Z)."""
        b, spatial = images.shape[0], images.shape[1:4]
        padded = pad_to_multiple(images, self.mask_patch)
        grid = tuple(p // m for p, m in zip(padded.shape[1:4], self.mask_patch))
        patch_mask = random_patch_mask(key, b, grid, self.mask_ratio)
        recon = self.reconstruct(padded, patch_mask)[:, :spatial[0], :spatial[1], :spatial[2]]
        voxel_mask = upsample_mask(patch_mask, self.mask_patch)[:, :spatial[0], :spatial[1], :spatial[2]]
        loss = masked_l1(recon, images, voxel_mask)
        return loss, {"pred": recon, "mask": voxel_mask, "recon": recon, "voxel_mask": voxel_mask}


def build_simmim(cfg: ModelConfig, rngs: nnx.Rngs) -> SimMIM:
    """SimMIM for `cfg` (arch 'swin'); what `lnfm.models.build_ssl_model` returns."""
    return SimMIM(cfg, rngs)
