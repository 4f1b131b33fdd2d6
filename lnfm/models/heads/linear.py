"""Linear probe: the cheapest head, a 1x1x1 conv of the deepest features to class logits."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.heads.blocks import DecoderHead, conv, resize_to, step_factor, up_conv


class LinearProbe(DecoderHead):
    """1x1x1 conv of the deepest features to class logits, then upsampling to the input
    grid: 'trilinear' (fixed interpolation) or 'transposed' (learned 2x steps)."""

    def __init__(self, feature_strides, feature_channels, in_channels: int, num_classes: int, *,
                 upsample: str = "trilinear", deep_supervision: bool = False, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        del in_channels  # the probe looks at features only
        if upsample not in ("trilinear", "transposed"):
            raise ValueError(f"unknown probe upsample '{upsample}' (choices: trilinear, transposed)")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        levels = self._layout(feature_strides, feature_channels, deep_supervision)
        self.classify = conv(self.feature_channels[-1], num_classes, 1, **kw)
        self.ups = nnx.List([up_conv(num_classes, num_classes, step_factor(levels, lvl), **kw)
                             for lvl in range(len(levels) - 1, 0, -1)] if upsample == "transposed" else [])

    def __call__(self, images: jax.Array, features: Sequence[jax.Array]):
        coarse = self.classify(features[-1])
        x = coarse
        for up in self.ups:
            x = up(x)
        logits = resize_to(x, images.shape[1:4])
        return (logits, [coarse]) if self.deep_supervision else logits
