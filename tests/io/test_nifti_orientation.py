"""NIfTI geometry from qform and sform: files built with nibabel with hand-set forms."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from lnfm.io import ImageReadError, read_image, write_nifti

DATA = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
SFORM = np.array([[1.5, 0, 0, -30], [0, 1.5, 0, 20], [0, 0, 2.0, 5], [0, 0, 0, 1]], float)


def _file(tmp_path, qform, sform, name="s.nii.gz"):
    img = nib.Nifti1Image(DATA, None)
    img.header.set_qform(qform, code=0 if qform is None else 1)
    img.header.set_sform(sform, code=0 if sform is None else 1)
    if qform is None and sform is None:
        img.header.set_zooms((1.5, 1.5, 2.0))  # a valid pixdim: voxel sizes alone are no orientation
    nib.save(img, str(tmp_path / name))
    return tmp_path / name


def _moved(affine, row=None, col=None, by=0.0):
    a = affine.copy()
    a[row, col] += by
    return a


def test_no_qform_and_no_sform_is_refused(tmp_path):
    path = _file(tmp_path, None, None)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(e.value) == f"{path}: no orientation: qform and sform codes are 0"


@pytest.mark.parametrize("qform, says", [
    (SFORM @ np.diag([-1.0, 1, 1, 1]), "[2. 0. 0.]"),  # x mirrored
    (_moved(SFORM, 1, 3, 2.0), "voxel 0 by 2 mm"),  # moved 2 mm along y
    (_moved(SFORM, 2, 2, 1.0), "[0.  0.  0.5]"),  # 3 mm slices against the sform's 2 mm
])
def test_disagreeing_qform_and_sform_are_refused(tmp_path, qform, says):
    path = _file(tmp_path, qform, SFORM)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    message = str(e.value)
    assert message.startswith(f"{path}: qform and sform disagree") and says in message and "\n" not in message


def test_forms_apart_by_float_rounding_read_as_the_sform(tmp_path):
    vol = read_image(_file(tmp_path, _moved(SFORM, 0, 3, 5e-4), SFORM))
    np.testing.assert_allclose(vol.affine, SFORM, atol=1e-6)
    np.testing.assert_array_equal(vol.data, DATA)


def test_one_form_alone_is_the_geometry(tmp_path):
    rotated = np.array([[0, -0.8, 0, 10], [0.9, 0, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(read_image(_file(tmp_path, rotated, None, "q.nii")).affine, rotated, atol=1e-6)
    np.testing.assert_allclose(read_image(_file(tmp_path, None, rotated, "s.nii")).affine, rotated, atol=1e-6)


def test_near_half_turn_survives_the_quaternion_storage(tmp_path):
    # At 179.926 degrees about z the qform's float32 quaternion turns the x axis by about 7e-4 of its
    # length: a real loss (more than a 1e-4 tolerance allows), not a disagreement.
    t = np.deg2rad(179.92606516290726)
    affine = np.eye(4)
    turn = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine[:3, :3] = turn @ np.diag([0.7, 0.7, 1])
    affine[:3, 3] = [-180.3, 250.7, -1200.2]
    path = _file(tmp_path, affine, affine)
    header = nib.load(path).header
    lost = np.linalg.norm(header.get_qform()[:3, 0] - affine[:3, 0]) / 0.7
    assert 1e-4 < lost < 5e-3
    np.testing.assert_allclose(read_image(path).affine, affine, atol=1e-4)


def test_writer_keeps_a_sheared_grid_in_the_sform_alone(tmp_path):
    sheared = np.diag([0.7, 0.7, 2.5, 1.0])
    sheared[1, 2] = 0.9  # a gantry tilt: each slice shifted along y, which no qform can hold
    write_nifti(tmp_path / "m.nii.gz", DATA, sheared)
    header = nib.load(tmp_path / "m.nii.gz").header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 1)
    np.testing.assert_allclose(header.get_sform(), sheared, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "m.nii.gz").affine, sheared, atol=1e-6)


def test_writer_writes_both_forms_when_they_agree(tmp_path):
    write_nifti(tmp_path / "m.nii.gz", DATA, SFORM)
    header = nib.load(tmp_path / "m.nii.gz").header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(header.get_qform(), SFORM, atol=1e-6)
    np.testing.assert_allclose(header.get_sform(), SFORM, atol=1e-6)


def _qform_file_with_pixdim(tmp_path, pixdim, name):
    """A qform-only file whose stored pixdim[0:4] are patched in its bytes: nibabel refuses to write them."""
    img = nib.Nifti1Image(DATA, None)
    img.header.set_qform(SFORM, code=1)
    img.header.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "ok.nii"))
    raw = bytearray((tmp_path / "ok.nii").read_bytes())
    raw[76:92] = np.asarray(pixdim, "<f4").tobytes()  # pixdim[0:4] of the 348-byte NIfTI-1 header
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    return path


@pytest.mark.parametrize("pixdim, nibabel_reads, says", [
    ([1, 1.5, 0.0, 2.0], (1.5, 1.0, 2.0), "pixdim voxel sizes (1.5, 0.0, 2.0) are not all positive"),  # 0 read as 1 mm
    ([1, 1.5, 1.5, -2.0], (1.5, 1.5, 2.0), "pixdim voxel sizes (1.5, 1.5, -2.0) are not all positive"),  # sign dropped
    ([-3, 1.5, 1.5, 2.0], (1.5, 1.5, 2.0), "pixdim[0] (qfac) -3 is not 1 or -1"),  # nibabel: qfac 1; ITK: its sign, -1
])
@pytest.mark.parametrize("name", ["p.nii", "p.nii.gz"])
def test_a_pixdim_nibabel_would_rewrite_is_refused(tmp_path, capfd, pixdim, nibabel_reads, says, name):
    path = _qform_file_with_pixdim(tmp_path, pixdim, name)
    # what nibabel alone would read: voxel sizes the file never stated
    np.testing.assert_allclose(np.diag(nib.load(str(path)).affine)[:3], nibabel_reads)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(e.value) == f"{path}: {says}" + (" (the qform is scaled by them)" if "sizes" in says else
                                                " (readers disagree on the slice direction)")
    capfd.readouterr()  # nibabel's own load above logged its fix to stderr
    with pytest.raises(ImageReadError):
        read_image(path)
    assert capfd.readouterr().err == ""  # refused before nibabel's loader: the CLI's one line stays one


def test_an_unknown_form_code_is_refused(tmp_path):  # nibabel would read the code as 0 and take the qform
    img = nib.Nifti1Image(DATA, None)
    img.header.set_qform(SFORM @ np.diag([-1.0, 1, 1, 1]), code=1)
    img.header.set_sform(SFORM, code=1)
    nib.save(img, str(tmp_path / "ok.nii"))
    raw = bytearray((tmp_path / "ok.nii").read_bytes())
    raw[254:256] = np.asarray(7, "<i2").tobytes()  # sform_code of the NIfTI-1 header
    (tmp_path / "c.nii").write_bytes(bytes(raw))
    assert nib.load(str(tmp_path / "c.nii")).affine[0, 0] == -1.5  # the mirrored qform, with a log line only
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "c.nii")
    assert str(e.value) == f"{tmp_path / 'c.nii'}: sform_code 7 is not a NIfTI transform code (0-4)"


def test_a_stored_qfac_of_zero_reads_as_one(tmp_path):  # the standard's rule for old writers
    vol = read_image(_qform_file_with_pixdim(tmp_path, [0, 1.5, 1.5, 2.0], "z.nii"))
    np.testing.assert_allclose(vol.affine, SFORM, atol=1e-6)
