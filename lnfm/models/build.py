"""Builders of the backbones (ViT-3D, Swin) and the self-supervised models (MAE, SimMIM)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from lnfm.config import ConfigError
from lnfm.models.config import ModelConfig
from lnfm.models.mae import MAE, decoder_dims
from lnfm.models.simmim import build_simmim
from lnfm.models.swin import build_swin_encoder, swin_size
from lnfm.models.vit import ViT, vit_dims


# Keys only one backbone family reads: set on the other, they would be recorded in config.yaml and never used.
VIT_ONLY = ("depth", "heads", "mlp_dim", "cls_token", "pos_embed", "decoder_width", "decoder_depth", "decoder_heads",
            "decoder_mlp_dim", "feature_layers")
SWIN_ONLY = ("window_size", "swin_patch_size")


# Keys only masked pretraining reads (the MAE / SimMIM around the encoder); finetuning builds the encoder alone.
PRETRAIN_ONLY = ("mask_ratio", "norm_pix", "decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_dim")


def unread_keys(cfg: ModelConfig, *, finetuning: bool) -> dict[str, str]:
    """Model keys the job never reads -> why (`lnfm.config.refuse_unread`, for a value the user set: a preset,
    --quick or the --init checkpoint's config records them all). The other family's keys with a value other
    than the default are `check_model`'s."""
    unread = {}
    if cfg.arch == "swin":  # not in VIT_ONLY: finetuning's --quick sets it whatever the arch
        unread["model.patch_size"] = ("read only by the ViT backbone (Swin's is model.swin_patch_size), and "
                                      "model.arch is swin")
    if finetuning:
        unread.update({f"model.{k}": "read only by masked pretraining, not by finetuning" for k in PRETRAIN_ONLY})
    return unread


def check_model(cfg: ModelConfig) -> None:
    """Model values the types accept but no network is built from, refused before anything is written
    (the build failed with a traceback after the workdir was written): an attention width its heads do
    not divide (the ViT, the MAE decoder, each Swin stage) and feature blocks beyond the depth. Both
    training jobs run it (`lnfm.train.job.check_run_config`). A value other than the default for a key the
    other backbone family reads is refused too."""
    unread = [f"model.{k}" for k in (SWIN_ONLY if cfg.arch == "vit" else VIT_ONLY)
              if getattr(cfg, k) != getattr(ModelConfig(), k)]
    if unread:
        other = "Swin" if cfg.arch == "vit" else "ViT"
        raise ConfigError(f"{', '.join(unread)}: only the {other} backbone reads this and model.arch is {cfg.arch} "
                          f"(the run would record a value it never uses); drop it, or set model.arch")
    if cfg.arch == "vit":
        dims = vit_dims(cfg)
        beyond = [i for i in cfg.feature_layers or () if i > dims.depth]
        if beyond:
            raise ConfigError(f"model.feature_layers {list(cfg.feature_layers)}: block(s) {beyond} beyond the "
                              f"{dims.depth} blocks of model.depth")
        dec_width, _, dec_heads, _ = decoder_dims(cfg)
        widths = [("model.width", dims.width, "model.heads", dims.heads),
                  ("model.decoder_width", dec_width, "model.decoder_heads", dec_heads)]
    else:
        size = swin_size(cfg)  # stage i works at width * 2**i with its own heads
        widths = [("model.width" if i == 0 else f"Swin stage {i + 1}'s width (model.width x {2 ** i})",
                   size.feature_size * 2 ** i, f"Swin stage {i + 1}'s heads", heads)
                  for i, heads in enumerate(size.num_heads)]
    for width_key, width, heads_key, heads in widths:
        if width % heads:
            raise ConfigError(f"{width_key} {width} is not divisible by {heads_key} {heads} (each attention head "
                              f"takes an equal share of the width)")


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
