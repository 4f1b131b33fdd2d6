"""The forms in which the heads' 3D convolutions are computed.

XLA:CPU runs 3D convolutions through slow generic paths, so inside JAX:

- a depth-wise kernel is a sum of shifted, scaled copies (one fused
  elementwise kernel; about 13x faster than the native op on CPU);
- a dense k^3 kernel is a matmul over gathered taps: with few input channels
  all k^3 shifted copies are concatenated and contracted in one matmul
  (im2col); otherwise the k^2 in-plane taps are concatenated, one matmul
  yields k partial outputs, and k shifted slices of it are summed (the
  concatenated copy stays k^2, not k^3, times the input). Forward + backward
  runs 1.7-2.6x faster than the native convolution on CPU at the heads' 32^3-64^3
  grids, more on small ones (bench/conv.py --dense, docs/benchmarks.md), and
  compiles in about the same time. PyTorch's oneDNN kernels remain 2-4x faster
  at the large grids.

Graph exporters want the opposite: ONNX Runtime has fast
native Conv kernels and would run 27 separate elementwise nodes slowly, so
inside `native_convs()` every convolution is one `conv_general_dilated`
(exported as one ONNX Conv). Both forms compute the same function.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_NATIVE = contextvars.ContextVar("lnfm_native_convs", default=False)
_DIMS = ("NDHWC", "DHWIO", "NDHWC")


@contextlib.contextmanager
def native_convs():
    """Trace convolutions as single native ops (for ONNX export)."""
    token = _NATIVE.set(True)
    try:
        yield
    finally:
        _NATIVE.reset(token)


IM2COL_MAX_COLUMNS = 64  # full im2col while k^3 * Cin stays this small (a stem on 1-2 image channels)


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


def plane_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """The k^2 (Y, Z) taps concatenated, one matmul giving the k X-taps' partial outputs
    side by side, then the sum of k X-shifted slices of it."""
    k, n = w.shape[0], x.shape[1:4]
    cout = w.shape[-1]
    xp = _pad_same(x, k, (1, 2, 3))
    cols = jnp.concatenate([xp[:, :, j:j + n[1], m:m + n[2]] for j in range(k) for m in range(k)], axis=-1)
    y = cols @ jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(k * k * w.shape[3], k * cout)
    return sum(y[:, i:i + n[0], ..., i * cout:(i + 1) * cout] for i in range(k))


def dense_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 conv of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel."""
    if w.shape[:3] == (1, 1, 1):
        return x @ w[0, 0, 0]
    if _NATIVE.get():
        return native_conv(x, w)
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
