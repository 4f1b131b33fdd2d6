"""Building blocks shared by the segmentation heads: convolutions, norms, decoder stride ladders.

Every head is built from the encoder's feature layout (`feature_strides`, one
(sx, sy, sz) per feature grid, and `feature_channels`) and is called as
`head(images, features) -> logits (B, X, Y, Z, num_classes)`; with
`deep_supervision=True` it returns `(logits, [coarser logits, ...])`, finest first
(the order `lnfm.segmentation.losses.deep_supervision_loss` expects after the
full-resolution output). `images` are the (padded) encoder inputs: X, Y, Z are
multiples of the deepest feature stride.

Heads: `LinearProbe` (linear.py), `UNETRHead` (unetr.py), `LightHead` (light.py),
`FineHead` (fine.py: image skips at strides 1, 2, 4); `registry.build_head(name, ...)` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.layers import fan_in_uniform, no_eager_sharding
from lnfm.models.conv_forms import block_conv_transpose, dense_conv, depthwise_conv, native_enabled
from lnfm.models.grid_ops import integer_factors, upsample_trilinear

Stride = tuple[int, int, int]
CONV_NAMES = (None, None, None, "conv_in", "conv_out")
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_conv_init = fan_in_uniform(2.0)  # He init for (leaky) ReLU stacks


def as_stride(s) -> Stride:
    return (int(s),) * 3 if isinstance(s, int) else tuple(int(v) for v in s)


class Conv3D(nnx.Module):
    """'SAME', stride-1 3D convolution with nnx.Conv's parameter layout
    (`kernel` (k, k, k, cin // groups, cout), `bias` (cout,)).

    The form of the computation is `lnfm.models.conv_forms`': 1x1x1 kernels are a
    matmul, depth-wise kernels a sum of shifted, scaled copies (XLA's grouped 3D
    convolution is pathologically slow on CPU), dense k^3 kernels a matmul over
    gathered taps (im2col, or in-plane taps plus shifted sums); all native under
    `conv_forms.native_convs()` for export."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, groups: int = 1, bias: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        if cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} are not divisible by groups {groups}")
        if groups > 1 and (groups != cin or cout != cin):
            raise ValueError(f"only dense (groups=1) or depth-wise (groups=channels) convs, got groups={groups}")
        self.kernel_size, self.groups, self.dtype = kernel, groups, dtype
        shape = (kernel,) * 3 + (cin // groups, cout)
        with no_eager_sharding():
            self.kernel = nnx.Param(_conv_init(rngs.params(), shape, param_dtype), out_sharding=CONV_NAMES)
            self.bias = (nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=("conv_out",))
                         if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        y = depthwise_conv(x, w) if self.groups > 1 else dense_conv(x, w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def conv(cin: int, cout: int, kernel: int = 3, *, groups: int = 1, bias: bool = True, rngs: nnx.Rngs,
         dtype=jnp.float32, param_dtype=jnp.float32) -> Conv3D:
    """'SAME' 3D convolution (stride 1) with logical names on its parameters."""
    return Conv3D(cin, cout, kernel, groups=groups, bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class BlockConv3D(nnx.Module):
    """Kernel (*factor, cin, cout) and bias of a convolution whose kernel equals its stride
    (non-overlapping windows); subclasses compute it as a matmul, down (`DownConv3D`) or up."""

    def __init__(self, cin: int, cout: int, factor: Stride, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.factor, self.dtype = as_stride(factor), dtype
        with no_eager_sharding():
            self.kernel = nnx.Param(_conv_init(rngs.params(), (*self.factor, cin, cout), param_dtype),
                                    out_sharding=CONV_NAMES)
            self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=("conv_out",))


class UpConv3D(BlockConv3D):
    """Transposed convolution with kernel = stride = `factor`, kernel shape
    (*factor, cin, cout) as nnx.ConvTranspose's. The windows do not overlap, so every
    input voxel becomes one factor^3 output block (`conv_forms.block_conv_transpose`:
    a matmul and a reshape, fast on every backend; XLA's CPU transposed convolution is
    not). Tap (i, j, k) fills offset (i, j, k) of each block, as PyTorch's
    ConvTranspose3d does; lax.conv_transpose (and so nnx.ConvTranspose) without
    transpose_kernel uses the taps mirrored."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = block_conv_transpose(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


def up_conv(cin: int, cout: int, factor: Stride, *, rngs: nnx.Rngs, dtype=jnp.float32,
            param_dtype=jnp.float32) -> UpConv3D:
    """Transposed convolution with kernel = stride = `factor` (per axis)."""
    return UpConv3D(cin, cout, factor, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class InstanceNorm(nnx.InstanceNorm):
    """nnx.InstanceNorm (same parameters and values) whose exported graph ONNX Runtime can run
    in its convolutions' layout: traced inside `conv_forms.native_convs()` it is two mean
    reductions kept at rank 5 and elementwise ops, which its transpose optimiser carries
    through, where nnx's form (flattened statistics, reshapes) pins a transpose pair to every
    norm."""

    def __call__(self, x, *, mask=None):
        if not native_enabled() or mask is not None:
            return super().__call__(x, mask=mask)
        x = x.astype(self.dtype)
        axes = tuple(range(1, x.ndim - 1))
        centred = x - jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(centred * centred, axis=axes, keepdims=True)
        # scale folded into the per-channel factor first: one pass over the volume fewer (4 % of a
        # mediastinum window in ONNX Runtime)
        factor = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(self.dtype)
        return centred * factor + self.bias[...].astype(self.dtype)


def instance_norm(channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """Instance norm over X, Y, Z per sample and channel, with affine scale/bias."""
    with no_eager_sharding():
        return InstanceNorm(channels, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                            scale_init=nnx.with_partitioning(_ones, ("norm",)),
                            bias_init=nnx.with_partitioning(_zeros, ("norm",)), rngs=rngs)


def lrelu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.01)


def resize_to(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """Trilinear resize of (B, X, Y, Z, C) to the given spatial size."""
    if tuple(x.shape[1:4]) == tuple(spatial):
        return x
    factors = integer_factors(x.shape[1:4], spatial)
    if factors is not None:  # the decoders' case: same values, exportable to ONNX with a dynamic batch
        return upsample_trilinear(x, factors)
    return jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), method="trilinear")


class DecoderHead(nnx.Module):
    """What every head shares: the encoder's feature layout, the decoder levels it implies,
    which features sit at the deepest stride, and the deep-supervision return."""

    def _layout(self, feature_strides, feature_channels, deep_supervision: bool, min_depth: int = 0
                ) -> list[Stride]:
        """Record the feature layout; return the decoder levels (full resolution first)."""
        self.feature_strides = tuple(as_stride(s) for s in feature_strides)
        self.feature_channels = tuple(feature_channels)
        self.deep_supervision = deep_supervision
        levels = level_strides(self.feature_strides[-1])
        if len(levels) - 1 < min_depth:
            raise ValueError(f"{type(self).__name__} needs a deepest feature stride of at least {2 ** min_depth}")
        return levels

    def _deepest(self) -> tuple[int, ...]:
        """Indices of the features at the deepest stride (every ViT block output; Swin's last stage)."""
        return tuple(i for i, s in enumerate(self.feature_strides) if s == self.feature_strides[-1])

    def _result(self, logits: jax.Array, aux_heads, outputs: dict):
        """`logits`, or with deep supervision `(logits, [aux head k on outputs[k], k = 1, 2, ...])`."""
        if not self.deep_supervision:
            return logits
        return logits, [head(outputs[lvl]) for lvl, head in enumerate(aux_heads, start=1)]


def level_strides(deepest: Stride) -> list[Stride]:
    """Decoder levels from full resolution (1,1,1) to `deepest`, halving per axis each
    step until that axis reaches stride 1 (anisotropic strides give fewer steps there)."""
    for s in deepest:
        if s < 1 or s & (s - 1):
            raise ValueError(f"feature stride {deepest} must be powers of two")
    n = int(math.log2(max(deepest)))
    return [tuple(max(s >> (n - lvl), 1) for s in deepest) for lvl in range(n + 1)]


def step_factor(levels: list[Stride], lvl: int) -> Stride:
    """Upsampling factor per axis from level `lvl` to level `lvl - 1`."""
    return tuple(a // b for a, b in zip(levels[lvl], levels[lvl - 1]))


def assign_levels(strides: Sequence[Stride], levels: list[Stride]) -> list[int]:
    """Decoder level of each feature (-1 = unused). Features at distinct strides
    (Swin) sit at their own stride; features sharing one stride (ViT blocks) are
    spread over successively finer levels, the deepest feature staying at its stride
    and earlier ones one level finer each (UNETR)."""
    out = [-1] * len(strides)
    previous = len(levels)
    for i in range(len(strides) - 1, -1, -1):
        if strides[i] not in levels:
            raise ValueError(f"feature stride {strides[i]} is not on the decoder's ladder {levels}")
        lvl = min(levels.index(strides[i]), previous - 1)
        if lvl < 1:
            break
        out[i] = previous = lvl
    return out
