"""A scan's grid from its headers alone (`lnfm.io.grid`) is the grid its read gives, for every format."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from lnfm.io import read_image, write_nrrd
from lnfm.io.grid import image_grid

REAL = ["ct/totalsegmentator/example_ct.nii.gz", "ct/totalsegmentator/chest_vessels/ct_cropped.nii.gz",
        "ct/totalsegmentator/example_ct_dicom", "dicom_small/lungmask", "dicom_small/pydicom_CT_small.dcm"]


def _read_grid(path):
    vol = read_image(path)
    return vol.shape3, np.linalg.norm(vol.affine[:3, :3], axis=0)


def _assert_same(grid, expected):
    assert grid is not None and grid[0] == expected[0]
    np.testing.assert_allclose(grid[1], expected[1], rtol=1e-6)


@pytest.mark.parametrize("name", REAL)
def test_the_grid_of_a_real_scan_from_its_headers_is_the_one_its_read_gives(shared_data, name):
    _assert_same(image_grid(shared_data / name), _read_grid(shared_data / name))


def test_an_nrrd_grid_in_cm_and_a_4d_nifti_grid_are_in_mm(tmp_path):
    data = np.zeros((6, 5, 4), np.int16)
    affine = np.array([[0, -0.8, 0, 10], [0.9, 0, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]], float)
    write_nrrd(tmp_path / "a.nrrd", data, affine)
    _assert_same(image_grid(tmp_path / "a.nrrd"), ((6, 5, 4), (0.9, 0.8, 2.5)))
    text = (tmp_path / "a.nrrd").read_bytes().replace(b"\nspace directions:", b"\nspace units: \"cm\" \"cm\" \"cm\"\n"
                                                      b"space directions:", 1)
    (tmp_path / "cm.nrrd").write_bytes(text)
    _assert_same(image_grid(tmp_path / "cm.nrrd"), ((6, 5, 4), (9.0, 8.0, 25.0)))
    _assert_same(image_grid(tmp_path / "cm.nrrd"), _read_grid(tmp_path / "cm.nrrd"))
    img = nib.Nifti1Image(data[..., None], affine)
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "m.nii.gz")
    _assert_same(image_grid(tmp_path / "m.nii.gz"), ((6, 5, 4), (900.0, 800.0, 2500.0)))


def test_a_header_claiming_more_voxels_than_the_file_holds_gives_its_grid_without_reading_them(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 2000))  # 64 GB of int16 in a 1 kB file
    header.set_data_dtype(np.int16)
    header.set_qform(np.diag([0.5, 0.5, 1.0, 1.0]), 1)
    header.set_sform(np.diag([0.5, 0.5, 1.0, 1.0]), 1)
    header["vox_offset"] = 352
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + bytes(4 + 1024))
    _assert_same(image_grid(path), ((4000, 4000, 2000), (0.5, 0.5, 1.0)))


def test_unreadable_headers_give_no_grid(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really a gzip stream")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\nsizes: 2 2\n\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("bad.nii.gz", "bad.nrrd", "empty", "notes.txt", "absent.nii.gz"):
        assert image_grid(tmp_path / name) is None, name


def test_a_bad_file_of_each_format_gives_no_grid_and_a_bug_keeps_its_traceback(tmp_path, shared_data, monkeypatch):
    """What the headers of a bad file raise (tried on each format) gives no grid, for the read to name (a slice
    whose damaged VR makes SpecificCharacterSet a number raised pydicom's TypeError); any other error was read as
    'no grid' too, a bug inside included."""
    import pydicom

    from lnfm.io import grid

    raw = (shared_data / "ct/totalsegmentator/example_ct_sm.nii.gz").read_bytes()
    damaged = bytearray(raw[:4000])
    damaged[20:400] = bytes(380)
    dicom = shared_data / "dicom_small/pydicom_CT_small.dcm"
    bad = {"cut.nii.gz": raw[:200], "damaged.nii.gz": bytes(damaged), "empty.nii": b"", "empty.nrrd": b"",
           "text.nrrd": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 x\nencoding: raw\n\n",
           "cut.dcm": dicom.read_bytes()[:1000], "random.dcm": bytes(range(256)) * 4,
           "charset_vr.dcm": dicom.read_bytes().replace(b"\x08\x00\x05\x00CS", b"\x08\x00\x05\x00US", 1)}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows"):
        ds = pydicom.dcmread(dicom)
        delattr(ds, tag)
        ds.save_as(tmp_path / f"no_{tag}.dcm")
        bad[f"no_{tag}.dcm"] = b""
    for name in bad:
        assert image_grid(tmp_path / name) is None, name
    assert image_grid(dicom) is not None

    write_nrrd(tmp_path / "good.nrrd", np.zeros((6, 5, 4), np.int16), np.eye(4))

    for error in (AttributeError, TypeError):  # a TypeError is a damaged slice's only from within pydicom
        def bug(*args, **kwargs):
            raise error("a bug inside the read")

        for where, name, path in ((grid, "load_header", shared_data / "ct/totalsegmentator/example_ct_sm.nii.gz"),
                                  (grid.nrrd, "read_header", tmp_path / "good.nrrd"), (grid, "stack_geometry", dicom)):
            assert image_grid(path) is not None, name
            with monkeypatch.context() as m:
                m.setattr(where, name, bug)
                with pytest.raises(error, match="a bug inside the read"):
                    image_grid(path)
