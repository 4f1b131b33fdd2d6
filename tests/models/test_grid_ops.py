"""Exportable grid ops against their library references (jax.image.resize, numpy.pad)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lnfm.models.grid_ops import integer_factors, pad_edge, upsample_trilinear


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 1, 2), (16, 16, 8), (3, 1, 1)])
def test_upsampling_equals_jax_image_resize(factors):
    x = np.random.default_rng(0).standard_normal((2, 6, 5, 3, 4)).astype(np.float32)
    shape = (2, *(n * f for n, f in zip(x.shape[1:4], factors)), 4)
    ref = np.asarray(jax.image.resize(x, shape, method="trilinear"))
    np.testing.assert_allclose(np.asarray(upsample_trilinear(x, factors)), ref, atol=2e-6)


def test_integer_factors_only_for_exact_multiples():
    assert integer_factors((6, 5, 3), (12, 5, 48)) == (2, 1, 16)
    assert integer_factors((6, 5, 3), (13, 5, 3)) is None
    assert integer_factors((6, 5, 3), (3, 5, 3)) is None  # downsampling goes to jax.image.resize


def test_pad_edge_equals_numpy_edge_padding():
    x = np.random.default_rng(1).standard_normal((2, 5, 6, 7, 3)).astype(np.float32)
    for width in (1, 2):
        ref = np.pad(x, [(0, 0)] + [(width, width)] * 3 + [(0, 0)], mode="edge")
        np.testing.assert_array_equal(np.asarray(pad_edge(x, width)), ref)
