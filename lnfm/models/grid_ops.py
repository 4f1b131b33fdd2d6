"""Grid operations written with slices and elementwise ops only.

They lower to any backend and to ONNX with a symbolic batch: jax2onnx 0.17's
lowerings of `jax.image.resize` (needs a constant batch) and of `jnp.pad(...,
mode="edge")` (pads the batch and channel axes too) do not.

`upsample_trilinear` is equal to `jax.image.resize(..., method="trilinear")` (half-pixel centres, edge
weights renormalised, which for upsampling is edge replication) when every output
size is an integer multiple of the input size. Written with slices and
elementwise ops, it runs as one fused kernel on XLA:CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _edge(x: jax.Array, axis: int, start: int, stop: int) -> jax.Array:
    return jax.lax.slice_in_dim(x, start, stop, axis=axis)


def pad_edge(x: jax.Array, width: int, axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
    """`jnp.pad(x, width, mode="edge")` along `axes` only: border values replicated."""
    for axis in axes:
        n = x.shape[axis]
        x = jnp.concatenate([_edge(x, axis, 0, 1)] * width + [x] + [_edge(x, axis, n - 1, n)] * width, axis=axis)
    return x


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """Linear upsampling of `x` along `axis` by an integer `factor`."""
    if factor == 1:
        return x
    n = x.shape[axis]
    lo = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                          jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)  # x[i - 1], edge clamped
    hi = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                          jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)  # x[i + 1], edge clamped
    phases = []
    for r in range(factor):
        d = (r + 0.5) / factor - 0.5  # output voxel f*i + r sits at input coordinate i + d
        phases.append((1 - abs(d)) * x + abs(d) * (lo if d < 0 else hi) if d else x)
    y = jnp.stack(phases, axis=axis + 1)
    return y.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1:])


def integer_factors(src: Sequence[int], dst: Sequence[int]) -> tuple[int, ...] | None:
    """Per-axis factors when every `dst` size is a positive multiple of `src`, else None."""
    if any(d < s or d % s for s, d in zip(src, dst)):
        return None
    return tuple(d // s for s, d in zip(src, dst))


def upsample_trilinear(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """(B, X, Y, Z, C) -> (B, fx*X, fy*Y, fz*Z, C), trilinear with half-pixel centres."""
    for axis, f in zip((1, 2, 3), factors):
        x = _upsample_axis(x, axis, int(f))
    return x
