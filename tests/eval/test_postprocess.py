"""Post-processing: small-component removal, body mask, restriction to the body."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lnfm.eval.postprocess import body_mask_from_ct, remove_small_components, restrict_to_body


def test_remove_small_components_by_physical_volume():
    mask = np.zeros((30, 30, 10), bool)
    mask[2:5, 2:5, 2:4] = True  # 18 voxels
    mask[10:20, 10:20, 2:6] = True  # 400 voxels
    mask[25, 25, 8] = mask[26, 26, 9] = True  # two voxels touching at a corner: one 26-component
    sp = (0.5, 0.5, 2.0)  # 0.5 mm^3 per voxel
    out = remove_small_components(mask, sp, min_volume_mm3=9.0)
    expected = mask.copy()
    expected[25:27, 25:27, 8:10] = False
    np.testing.assert_array_equal(out, expected)  # 18 voxels = 9 mm^3 stays
    out = remove_small_components(mask, sp, min_volume_mm3=9.5)
    np.testing.assert_array_equal(out, np.pad(np.ones((10, 10, 4), bool), ((10, 10), (10, 10), (2, 4))))
    # With 6-connectivity the corner-touching pair is two 1-voxel components.
    only_pair = np.zeros_like(mask)
    only_pair[25, 25, 8] = only_pair[26, 26, 9] = True
    assert remove_small_components(only_pair, (1, 1, 1), 2.0).sum() == 2
    assert remove_small_components(only_pair, (1, 1, 1), 2.0, connectivity=6).sum() == 0
    assert not remove_small_components(np.zeros((4, 4, 4)), sp, 1.0).any()


def phantom():
    """Soft-tissue ellipsoid (40 HU) in air with an air 'lung' open to the outside at the top,
    plus a dense object (a table) apart from the body."""
    hu = np.full((60, 50, 30), -1000, np.int16)
    x, y, z = np.meshgrid(np.arange(60), np.arange(50), np.arange(30), indexing="ij")
    body = ((x - 30) / 25) ** 2 + ((y - 25) / 18) ** 2 <= 1
    hu[body] = 40
    lung = ((x - 30) / 10) ** 2 + ((y - 25) / 8) ** 2 <= 1
    hu[lung & (z >= 5)] = -850  # reaches the top slice: open in 3D, enclosed in each axial slice
    hu[:, 46:48, :] = 200  # table, not touching the body
    return hu, body


def test_body_mask_fills_lungs_and_drops_the_table():
    hu, body = phantom()
    np.testing.assert_array_equal(body_mask_from_ct(hu), body)
    assert not body_mask_from_ct(np.full((5, 5, 5), -1000)).any()


def test_body_mask_on_real_ct(shared_data):
    img = nib.load(shared_data / "ct" / "totalsegmentator" / "example_ct.nii.gz")
    hu = np.asarray(img.dataobj)
    body = body_mask_from_ct(hu)
    assert body.any()
    # One connected body, no air hole inside any axial slice, covering most tissue voxels.
    assert ndimage.label(body)[1] == 1
    for z in range(0, body.shape[2], 10):
        np.testing.assert_array_equal(ndimage.binary_fill_holes(body[:, :, z]), body[:, :, z])
    tissue = hu > -500
    assert (body & tissue).sum() / tissue.sum() > 0.9
    assert (hu[body] > -500).mean() > 0.8


def test_body_mask_on_real_ct_equals_scipy_slice_by_slice(shared_data):
    """The one-labelling hole filling against scipy's binary_fill_holes on each axial slice."""
    hu = np.asarray(nib.load(shared_data / "ct" / "totalsegmentator" / "example_ct.nii.gz").dataobj)
    labels, _ = ndimage.label(hu > -500.0)
    reference = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for z in range(hu.shape[2]):
        reference[:, :, z] = ndimage.binary_fill_holes(reference[:, :, z])
    body = body_mask_from_ct(hu)
    assert (body & ~(labels > 0)).sum() > 1000  # holes were filled (lungs), so the comparison bites
    np.testing.assert_array_equal(body, reference)


def test_restrict_to_body():
    hu, body = phantom()
    pred = np.zeros(hu.shape, bool)
    pred[28:33, 4:12, 10:12] = True  # crosses the body edge (y = 7)
    pred[28:33, 46:48, 10:12] = True  # on the table
    out = restrict_to_body(pred, body_mask_from_ct(hu))
    np.testing.assert_array_equal(out, pred & body)
    assert 0 < out.sum() < pred[:, :20].sum() and not out[:, 46:48].any()
    with pytest.raises(ValueError, match="shape"):
        restrict_to_body(pred, body[:-1])


def test_postprocess_applies_config():
    from lnfm.eval.postprocess import PostprocessConfig, postprocess

    hu, body = phantom()
    pred = np.zeros(hu.shape, bool)
    pred[28:33, 4:12, 10:12] = True  # crosses the body edge
    pred[40, 30, 20] = True  # one voxel inside the body
    pred[28:33, 46:48, 10:12] = True  # on the table
    out = postprocess(pred, (1, 1, 1), PostprocessConfig(min_volume_mm3=2.0), hu=hu)
    expected = pred & body
    expected[40, 30, 20] = False
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(postprocess(pred, (1, 1, 1), PostprocessConfig(), hu=None), pred)


def _ball(shape, centre_mm, radius_mm, spacing):
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.asarray(spacing, float)
    return np.linalg.norm(grid - np.asarray(centre_mm, float), axis=-1) <= radius_mm


def _rod(shape, centre_xy_mm, radius_mm, z_range, spacing):
    """A vessel: a cylinder along axis 2 over the voxel slices z_range."""
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.asarray(spacing, float)
    rod = np.linalg.norm(grid[..., :2] - np.asarray(centre_xy_mm, float), axis=-1) <= radius_mm
    rod[:, :, :z_range[0]] = False
    rod[:, :, z_range[1]:] = False
    return rod


def test_component_diameters_match_the_analytic_ellipsoid():
    from lnfm.eval.postprocess import component_diameters

    spacing = (0.8, 0.8, 2.0)
    ball = _ball((50, 50, 20), (20, 20, 20), 8.0, spacing)  # 16 mm across
    rod = _rod((50, 50, 20), (30, 8), 2.5, (0, 20), spacing)  # 5 mm wide, 40 mm long
    _, d = component_diameters(ball | rod, spacing)
    d = sorted(d.tolist(), key=lambda r: r[0])
    np.testing.assert_allclose(d[0], [16.0] * 3, rtol=0.08)
    # A uniform rod of length L has variance L^2 / 12 along it: d = 2 sqrt(5 L^2 / 12) = 1.29 L.
    assert abs(d[1][0] - 2 * np.sqrt(5 * 40.0 ** 2 / 12)) < 0.08 * 51.6
    # Its disc cross-section has variance r^2 / 4 per axis: d = 2 sqrt(5 r^2 / 4) = sqrt(5) r.
    np.testing.assert_allclose(d[1][1:], [np.sqrt(5) * 2.5] * 2, rtol=0.12)


def test_size_prior_drops_vessels_and_specks_keeps_nodes():
    from lnfm.eval.postprocess import PostprocessConfig, apply_size_prior, postprocess

    spacing = (1.0, 1.0, 1.0)
    shape = (60, 60, 60)
    node = _ball(shape, (20, 20, 30), 5.0, spacing)
    vessel = _rod(shape, (45, 45), 3.0, (5, 55), spacing)
    speck = _ball(shape, (45, 10, 10), 1.0, spacing)
    mask = node | vessel | speck
    kept = apply_size_prior(mask, spacing, min_short_axis_mm=4.0, max_elongation=3.0)
    np.testing.assert_array_equal(kept, node)
    np.testing.assert_array_equal(apply_size_prior(mask, spacing), mask)  # both tests off
    cfg = PostprocessConfig(body_threshold_hu=None, min_short_axis_mm=4.0, max_elongation=3.0)
    np.testing.assert_array_equal(postprocess(mask, spacing, cfg), node)


def test_tune_size_prior_picks_the_filter_that_helps_on_validation():
    from lnfm.eval.postprocess import tune_size_prior

    spacing = (1.0, 1.0, 1.0)
    shape = (60, 60, 60)
    node = _ball(shape, (20, 20, 30), 5.0, spacing)
    vessel = _rod(shape, (45, 45), 3.0, (5, 55), spacing)
    s, e, score = tune_size_prior([node | vessel], [node], [spacing], short_axes=(0.0,), elongations=(0.0, 3.0))
    assert (s, e, score) == (0.0, 3.0, 1.0)
    # Nothing to remove: the milder (first) setting wins the tie.
    assert tune_size_prior([node], [node], [spacing], short_axes=(0.0, 4.0), elongations=(0.0, 3.0))[:2] == (0, 0)


@pytest.mark.parametrize("seed", range(3))
def test_remove_small_components_matches_scikit_image_on_sparse_masks(seed):
    # The components are labelled inside the mask's bounding box only; scikit-image labels the
    # whole array. max_size=k removes objects of at most k voxels (26-connectivity = 3).
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 36, 30), bool)
    mask[5:31, 9:27, 4:22] = rng.random((26, 18, 18)) < 0.25  # many small blobs, some merged
    sp = (0.8, 0.8, 1.5)
    out = remove_small_components(mask, sp, min_volume_mm3=5 * 0.96)  # keep 5 voxels and more
    np.testing.assert_array_equal(out, remove_small_objects(mask, max_size=4, connectivity=3))
    assert 0 < out.sum() < mask.sum()

