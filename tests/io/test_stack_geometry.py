"""The slice order and step of a DICOM series (`stack_geometry`), the one place every reader of a series' grid
(`read_dicom_series`, `read_source_series`, `image_grid`) takes them from."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from lnfm.io import read_image
from lnfm.io.dicom import dicom_files, stack_geometry
from lnfm.io.grid import image_grid
from lnfm.io.volume import LPS_TO_RAS, ImageReadError

AXIAL = [1, 0, 0, 0, 1, 0]  # slice normal +z
CORONAL = [1, 0, 0, 0, 0, -1]  # slice normal +y


def test_reversed_and_unevenly_spaced_slices_by_hand():
    order, step = stack_geometry([[0, 0, 10], [0, 0, 4], [0, 0, 0]], AXIAL, {}, "s")  # gaps 4 and 6, top first
    assert order.tolist() == [2, 1, 0]
    np.testing.assert_allclose(step, [0, 0, 5])  # the mean: (10 - 0) / 2
    order, step = stack_geometry([[0, 3, 0], [0, -2, 0], [1, 0.5, 0]], CORONAL, {}, "s")  # along y, one shifted in x
    assert order.tolist() == [1, 2, 0]
    np.testing.assert_allclose(step, [0, 2.5, 0])  # (3 - (-2)) / 2, first to last
    for header, size in (({}, 1.0), ({"SliceThickness": "2.5"}, 2.5),
                         ({"SliceThickness": "2.5", "SpacingBetweenSlices": "3"}, 3.0)):
        order, step = stack_geometry([[7, 8, 9]], CORONAL, header, "s")
        assert order.tolist() == [0]
        np.testing.assert_allclose(step, [0, size, 0])
    with pytest.raises(ImageReadError, match="^one: SliceThickness holds a value that is not a number$"):
        stack_geometry([[7, 8, 9]], AXIAL, {"SliceThickness": "thick"}, "one")


def _headers(folder):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_files(folder)]


def test_a_real_series_written_top_down_and_one_unevenly_spaced(shared_data):
    folder = shared_data / "ct/totalsegmentator/example_ct_dicom"  # 20 slices, z -766.5 down to -804.5 by name
    heads = _headers(folder)
    positions = [h.ImagePositionPatient for h in heads]
    assert [float(p[2]) for p in positions[:2]] == [-766.5, -768.5]
    order, step = stack_geometry(positions, heads[0].ImageOrientationPatient, heads[0], str(folder))
    assert order.tolist() == list(range(19, -1, -1))
    np.testing.assert_allclose(step, [0, 0, 2.0])  # from the positions, not SliceThickness (3 mm)
    # the readers place the series by it (read_source_series, which needs UIDs this series lacks: test_dicom_outputs)
    vol = read_image(folder)
    np.testing.assert_allclose(vol.affine[:3, 2], LPS_TO_RAS[:3, :3] @ [0, 0, 2.0])
    np.testing.assert_allclose(vol.affine[:3, 3], LPS_TO_RAS[:3, :3] @ [-249.51171875, -437.51171875, -804.5])
    assert image_grid(folder) == ((512, 512, 20), (pytest.approx(0.9765625), pytest.approx(0.9765625), 2.0))
    heads = _headers(shared_data / "dicom_small/monai_ct_dicom")  # z -99.48, 103.02, 104.27, 105.52
    order, step = stack_geometry([h.ImagePositionPatient for h in heads], AXIAL, heads[0], "monai")
    assert order.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(step, [0, 0, (105.52 + 99.48) / 3], rtol=1e-6)
