"""Segmenter: a pretrained encoder plus a segmentation head.

`Segmenter(encoder, head)(images)` zero-pads (B, X, Y, Z, C) images at the far end
to a multiple of the encoder's deepest feature stride, runs `encoder.features`,
the head, and crops the logits back to (B, X, Y, Z, num_classes). With a
deep-supervision head it returns `(logits, [coarser logits, ...])`, each coarser
output cropped to ceil(size / its stride).

The encoder attribute is the same module type the SSL models hold (`mae.encoder`,
`simmim.encoder`), so `load_encoder_state(segmenter, ssl_model.encoder)` moves
pretrained weights across.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from lnfm.models import layers
from lnfm.models.build import build_encoder
from lnfm.models.config import ModelConfig
from lnfm.models.heads import HeadConfig
from lnfm.models.heads.blocks import as_stride
from lnfm.models.heads.registry import build_head
from lnfm.models.swin import pad_to_multiple


def feature_layout(encoder: nnx.Module) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(strides, channels) of `encoder.features` outputs."""
    strides = [as_stride(s) for s in encoder.feature_strides]
    channels = getattr(encoder, "feature_channels", None)
    if channels is None:  # ViT: every feature is a block output of the model width
        channels = [encoder.dims.width] * len(strides)
    return strides, list(channels)


class Segmenter(nnx.Module):
    """`encoder.features` -> `head`; see the module docstring for padding and outputs."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module):
        self.encoder = encoder
        self.head = head
        strides, _ = feature_layout(encoder)
        self.multiple = tuple(max(s[a] for s in strides) for a in range(3))

    def __call__(self, images: jax.Array):
        spatial = images.shape[1:4]
        padded = pad_to_multiple(images, self.multiple)
        out = self.head(padded, self.encoder.features(padded))
        if isinstance(out, tuple):
            logits, aux = out
            return _crop(logits, padded.shape[1:4], spatial), [_crop(a, padded.shape[1:4], spatial) for a in aux]
        return _crop(out, padded.shape[1:4], spatial)


def _crop(x: jax.Array, padded, spatial) -> jax.Array:
    """Crop an output grid of a padded volume to cover the unpadded one."""
    keep = [math.ceil(n * g / p) for n, g, p in zip(spatial, x.shape[1:4], padded)]
    return x[:, :keep[0], :keep[1], :keep[2]]


def build_segmenter(model_cfg: ModelConfig, head: str, num_classes: int, rngs: nnx.Rngs, *,
                    deep_supervision: bool = False, **head_kwargs: Any) -> Segmenter:
    """Encoder from `model_cfg` plus the named head ('unetr', 'light' or 'linear');
    extra keyword arguments go to the head (e.g. feature_size=8 for 'unetr')."""
    encoder = build_encoder(model_cfg, rngs)
    strides, channels = feature_layout(encoder)
    dtype, param_dtype = layers.dtype_of(model_cfg.dtype), layers.dtype_of(model_cfg.param_dtype)
    decoder = build_head(head, strides, channels, model_cfg.in_channels, num_classes,
                         deep_supervision=deep_supervision, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **head_kwargs)
    return Segmenter(encoder, decoder)


def segmenter_from_config(model_cfg: ModelConfig, head: HeadConfig, num_classes: int, rngs: nnx.Rngs) -> Segmenter:
    """The segmenter a finetuning config or a model.json describes (its `model` and `head` sections)."""
    return build_segmenter(model_cfg, head.kind, num_classes, rngs, deep_supervision=head.deep_supervision,
                           **head.options)


def load_encoder_state(segmenter: Segmenter, pretrained_encoder: nnx.Module | nnx.State) -> None:
    """Copy a pretrained encoder's parameters (a module such as `mae.encoder` /
    `simmim.encoder`, or its nnx.Param state) into `segmenter.encoder`; raises a clear
    error when the two encoders are built differently."""
    state = pretrained_encoder if isinstance(pretrained_encoder, nnx.State) else nnx.state(pretrained_encoder,
                                                                                               nnx.Param)
    def layout(st):
        return sorted((tuple(map(str, path)), tuple(v.shape)) for path, v in nnx.to_flat_state(st))

    if layout(state) != layout(nnx.state(segmenter.encoder, nnx.Param)):
        raise ValueError("pretrained encoder does not match the segmenter's encoder (different arch, size or "
                         "patch/window settings)")
    nnx.update(segmenter.encoder, state)
