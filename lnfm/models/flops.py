"""Analytic model FLOPs (matmuls and convolutions only) for MFU accounting.

A multiply-add counts as 2 FLOPs. A training step counts 3x the forward
(backward = 2x forward), the usual convention for model FLOPs utilisation.
Elementwise work (norms, softmax, GELU) is left out, so XLA's own count of a
compiled step is a little higher.
"""

from __future__ import annotations

import math

from lnfm.models.config import ModelConfig
from lnfm.models.mae import decoder_dims, num_visible
from lnfm.models.vit import token_grid, vit_dims


def block_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """Forward FLOPs of one pre-LN transformer block on `tokens` tokens."""
    qkv = 2 * tokens * width * 3 * width
    scores_and_values = 2 * 2 * tokens * tokens * width
    proj = 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * mlp_dim
    return float(qkv + scores_and_values + proj + mlp)


def _patch_voxels(cfg: ModelConfig) -> int:
    return math.prod(cfg.patch_size) * cfg.in_channels


def encoder_forward_flops(cfg: ModelConfig, batch_size: int, img_size: tuple[int, int, int] | None = None) -> float:
    """Forward FLOPs of the ViT encoder on full (unmasked) inputs of `img_size` (default cfg.img_size)."""
    dims = vit_dims(cfg)
    n = math.prod(token_grid(img_size or cfg.img_size, cfg.patch_size))
    tokens = n + int(cfg.cls_token)
    per_sample = 2 * n * _patch_voxels(cfg) * dims.width + dims.depth * block_flops(tokens, dims.width, dims.mlp_dim)
    return float(batch_size * per_sample)


def mae_forward_flops(cfg: ModelConfig, batch_size: int) -> float:
    """Forward FLOPs of the MAE: patch conv on every patch, encoder on visible tokens, decoder on all."""
    dims = vit_dims(cfg)
    dec_width, dec_depth, _, dec_mlp = decoder_dims(cfg)
    n = math.prod(token_grid(cfg.img_size, cfg.patch_size))
    cls = int(cfg.cls_token)
    enc_tokens = num_visible(n, cfg.mask_ratio) + cls
    dec_tokens = n + cls
    voxels = _patch_voxels(cfg)
    per_sample = (2 * n * voxels * dims.width
                  + dims.depth * block_flops(enc_tokens, dims.width, dims.mlp_dim)
                  + 2 * enc_tokens * dims.width * dec_width
                  + dec_depth * block_flops(dec_tokens, dec_width, dec_mlp)
                  + 2 * dec_tokens * dec_width * voxels)
    return float(batch_size * per_sample)


def train_flops_per_step(cfg: ModelConfig, batch_size: int) -> float:
    """Model FLOPs of one self-supervised training step (forward + backward = 3 x forward)."""
    if cfg.arch != "vit":
        raise ValueError(f"analytic FLOPs cover the ViT/MAE only, not arch '{cfg.arch}'")
    return 3.0 * mae_forward_flops(cfg, batch_size)
