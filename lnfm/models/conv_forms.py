"""The forms in which the heads' 3D convolutions are computed.

XLA:CPU runs grouped 3D convolutions through a slow generic path, so inside
JAX a depth-wise kernel is a sum of shifted, scaled copies (one fused
elementwise kernel; about 13x faster than the native op on CPU, see
docs/benchmarks.md). Graph exporters want the opposite: ONNX Runtime has fast
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


def dense_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 conv of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel."""
    if w.shape[:3] == (1, 1, 1):
        return x @ w[0, 0, 0]
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=_DIMS)


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
