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
