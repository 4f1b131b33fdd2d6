"""UNETR / SwinUNETR-style convolutional decoder over encoder features.

Decoder levels run from full resolution (level 0) to the deepest feature stride
(level L), halving per step. Level l has `feature_size * 2**max(l-1, 0)` channels
(SwinUNETR's widths). Skips:
- level 0: a residual conv block on the input images;
- every other level that receives a feature (see `blocks.assign_levels`): a
  residual block when the feature already has that stride (Swin stages), or
  UNETR's progressive upsampling (transposed conv, then [transposed conv +
  residual block] per further step) when a ViT block output must be brought from
  the patch stride down to that level.
The deepest feature goes through a residual block (bottleneck); each up block is a
transposed conv, concatenation with the skip, and a residual block. Residual
blocks are conv3-IN-LeakyReLU-conv3-IN (+1x1 projection) as in MONAI's UnetResBlock.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.heads.blocks import (DecoderHead, assign_levels, conv, instance_norm, lrelu, step_factor,
                                      up_conv)


class ResBlock(nnx.Module):
    def __init__(self, cin, cout, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = conv(cin, cout, 3, bias=False, **kw)
        self.norm1 = instance_norm(cout, **kw)
        self.conv2 = conv(cout, cout, 3, bias=False, **kw)
        self.norm2 = instance_norm(cout, **kw)
        self.skip = conv(cin, cout, 1, bias=False, **kw) if cin != cout else None
        self.skip_norm = instance_norm(cout, **kw) if cin != cout else None

    def __call__(self, x):
        y = self.norm2(self.conv2(lrelu(self.norm1(self.conv1(x)))))
        if self.skip is not None:
            x = self.skip_norm(self.skip(x))
        return lrelu(x + y)


class ProgressiveUp(nnx.Module):
    """UNETR's PrUp block: bring a coarse grid up by the given per-step factors."""

    def __init__(self, cin, cout, factors, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.first = up_conv(cin, cout, factors[0], **kw)
        self.steps = nnx.List([nnx.List([up_conv(cout, cout, f, **kw), ResBlock(cout, cout, **kw)])
                               for f in factors[1:]])

    def __call__(self, x):
        x = self.first(x)
        for up, block in self.steps:
            x = block(up(x))
        return x


class UpBlock(nnx.Module):
    """Transposed conv to the finer level, concatenate the skip (if any), residual block."""

    def __init__(self, cin, cout, factor, has_skip, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up = up_conv(cin, cout, factor, **kw)
        self.block = ResBlock(2 * cout if has_skip else cout, cout, **kw)

    def __call__(self, x, skip):
        x = self.up(x)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return self.block(x)


class UNETRHead(DecoderHead):
    """UNETR-style decoder for ViT block outputs or SwinUNETR-style for Swin stages."""

    def __init__(self, feature_strides, feature_channels, in_channels: int, num_classes: int, *,
                 feature_size: int = 16, num_aux: int = 2, deep_supervision: bool = False, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        levels = self._layout(feature_strides, feature_channels, deep_supervision, min_depth=1)
        depth = len(levels) - 1
        ch = [feature_size * 2 ** max(lvl - 1, 0) for lvl in range(depth + 1)]
        self.level_of = tuple(assign_levels(self.feature_strides, levels))
        self.stem = ResBlock(in_channels, ch[0], **kw)
        skips = {}
        for i, lvl in enumerate(self.level_of[:-1]):
            if lvl < 0:
                continue
            native = levels.index(self.feature_strides[i])
            if native == lvl:
                skips[str(i)] = ResBlock(self.feature_channels[i], ch[lvl], **kw)
            else:
                factors = [step_factor(levels, k) for k in range(native, lvl, -1)]
                skips[str(i)] = ProgressiveUp(self.feature_channels[i], ch[lvl], factors, **kw)
        self.skips = nnx.Dict(skips)
        self.bottleneck = ResBlock(self.feature_channels[-1], ch[depth], **kw)
        skip_levels = {lvl for lvl in self.level_of[:-1] if lvl >= 0} | {0}
        self.ups = nnx.List([UpBlock(ch[lvl + 1], ch[lvl], step_factor(levels, lvl + 1), lvl in skip_levels, **kw)
                             for lvl in range(depth - 1, -1, -1)])
        self.out = conv(ch[0], num_classes, 1, **kw)
        n_aux = min(num_aux, depth - 1) if deep_supervision else 0
        self.aux_out = nnx.List([conv(ch[lvl], num_classes, 1, **kw) for lvl in range(1, n_aux + 1)])

    def __call__(self, images: jax.Array, features: Sequence[jax.Array]):
        by_level = {0: self.stem(images)}
        for key, block in self.skips.items():
            by_level[self.level_of[int(key)]] = block(features[int(key)])
        x = self.bottleneck(features[-1])
        depth = len(self.ups)
        outputs = {}
        for up, lvl in zip(self.ups, range(depth - 1, -1, -1)):
            x = up(x, by_level.get(lvl))
            outputs[lvl] = x
        return self._result(self.out(x), self.aux_out, outputs)
