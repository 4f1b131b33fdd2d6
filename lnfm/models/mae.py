"""Masked autoencoder (MAE) pretraining model around the ViT-3D encoder.

`loss, aux = mae(images, key)`: each sample hides exactly `round(N * mask_ratio)`
of its N patches (chosen by argsort of uniform noise drawn from `key`), the
encoder sees only the visible tokens, a light decoder predicts every patch and
the loss is the per-patch MSE averaged over masked patches only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models import layers
from lnfm.models.config import ModelConfig
from lnfm.models.layers import TOKENS, Block, layer_norm, linear, param, run_block
from lnfm.models.sharding import constrain
from lnfm.models.vit import ViT, vit_dims

NORM_PIX_EPS = 1e-6


def decoder_dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """(width, depth, heads, mlp_dim) of the MAE decoder; tiny defaults 64/1/4, others 512/8/16."""
    width, depth, heads = (64, 1, 4) if cfg.size == "tiny" else (512, 8, 16)
    width = cfg.decoder_width or width
    return width, cfg.decoder_depth or depth, cfg.decoder_heads or heads, cfg.decoder_mlp_dim or 4 * width


def num_visible(n_patches: int, mask_ratio: float) -> int:
    """Visible tokens per sample: N minus the exact masked count round(N * ratio)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    keep = n_patches - int(round(n_patches * mask_ratio))
    if keep < 1 or keep >= n_patches:
        raise ValueError(f"mask_ratio {mask_ratio} leaves {keep} of {n_patches} patches visible")
    return keep


def patchify(images: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """(B, X, Y, Z, C) -> (B, N, px*py*pz*C); patches in C order of the grid, voxels (px, py, pz, C) inside."""
    b, x, y, z, c = images.shape
    px, py, pz = patch
    v = images.reshape(b, x // px, px, y // py, py, z // pz, pz, c)
    v = v.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return v.reshape(b, (x // px) * (y // py) * (z // pz), px * py * pz * c)


def unpatchify(patches: jax.Array, patch: tuple[int, int, int], spatial: tuple[int, int, int],
               channels: int) -> jax.Array:
    """Inverse of `patchify`: (B, N, px*py*pz*C) -> (B, X, Y, Z, C)."""
    b = patches.shape[0]
    px, py, pz = patch
    gx, gy, gz = (s // p for s, p in zip(spatial, patch))
    v = patches.reshape(b, gx, gy, gz, px, py, pz, channels)
    v = v.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return v.reshape(b, gx * px, gy * py, gz * pz, channels)


def random_keep_ids(key: jax.Array, batch: int, n_patches: int, mask_ratio: float) -> jax.Array:
    """(B, n_keep) visible patch indices per sample: the lowest `n_keep` of per-sample uniform noise."""
    noise = jax.random.uniform(key, (batch, n_patches))
    return jnp.argsort(noise, axis=1)[:, :num_visible(n_patches, mask_ratio)]


def mask_from_keep(keep_ids: jax.Array, n_patches: int) -> jax.Array:
    """(B, N) float mask, 1 = masked (hidden from the encoder), 0 = visible."""
    visible = jnp.zeros((keep_ids.shape[0], n_patches), jnp.float32)
    visible = visible.at[jnp.arange(keep_ids.shape[0])[:, None], keep_ids].set(1.0)
    return 1.0 - visible


def patch_targets(images: jax.Array, patch: tuple[int, int, int], norm_pix: bool) -> jax.Array:
    """Reconstruction targets (B, N, P*C), per-patch standardised when `norm_pix`."""
    target = patchify(images.astype(jnp.float32), patch)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
    return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked patches of the per-patch mean squared error."""
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def reconstruct(images: jax.Array, pred: jax.Array, mask: jax.Array, patch: tuple[int, int, int],
                norm_pix: bool) -> jax.Array:
    """Volume (B, X, Y, Z, C): visible patches from `images`, masked ones from `pred`.

    With `norm_pix` the prediction is mapped back to intensities with each
    patch's own mean/std (the usual way MAE reconstructions are displayed).
    """
    source = patchify(images.astype(jnp.float32), patch)
    pred = pred.astype(jnp.float32)
    if norm_pix:
        mean = source.mean(axis=-1, keepdims=True)
        std = jnp.sqrt(source.var(axis=-1, keepdims=True) + NORM_PIX_EPS)
        pred = pred * std + mean
    merged = jnp.where(mask[..., None] > 0, pred, source)
    return unpatchify(merged, patch, images.shape[1:4], images.shape[-1])


class MAE(nnx.Module):
    """MAE: `encoder` is the ViT (its state transfers to finetuning as is) plus a light decoder."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width = vit_dims(cfg).width
        dec_width, dec_depth, dec_heads, dec_mlp = decoder_dims(cfg)
        self.patch_size = tuple(cfg.patch_size)
        self.in_channels = cfg.in_channels
        self.mask_ratio = float(cfg.mask_ratio)
        num_visible(math.prod(s // p for s, p in zip(cfg.img_size, cfg.patch_size)), self.mask_ratio)
        self.norm_pix = bool(cfg.norm_pix)
        self.remat = cfg.remat
        self.dec_width = dec_width
        self.encoder = ViT(cfg, rngs)
        self.decoder_embed = linear(width, dec_width, ("embed", "mlp"), **kw)
        init = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (1, 1, dec_width)) * 0.02
        self.mask_token = param(init.astype(param_dtype), (None, None, "embed"))
        self.decoder_blocks = nnx.List([Block(dec_width, dec_heads, dec_mlp, qkv_bias=cfg.qkv_bias, **kw)
                                        for _ in range(dec_depth)])
        self.decoder_norm = layer_norm(dec_width, **kw)
        voxels = math.prod(self.patch_size) * cfg.in_channels
        self.decoder_pred = linear(dec_width, voxels, ("embed", "patch"), **kw)

    def predict(self, images: jax.Array, keep_ids: jax.Array) -> jax.Array:
        """Predictions (B, N, P*C) for every patch given the visible indices (B, n_keep)."""
        tokens, grid = self.encoder.embed(images)
        b, n, d = tokens.shape
        visible = jnp.take_along_axis(tokens, keep_ids[..., None], axis=1)
        latent, _ = self.encoder.encode_tokens(visible)
        x = self.decoder_embed(latent)
        has_cls = self.encoder.has_cls
        vis = x[:, 1:] if has_cls else x
        full = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n, self.dec_width))
        full = full.at[jnp.arange(b)[:, None], keep_ids].set(vis)
        full = full + jnp.asarray(layers.sincos_3d(grid, self.dec_width)).astype(x.dtype)
        if has_cls:
            full = jnp.concatenate([x[:, :1], full], axis=1)
        full = constrain(full, TOKENS)
        for block in self.decoder_blocks:
            full = run_block(block, full, self.remat)
        pred = self.decoder_pred(self.decoder_norm(full))
        return pred[:, 1:] if has_cls else pred

    def __call__(self, images: jax.Array, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(B, X, Y, Z, C) images and an RNG key -> (loss, {'pred': (B, N, P*C), 'mask': (B, N) 1=masked})."""
        n = math.prod(s // p for s, p in zip(images.shape[1:4], self.patch_size))
        keep_ids = random_keep_ids(key, images.shape[0], n, self.mask_ratio)
        mask = mask_from_keep(keep_ids, n)
        pred = self.predict(images, keep_ids)
        loss = masked_mse(pred, patch_targets(images, self.patch_size, self.norm_pix), mask)
        return loss, {"pred": pred, "mask": mask}
