"""Patch augmentations against hand-derived geometry and scipy references."""

import numpy as np

from lnfm.data.augment import blur, context_size, low_resolution, noise, rotate_scale


class EdgeRng:
    """A Generator stand-in whose uniform draws return the upper limit: fixed, known angles."""

    def uniform(self, lo, hi, size=None):
        return hi if size is None else np.full(size, hi)


def test_a_90_degree_tilt_on_both_axes_turns_a_slice_axis_tube_onto_axis_1():
    # Hand-derived: tilt about axis 1 then axis 0, 90 degrees each, maps output offset (0, 2, 0)
    # to input offset (0, 0, 2), so a tube along the slice axis lies along axis 1 afterwards.
    image = np.zeros((9, 9, 9, 1), np.float32)
    image[4, 4, :, 0] = 1.0
    label = (image[..., 0] > 0).astype(np.uint8)
    img, lab = rotate_scale(image, label, (9, 9, 9), rotate_deg=0.0, scale=0.0, rng=EdgeRng(), tilt_deg=90.0)
    expected = np.zeros((9, 9, 9), np.uint8)
    expected[4, :, 4] = 1
    np.testing.assert_array_equal(lab, expected)
    np.testing.assert_allclose(img[..., 0], expected, atol=1e-6)


def test_a_tilted_patch_reads_a_context_that_holds_its_diagonal():
    assert context_size((32, 32, 32), 0.0, 0.0, tilt_deg=30.0) == (56, 56, 56)  # ceil(32 * sqrt(3))
    assert context_size((32, 32, 16), 15.0, 0.0) == (46, 46, 16)  # in-plane only: the slice axis keeps its size


def test_low_resolution_keeps_flat_regions_and_smooths_a_checkerboard():
    rng = np.random.default_rng(0)
    flat = np.full((16, 16, 16, 1), 0.3, np.float32)
    np.testing.assert_allclose(low_resolution(flat, rng, 2.0, p=1.0), flat, atol=1e-6)
    board = (np.indices((16, 16, 16)).sum(0) % 2).astype(np.float32)[..., None]
    out = low_resolution(board, np.random.default_rng(1), 2.0, p=1.0)
    assert out.shape == board.shape and out.std() < 0.5 * board.std()
    assert low_resolution(board, rng, 1.0, p=1.0) is board  # factor 1: off


def test_blur_and_noise_follow_their_settings():
    rng = np.random.default_rng(0)
    x = np.zeros((24, 24, 24, 1), np.float32)
    x[12, 12, 12, 0] = 1.0
    y = blur(x, rng, 1.5, p=1.0)
    np.testing.assert_allclose(y.sum(), 1.0, atol=1e-5)  # a Gaussian blur keeps the mass
    assert y.max() < 0.2
    flat = np.zeros((32, 32, 32, 1), np.float32)
    noisy = noise(flat, np.random.default_rng(3), 0.1, p=1.0)
    assert 0.0 < noisy.std() <= 0.1 * 1.05
    assert blur(x, rng, 0.0, p=1.0) is x and noise(x, rng, 0.0, p=1.0) is x
