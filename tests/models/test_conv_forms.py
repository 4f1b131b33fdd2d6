"""Both forms of the heads' convolutions against scipy's correlation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from lnfm.models.conv_forms import (IM2COL_MAX_COLUMNS, SLICE_MIN_VOXELS, dense_conv, depthwise_conv, im2col_conv,
                                    native_convs, plane_conv, slice_conv)


def _scipy_depthwise(x, w):  # 'SAME' zero-padded correlation per channel
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[-1]):
            out[b, ..., c] = ndimage.correlate(x[b, ..., c].astype(np.float64), w[..., 0, c], mode="constant")
    return out


def test_depthwise_forms_equal_scipy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 1, 3)).astype(np.float32)
    ref = _scipy_depthwise(x, w)
    np.testing.assert_allclose(np.asarray(depthwise_conv(x, w)), ref, atol=1e-4)
    with native_convs():
        np.testing.assert_allclose(np.asarray(depthwise_conv(x, w)), ref, atol=1e-4)


def _scipy_dense(x, w):  # 'SAME' zero-padded correlation of one volume, summed over input channels
    return np.stack([sum(ndimage.correlate(x[0, ..., i].astype(np.float64), w[..., i, o], mode="constant")
                         for i in range(w.shape[3])) for o in range(w.shape[4])], -1)[None]


def _xla_conv(x, w):  # XLA's own 3D convolution, the reference for gradients
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def test_dense_conv_equals_scipy_and_pointwise_is_a_matmul():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 6, 5, 4, 2)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(dense_conv(x, w)), _scipy_dense(x, w), atol=1e-4)
    w1 = w[1:2, 1:2, 1:2]
    np.testing.assert_allclose(np.asarray(dense_conv(x, w1)), x @ w1[0, 0, 0], atol=1e-5)


def _loss_grads(conv, x, w):
    return jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("cin, cout, k", [(2, 5, 3), (8, 8, 3), (16, 4, 3), (3, 2, 2)])
def test_dense_conv_forms_match_lax_values_and_gradients(cin, cout, k):
    # (2, 5): 54 columns, the im2col form; (8, 8) and (16, 4): the plane form; k=2: even kernel, 'SAME' pads 0/1
    rng = np.random.default_rng(cin * 10 + cout)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 6, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, k, cin, cout)) / np.sqrt(k ** 3 * cin), jnp.float32)
    expected = "im2col" if k ** 3 * cin <= IM2COL_MAX_COLUMNS else "plane"
    form = {"im2col": im2col_conv, "plane": plane_conv}[expected]
    np.testing.assert_allclose(np.asarray(jax.jit(dense_conv)(x, w)), np.asarray(jax.jit(form)(x, w)), atol=0)
    for conv in (im2col_conv, plane_conv) + ((slice_conv,) if k % 2 else ()):
        np.testing.assert_allclose(np.asarray(jax.jit(conv)(x, w)), np.asarray(_xla_conv(x, w)), rtol=1e-5, atol=1e-5)
        for ours, ref in zip(jax.jit(lambda x, w: _loss_grads(conv, x, w))(x, w), _loss_grads(_xla_conv, x, w)):
            # kernel gradients sum ~750 float32 terms in a different order: 1e-5 of their scale
            ref = np.asarray(ref)
            np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("grid", [(32, 32, 32), (23, 40, 36)])
def test_large_grids_take_the_slice_form_equal_to_scipy(grid):
    # the fine head's full-resolution block (16 -> 8 channels at 32^3 in the CPU preset) runs as 2D
    # convolutions over slices; values against scipy, gradients against XLA's own convolution.
    # (23, 40, 36): the kernel gradient's chunks of 2 X-slices leave a last chunk of 1
    assert np.prod(grid) >= SLICE_MIN_VOXELS
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, *grid, 3)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 3, 3, 2)) / 9).astype(np.float32)
    prims = [e.primitive.name for e in jax.make_jaxpr(dense_conv)(x, w).eqns]
    assert "custom_vjp_call" in prims or "custom_vjp_call_jaxpr" in prims, prims
    np.testing.assert_allclose(np.asarray(jax.jit(dense_conv)(x, w)), _scipy_dense(x, w), atol=1e-4)
    for ours, theirs in zip(jax.jit(lambda x, w: _loss_grads(dense_conv, x, w))(x, w), _loss_grads(_xla_conv, x, w)):
        theirs = np.asarray(theirs)
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-5 * max(1.0, np.abs(theirs).max()))


def test_native_convs_traces_one_native_convolution():
    x = jnp.zeros((1, 4, 4, 4, 8))
    w = jnp.zeros((3, 3, 3, 8, 8))
    def primitives(fn):  # a fresh function each time: traces are cached per function, not per context
        return [e.primitive.name for e in jax.make_jaxpr(fn)(x, w).eqns]

    assert "conv_general_dilated" not in primitives(lambda x, w: dense_conv(x, w))
    with native_convs():
        assert primitives(lambda x, w: dense_conv(x, w)) == ["conv_general_dilated"]
        # 1x1x1 kernels too: a channels-last matmul would be exported with layout transposes around it
        assert primitives(lambda x, w: dense_conv(x, w[:1, :1, :1]))[-1:] == ["conv_general_dilated"]  # after the slice
