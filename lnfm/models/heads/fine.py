"""Fine-stride decoder: encoder features plus a small convolutional path from the image.

Tokens of 8 or 16 mm are coarser than many lymph nodes (median short axis about
9 mm), so detail finer than a token must come from the image itself. As in
UNETR, a convolutional path reads the image at strides 1, 2 and 4 (up to
`conv_levels`) and hands its maps to the decoder as skips; unlike UNETR's
decoder, every step is kept cheap under XLA:CPU:

- downsampling is a strided 2x2x2 convolution written as space-to-depth plus a
  matmul, upsampling its transpose (`heads.UpConv3D`), never XLA's CPU
  (transposed) convolution;
- one dense 3x3x3 convolution per level, with few channels where the grid is
  large (`widths`, finest first; 8 at full resolution by default); with
  `top_kernel=1` the full-resolution decoder step adds a 1x1x1 projection of the
  image skip instead of a 3x3x3 convolution over the concatenation
  (`SkipAddNormAct`): a 160x160x96 window takes 0.65x the time in ONNX Runtime, at a
  measured cost in Dice (docs/finetuning.md), so no preset uses it;
- `convs_per_level` > 1 stacks more conv3-IN-LeakyReLU steps at strides 2 and up, in the
  image path and the decoder (nnU-Net uses two per stage), where a voxel costs an eighth or
  less of one at full resolution.

Encoder features: block outputs sharing the deepest stride (ViT) are concatenated
and fused by a 1x1x1 conv; features at shallower strides (Swin stages) are
projected by 1x1x1 convs and added at their own level. Each decoder level
upsamples, concatenates the conv-path skip (where there is one), adds the feature
projection (where there is one) and applies conv3-IN-LeakyReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.conv_forms import block_conv
from lnfm.models.heads.blocks import BlockConv3D, DecoderHead, conv, instance_norm, lrelu, step_factor, up_conv


class DownConv3D(BlockConv3D):
    """Convolution with kernel = stride = `factor` (non-overlapping windows), as
    space-to-depth plus one matmul (`conv_forms.block_conv`); kernel layout (*factor, cin, cout)
    like nnx.Conv's."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = block_conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class ConvNormAct(nnx.Module):
    """conv3x3x3 -> instance norm -> LeakyReLU."""

    def __init__(self, cin, cout, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv = conv(cin, cout, 3, bias=False, **kw)
        self.norm = instance_norm(cout, **kw)

    def __call__(self, x):
        return lrelu(self.norm(self.conv(x)))


class SkipAddNormAct(nnx.Module):
    """x + conv1x1x1(skip) -> instance norm -> LeakyReLU: the full-resolution decoder step with
    `top_kernel=1`. It equals a 1x1x1 conv of [x, skip] concatenated, its first half absorbed into
    the linear up-convolution that made x, without the 3x3x3 convolution at full resolution
    (about 30 % of a window's time in ONNX Runtime at 160x160x96) or the concatenation."""

    def __init__(self, channels, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.skip = conv(channels, channels, 1, bias=False, **kw)
        self.norm = instance_norm(channels, **kw)

    def __call__(self, x, skip):
        return lrelu(self.norm(x + self.skip(skip).astype(x.dtype)))


class FineHead(DecoderHead):
    """Decoder over encoder features with image skips at strides 1, 2, 4 (see module docstring)."""

    def __init__(self, feature_strides, feature_channels, in_channels: int, num_classes: int, *,
                 widths: Sequence[int] = (8, 16, 32, 64), conv_levels: int = 3, top_kernel: int = 3,
                 convs_per_level: int = 1, deep_supervision: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.levels = tuple(self._layout(feature_strides, feature_channels, deep_supervision, min_depth=1))
        depth = len(self.levels) - 1
        widths = list(widths) + [widths[-1]] * max(0, depth + 1 - len(widths))
        self.widths = tuple(int(w) for w in widths[:depth + 1])
        self.n_conv = max(1, min(conv_levels, depth))  # conv-path levels 0 .. n_conv - 1
        if top_kernel not in (1, 3):
            raise ValueError(f"top_kernel must be 1 or 3, got {top_kernel}")
        self.top_kernel = top_kernel  # 1: the full-resolution step is SkipAddNormAct
        if convs_per_level < 1:
            raise ValueError(f"convs_per_level must be at least 1, got {convs_per_level}")
        self.convs_per_level = convs_per_level
        extra = convs_per_level - 1  # more 3x3x3 convs at strides >= 2, where they are cheap
        ch = self.widths
        # Convolutional path from the image: level 0 at full resolution, then strided steps.
        path = [ConvNormAct(in_channels, ch[0], **kw)]
        for lvl in range(1, self.n_conv):
            path.append(nnx.List([DownConv3D(ch[lvl - 1], ch[lvl], step_factor(self.levels, lvl), **kw),
                                  *[ConvNormAct(ch[lvl], ch[lvl], **kw) for _ in range(1 + extra)]]))
        self.path = nnx.List(path)
        # Encoder features: the deepest-stride ones fused, shallower ones projected at their level.
        self.deepest = self._deepest()
        self.fuse = conv(sum(self.feature_channels[i] for i in self.deepest), ch[depth], 1, **kw)
        self.fuse_norm = instance_norm(ch[depth], **kw)
        proj = {}
        for i, s in enumerate(self.feature_strides):
            if i in self.deepest:
                continue
            if s not in self.levels:
                raise ValueError(f"feature stride {s} is not on the decoder's ladder {self.levels}")
            proj[str(i)] = conv(self.feature_channels[i], ch[self.levels.index(s)], 1, **kw)
        self.proj = nnx.Dict(proj)
        self.ups = nnx.List([up_conv(ch[lvl + 1], ch[lvl], step_factor(self.levels, lvl + 1), **kw)
                             for lvl in range(depth - 1, -1, -1)])
        self.blocks = nnx.List([SkipAddNormAct(ch[0], **kw) if lvl == 0 and top_kernel == 1 else
                                ConvNormAct(2 * ch[lvl] if lvl < self.n_conv else ch[lvl], ch[lvl], **kw)
                                for lvl in range(depth - 1, -1, -1)])
        # Decoder levels 1 .. depth - 1 get `extra` more conv-norm-act steps after their first (None
        # when there are none, so the parameter tree of the default head is unchanged).
        self.more = nnx.List([nnx.List([ConvNormAct(ch[lvl], ch[lvl], **kw) for _ in range(extra if lvl else 0)])
                              for lvl in range(depth - 1, -1, -1)]) if extra else None
        self.out = conv(ch[0], num_classes, 1, **kw)
        self.aux_out = nnx.List([conv(ch[lvl], num_classes, 1, **kw) for lvl in range(1, min(3, depth))]
                                if deep_supervision else [])

    def __call__(self, images: jax.Array, features: Sequence[jax.Array]):
        skips = [self.path[0](images)]
        for down, *blocks in list(self.path)[1:]:
            x = down(skips[-1])
            for block in blocks:
                x = block(x)
            skips.append(x)
        added = {self.levels.index(self.feature_strides[int(k)]): p(features[int(k)]) for k, p in self.proj.items()}
        x = lrelu(self.fuse_norm(self.fuse(jnp.concatenate([features[i] for i in self.deepest], axis=-1))))
        depth = len(self.levels) - 1
        outputs = {}
        more_blocks = self.more if self.more is not None else [()] * depth
        for up, block, more, lvl in zip(self.ups, self.blocks, more_blocks, range(depth - 1, -1, -1)):
            x = up(x)
            if lvl in added:
                x = x + added[lvl].astype(x.dtype)
            if isinstance(block, SkipAddNormAct):
                x = block(x, skips[0])
            else:
                if lvl < self.n_conv:
                    x = jnp.concatenate([x, skips[lvl].astype(x.dtype)], axis=-1)
                x = block(x)
            for extra_block in more:
                x = extra_block(x)
            outputs[lvl] = x
        return self._result(self.out(x), self.aux_out, outputs)
