"""Conv3D (the heads' convolution) equals XLA's native 3D convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lnfm.models.conv_forms import native_convs
from lnfm.models.heads.blocks import Conv3D, instance_norm


def _native(x, w, groups):
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        feature_group_count=groups, precision="highest")


@pytest.mark.parametrize("cin,cout,k,groups", [(3, 5, 3, 1), (4, 4, 3, 4), (6, 2, 1, 1), (2, 3, 2, 1)])
def test_conv3d_matches_native_convolution(cin, cout, k, groups):
    conv = Conv3D(cin, cout, k, groups=groups, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.arange(cout, dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 6, 5, cin)), jnp.float32)
    w = conv.kernel[...]
    assert w.shape == (k, k, k, cin // groups, cout)
    np.testing.assert_allclose(conv(x), _native(x, w, groups) + conv.bias[...], rtol=1e-5, atol=1e-5)

    graphdef, state = nnx.split(conv)
    bias = conv.bias[...]

    def loss_ours(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

    def loss_ref(w, x):
        return jnp.sum(jnp.sin(_native(x, w, groups) + bias))

    gs_ours, gx_ours = jax.grad(loss_ours, argnums=(0, 1))(state, x)
    gw_ref, gx_ref = jax.grad(loss_ref, argnums=(0, 1))(w, x)
    np.testing.assert_allclose(gs_ours["kernel"][...], gw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx_ours, gx_ref, rtol=1e-4, atol=1e-4)


def test_conv3d_rejects_unsupported_groups():
    with pytest.raises(ValueError, match="groups"):
        Conv3D(4, 8, 3, groups=2, rngs=nnx.Rngs(0))


def test_upconv3d_places_one_block_per_input_voxel():
    """Hand reference: output block (x*f+i, y*f+j, z*f+k) = input voxel @ kernel[i, j, k] + bias."""
    from lnfm.models.heads.blocks import UpConv3D

    up = UpConv3D(3, 2, (2, 2, 1), rngs=nnx.Rngs(0))
    up.bias[...] = jnp.asarray([0.5, -1.0])
    x = np.random.default_rng(2).normal(size=(1, 3, 2, 4, 3)).astype(np.float32)
    w = np.asarray(up.kernel[...])
    ref = np.zeros((1, 6, 4, 4, 2), np.float32)
    for a in range(3):
        for b in range(2):
            for c in range(4):
                for i in range(2):
                    for j in range(2):
                        ref[0, 2 * a + i, 2 * b + j, c] = x[0, a, b, c] @ w[i, j, 0] + np.array([0.5, -1.0])
    np.testing.assert_allclose(up(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
    with native_convs():  # the exported form: one transposed convolution, taps not mirrored
        np.testing.assert_allclose(up(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)


def test_instance_norm_export_form_equals_hand_reference_and_nnx():
    """Inside native_convs() the norm is traced in an ONNX-friendly form; both forms must equal
    the definition: per sample and channel, (x - mean) / sqrt(var + eps) * scale + bias."""
    norm = instance_norm(3, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray([0.5, 2.0, -1.0])
    norm.bias[...] = jnp.asarray([0.1, 0.0, 3.0])
    x = np.random.default_rng(3).normal(2.0, 5.0, size=(2, 4, 5, 6, 3)).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(1, 2, 3), keepdims=True), x64.var(axis=(1, 2, 3), keepdims=True)
    ref = (x64 - mean) / np.sqrt(var + 1e-5) * np.array([0.5, 2.0, -1.0]) + np.array([0.1, 0.0, 3.0])
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    with native_convs():
        np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
        primitives = {e.primitive.name for e in jax.make_jaxpr(lambda v: norm(v))(jnp.asarray(x)).eqns}
    assert "reshape" not in primitives and "squeeze" not in primitives, primitives
