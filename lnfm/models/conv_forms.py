"""The forms in which the heads' 3D convolutions are computed.

XLA:CPU runs 3D convolutions through slow generic paths, so inside JAX:

- a depth-wise kernel is a sum of shifted, scaled copies (one fused
  elementwise kernel; about 13x faster than the native op on CPU);
- a dense k^3 kernel is a matmul over gathered taps: with few input channels
  all k^3 shifted copies are concatenated and contracted in one matmul
  (im2col); otherwise the k^2 in-plane taps are concatenated, one matmul
  yields k partial outputs, and k shifted slices of it are summed (the
  concatenated copy stays k^2, not k^3, times the input). Forward + backward
  runs 1.7-2.6x faster than the native 3D convolution on CPU, more on small
  grids (bench/conv.py --dense, docs/benchmarks.md), and compiles in about the
  same time. From 32^3 voxels up, building the gathered copies costs more than
  the matmul, so a dense odd kernel runs as 2D convolutions over X-slices plus
  a shifted sum (`slice_conv`): at the fine head's 16->8 block at 2x32^3 the
  forward is about 4x and forward + backward about 1.7x faster than `plane_conv`;
  at the image stem (1->8, no input gradient) 2.6x faster than im2col.
  PyTorch's oneDNN kernels remain faster at the large grids.

- a convolution whose kernel equals its stride (the heads' down- and
  upsampling steps) is a reshape plus one matmul (`block_conv`,
  `block_conv_transpose`), never XLA's CPU (transposed) convolution.

Graph exporters want the opposite: ONNX Runtime has fast
native Conv kernels and would run 27 separate elementwise nodes slowly, so
inside `native_convs()` every convolution, 1x1x1 and strided ones included, is
one `conv_general_dilated` or `conv_transpose` (exported as one ONNX Conv or
ConvTranspose). Einsums and matmuls on channels-last tensors would be exported
with layout transposes around them that ONNX Runtime cannot cancel against its
NCDHW convolutions (1.3-1.4x of the exported network's time, docs/benchmarks.md).
Both forms compute the same function.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from lnfm.models import onednn

_NATIVE = contextvars.ContextVar("lnfm_native_convs", default=False)
_DIMS = ("NDHWC", "DHWIO", "NDHWC")


def native_enabled() -> bool:
    """True while tracing inside `native_convs()` (also read by the heads' instance norm)."""
    return _NATIVE.get()


@contextlib.contextmanager
def native_convs():
    """Trace convolutions as single native ops (for ONNX export)."""
    token = _NATIVE.set(True)
    try:
        yield
    finally:
        _NATIVE.reset(token)


IM2COL_MAX_COLUMNS = 64  # full im2col while k^3 * Cin stays this small (a stem on 1-2 image channels)
SLICE_MIN_VOXELS = 32 ** 3  # 2D convolutions over slices from this grid size up (below it gathered taps win)


def _pad_same(x: jax.Array, k: int, axes) -> jax.Array:
    lo, hi = (k - 1) // 2, k // 2
    return jnp.pad(x, [(lo, hi) if a in axes else (0, 0) for a in range(x.ndim)])


def native_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's own 'SAME' stride-1 convolution (one ONNX Conv when exported)."""
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=_DIMS)


def im2col_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """All k^3 shifted copies concatenated on the channel axis, then one matmul."""
    k, n = w.shape[0], x.shape[1:4]
    xp = _pad_same(x, k, (1, 2, 3))
    cols = jnp.concatenate([xp[:, i:i + n[0], j:j + n[1], m:m + n[2]]
                            for i in range(k) for j in range(k) for m in range(k)], axis=-1)
    return cols @ w.reshape(-1, w.shape[-1])


def _stacked_kernel(w: jax.Array) -> jax.Array:
    """(k, k, k, Cin, Cout) -> the 2D kernel (k, k, Cin, k * Cout) of the k X-taps side by side."""
    k, cin, cout = w.shape[0], w.shape[3], w.shape[4]
    return jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(k, k, cin, k * cout)


def _shifted_sum(y: jax.Array, k: int) -> jax.Array:
    """(B, X, Y, Z, k * Cout) partial sums -> (B, X, Y, Z, Cout): tap i's block shifted by i - (k-1)//2 in X."""
    nx, cout = y.shape[1], y.shape[-1] // k
    y = _pad_same(y, k, (1,))
    return sum(y[:, i:i + nx, ..., i * cout:(i + 1) * cout] for i in range(k))


def plane_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """The k^2 (Y, Z) taps concatenated, one matmul giving the k X-taps' partial outputs
    side by side, then the sum of k X-shifted slices of it."""
    k, n = w.shape[0], x.shape[1:4]
    xp = _pad_same(x, k, (2, 3))
    cols = jnp.concatenate([xp[:, :, j:j + n[1], m:m + n[2]] for j in range(k) for m in range(k)], axis=-1)
    return _shifted_sum(cols @ _stacked_kernel(w).reshape(-1, k * w.shape[-1]), k)


_DIMS_2D = ("NHWC", "HWIO", "NHWC")


def _conv2d(x: jax.Array, w2: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w2, (1, 1), "SAME", dimension_numbers=_DIMS_2D)


def _slices_forward(x: jax.Array, w: jax.Array) -> jax.Array:
    """Every X-slice through one 2D convolution whose outputs are the k X-taps' partial sums side
    by side (Cout * k channels), then the sum of k X-shifted slices of them."""
    k, (b, nx, ny, nz, c), cout = w.shape[0], x.shape, w.shape[-1]
    y = _conv2d(x.reshape(b * nx, ny, nz, c), _stacked_kernel(w)).reshape(b, nx, ny, nz, k * cout)
    return _shifted_sum(y, k)


KERNEL_GRAD_CHUNK = 4096  # positions per 2D kernel-gradient op: Eigen contracts a long sum on few threads
KERNEL_GRAD_MAX_OPS = 16  # ...but at most this many ops per convolution, to bound compile time


def _slices_kernel_grad(x: jax.Array, dy: jax.Array, w: jax.Array) -> jax.Array:
    """The kernel gradient: XLA's 2D kernel gradient over chunks of slices, summed. One op over all
    slices is a contraction of (B * X * Y * Z) terms into a tiny kernel, which XLA:CPU runs 2-3x
    slower than the same sum split into ops of ~4096 positions (at 32^3: 7 against 22 ms)."""
    k, (b, nx, ny, nz, c) = w.shape[0], x.shape
    stacked = jax.ShapeDtypeStruct(dy.shape[:-1] + (k * dy.shape[-1],), dy.dtype)
    (g,) = jax.linear_transpose(lambda y: _shifted_sum(y, k), stacked)(dy)  # dy onto the stacked outputs
    # chunks along X, never across the batch axis, which a mesh may shard
    step = max(1, KERNEL_GRAD_CHUNK // (b * ny * nz), -(-nx // KERNEL_GRAD_MAX_OPS))
    w2 = _stacked_kernel(w)

    def chunk_grad(s: int) -> jax.Array:
        xs, gs = x[:, s:s + step], g[:, s:s + step]
        n = xs.shape[0] * xs.shape[1]
        return jax.vjp(lambda w_: _conv2d(xs.reshape(n, ny, nz, c), w_), w2)[1](gs.reshape(n, ny, nz, -1))[0]

    return jax.vjp(_stacked_kernel, w)[1](sum(chunk_grad(s) for s in range(0, nx, step)))[0]


@jax.custom_vjp
def slice_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 conv with an odd k^3 kernel as 2D convolutions over X-slices. XLA:CPU's 2D
    convolution (Eigen's spatial kernel) is far faster than its 3D one or any gathered-tap matmul;
    its input gradient is the same form with the kernel mirrored (hence the custom VJP: XLA's own
    input gradient of a 2D conv is 2x slower), its kernel gradient XLA's own in chunks."""
    return _slices_forward(x, w)


def _slice_conv_fwd(x, w):
    return _slices_forward(x, w), (x, w)


def _slice_conv_bwd(res, dy):
    x, w = res
    return _slices_forward(dy, jnp.swapaxes(w[::-1, ::-1, ::-1], 3, 4)), _slices_kernel_grad(x, dy, w)


slice_conv.defvjp(_slice_conv_fwd, _slice_conv_bwd)


def dense_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 conv of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel."""
    if _NATIVE.get():
        return native_conv(x, w)
    if w.shape[:3] == (1, 1, 1):
        return x @ w[0, 0, 0]
    if w.shape[0] % 2 and onednn.usable(x, w):
        return onednn.onednn_conv(x, w)
    if w.shape[0] % 2 and x.shape[1] * x.shape[2] * x.shape[3] >= SLICE_MIN_VOXELS:
        return slice_conv(x, w)
    if w.shape[0] ** 3 * w.shape[3] <= IM2COL_MAX_COLUMNS:
        return im2col_conv(x, w)
    return plane_conv(x, w)


def depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 depth-wise conv of (B, X, Y, Z, C) with a (k, k, k, 1, C) kernel."""
    if _NATIVE.get():
        return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=_DIMS,
                                            feature_group_count=x.shape[-1])
    k = w.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    xp = jnp.pad(x, [(0, 0), (lo, hi), (lo, hi), (lo, hi), (0, 0)])
    n = x.shape[1:4]
    return sum(xp[:, i:i + n[0], j:j + n[1], m:m + n[2], :] * w[i, j, m, 0]
               for i in range(k) for j in range(k) for m in range(k))


def block_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """Convolution of (B, X, Y, Z, Cin) whose (fx, fy, fz, Cin, Cout) kernel equals its stride:
    non-overlapping windows, so a space-to-depth reshape and one matmul."""
    factor = w.shape[:3]
    if _NATIVE.get():
        return jax.lax.conv_general_dilated(x, w, factor, "VALID", dimension_numbers=_DIMS)
    b, nx, ny, nz, c = x.shape
    fx, fy, fz = factor
    x = x.reshape(b, nx // fx, fx, ny // fy, fy, nz // fz, fz, c)
    return jnp.einsum("bxiyjzkc,ijkco->bxyzo", x, w)


def block_conv_transpose(x: jax.Array, w: jax.Array) -> jax.Array:
    """Transposed convolution whose (fx, fy, fz, Cin, Cout) kernel equals its stride: every input
    voxel becomes one output block, tap (i, j, k) at offset (i, j, k) as in PyTorch's
    ConvTranspose3d (lax.conv_transpose without transpose_kernel takes the taps mirrored)."""
    factor = w.shape[:3]
    if _NATIVE.get():
        return jax.lax.conv_transpose(x, w[::-1, ::-1, ::-1], factor, "VALID", dimension_numbers=_DIMS)
    b, nx, ny, nz, _ = x.shape
    y = jnp.einsum("bxyzc,ijkco->bxiyjzko", x, w)
    return y.reshape(b, nx * factor[0], ny * factor[1], nz * factor[2], w.shape[-1])
