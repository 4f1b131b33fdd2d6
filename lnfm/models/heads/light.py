"""Lightweight conv decoder (< 2M parameters on ViT-B features), after LNSNet's ideas.

Building block (`LightBlock`), residual:
  partial 3D conv (a dense 3x3x3 conv on the first `partial` fraction of the
  channels, the rest passed through untouched) -> point-wise expansion (x2) ->
  depth-wise 3x3x3 conv (`feature_group_count` = channels) -> point-wise projection.
Decoder: features at the deepest stride are concatenated and fused by a 1x1x1 conv
(for a ViT, all listed block outputs are fused there); shallower features (Swin
stages) are projected by 1x1x1 convs and added at their own stride. Each level
upsamples trilinearly (2x per axis where the stride allows), maps channels with a
1x1x1 conv, adds the skip, and applies a LightBlock. Widths are
`min(base_channels * 2**level, max_channels)`.

Boundary enhancement: a fixed 3D Sobel operator gives the gradient magnitude of
every input channel (same kernels as scipy.ndimage.sobel, edge-replicated). The
image and its edge map pass through a small full-resolution conv stem whose
output is concatenated with the level-0 decoder features, so lymph-node borders
in the input steer the final voxel logits directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.grid_ops import pad_edge
from lnfm.models.heads.blocks import DecoderHead, conv, instance_norm, lrelu, resize_to


def sobel_magnitude(images: jax.Array) -> jax.Array:
    """Per-channel 3D Sobel gradient magnitude of (B, X, Y, Z, C), border voxels replicated."""
    x = pad_edge(images.astype(jnp.float32), 1)
    n = [images.shape[a] for a in (1, 2, 3)]

    def diff(v, axis):  # [-1, 0, 1] along `axis`, keeps the one-voxel halo elsewhere
        hi = jax.lax.slice_in_dim(v, 2, n[axis - 1] + 2, axis=axis)
        lo = jax.lax.slice_in_dim(v, 0, n[axis - 1], axis=axis)
        return hi - lo

    def smooth(v, axis):  # [1, 2, 1] along `axis`
        a = jax.lax.slice_in_dim(v, 0, n[axis - 1], axis=axis)
        b = jax.lax.slice_in_dim(v, 1, n[axis - 1] + 1, axis=axis)
        c = jax.lax.slice_in_dim(v, 2, n[axis - 1] + 2, axis=axis)
        return a + 2 * b + c

    total = 0.0
    for axis in (1, 2, 3):
        g = diff(x, axis)
        for other in (1, 2, 3):
            if other != axis:
                g = smooth(g, other)
        total = total + g ** 2
    return jnp.sqrt(total).astype(images.dtype)


class PartialConv(nnx.Module):
    """Dense 3x3x3 conv over the first `n_conv` channels; the others pass through."""

    def __init__(self, channels, partial, *, rngs, dtype, param_dtype):
        self.n_conv = max(1, int(round(channels * partial)))
        self.conv = conv(self.n_conv, self.n_conv, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x[..., :self.n_conv]), x[..., self.n_conv:]], axis=-1)


class LightBlock(nnx.Module):
    """x + project(dw(expand(partial(x)))) with instance norm and LeakyReLU inside."""

    def __init__(self, channels, partial, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        hidden = 2 * channels
        self.partial = PartialConv(channels, partial, **kw)
        self.expand = conv(channels, hidden, 1, bias=False, **kw)
        self.norm1 = instance_norm(hidden, **kw)
        self.depthwise = conv(hidden, hidden, 3, groups=hidden, bias=False, **kw)
        self.norm2 = instance_norm(hidden, **kw)
        self.project = conv(hidden, channels, 1, **kw)

    def __call__(self, x):
        y = lrelu(self.norm1(self.expand(self.partial(x))))
        y = lrelu(self.norm2(self.depthwise(y)))
        return x + self.project(y)


class LightHead(DecoderHead):
    """Partial/depth-wise separable conv decoder with Sobel boundary features."""

    def __init__(self, feature_strides, feature_channels, in_channels: int, num_classes: int, *,
                 base_channels: int = 16, max_channels: int = 128, partial: float = 0.25, num_aux: int = 2,
                 deep_supervision: bool = False, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.levels = tuple(self._layout(feature_strides, feature_channels, deep_supervision))
        depth = len(self.levels) - 1
        ch = [min(base_channels * 2 ** lvl, max_channels) for lvl in range(depth + 1)]
        self.deepest = deepest = self._deepest()
        self.fuse = conv(sum(self.feature_channels[i] for i in deepest), ch[depth], 1, **kw)
        self.bottom = LightBlock(ch[depth], partial, **kw)
        skips = {}
        for i, s in enumerate(self.feature_strides):
            if i not in deepest and s in self.levels[1:]:
                skips[str(i)] = conv(self.feature_channels[i], ch[self.levels.index(s)], 1, **kw)
        self.skips = nnx.Dict(skips)
        self.reduce = nnx.List([conv(ch[lvl + 1], ch[lvl], 1, **kw) for lvl in range(depth - 1, -1, -1)])
        self.blocks = nnx.List([LightBlock(ch[lvl], partial, **kw) for lvl in range(depth - 1, 0, -1)])
        stem = ch[0]
        self.edge_stem = conv(2 * in_channels, stem, 3, **kw)
        self.edge_norm = instance_norm(stem, **kw)
        self.merge = conv(ch[0] + stem, ch[0], 1, **kw)
        self.final = LightBlock(ch[0], partial, **kw)
        self.out = conv(ch[0], num_classes, 1, **kw)
        n_aux = min(num_aux, depth - 1) if deep_supervision else 0
        self.aux_out = nnx.List([conv(ch[lvl], num_classes, 1, **kw) for lvl in range(1, n_aux + 1)])

    def __call__(self, images: jax.Array, features: Sequence[jax.Array]):
        spatial = images.shape[1:4]
        x = self.fuse(jnp.concatenate([features[i] for i in self.deepest], axis=-1))
        x = self.bottom(x)
        skip_at = {self.levels.index(self.feature_strides[int(k)]): (int(k), c) for k, c in self.skips.items()}
        depth = len(self.levels) - 1
        outputs = {}
        for step, lvl in enumerate(range(depth - 1, -1, -1)):
            grid = tuple(n // s for n, s in zip(spatial, self.levels[lvl]))
            x = self.reduce[step](resize_to(x, grid))
            if lvl in skip_at:
                i, proj = skip_at[lvl]
                x = x + proj(features[i])
            if lvl > 0:
                x = self.blocks[step](x)
                outputs[lvl] = x
        edges = jnp.concatenate([images, sobel_magnitude(images)], axis=-1)
        e = lrelu(self.edge_norm(self.edge_stem(edges)))
        x = self.final(self.merge(jnp.concatenate([x, e.astype(x.dtype)], axis=-1)))
        return self._result(self.out(x), self.aux_out, outputs)
