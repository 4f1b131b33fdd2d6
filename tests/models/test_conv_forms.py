"""Both forms of the heads' convolutions against scipy's correlation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lnfm.models.conv_forms import dense_conv, depthwise_conv, native_convs


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


def test_dense_conv_equals_scipy_and_pointwise_is_a_matmul():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 6, 5, 4, 2)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 2, 3)).astype(np.float32)
    ref = np.zeros((1, 6, 5, 4, 3))
    for o in range(3):
        ref[0, ..., o] = sum(ndimage.correlate(x[0, ..., i].astype(np.float64), w[..., i, o], mode="constant")
                             for i in range(2))
    np.testing.assert_allclose(np.asarray(dense_conv(x, w)), ref, atol=1e-4)
    w1 = w[1:2, 1:2, 1:2]
    np.testing.assert_allclose(np.asarray(dense_conv(x, w1)), x @ w1[0, 0, 0], atol=1e-5)
