"""Builders of the backbones (ViT-3D, Swin) and the self-supervised models (MAE, SimMIM)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from lnfm.models.config import ModelConfig
from lnfm.models.mae import MAE
from lnfm.models.simmim import build_simmim
from lnfm.models.swin import build_swin_encoder
from lnfm.models.vit import ViT


def build_encoder(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Backbone for finetuning: `.features(images)`, `.feature_strides`, `.units()`."""
    if cfg.arch == "vit":
        return ViT(cfg, rngs)
    if cfg.arch == "swin":
        return build_swin_encoder(cfg, rngs)
    raise ValueError(f"unknown model arch '{cfg.arch}' (choices: vit, swin)")


def build_ssl_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Self-supervised model called as `loss, aux = model(images, key)`: MAE (vit) or SimMIM (swin)."""
    if cfg.arch == "vit":
        return MAE(cfg, rngs)
    if cfg.arch == "swin":
        return build_simmim(cfg, rngs)
    raise ValueError(f"unknown model arch '{cfg.arch}' (choices: vit, swin)")


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the encoder for `cfg`, computed abstractly (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: build_encoder(cfg, nnx.Rngs(0)))
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
