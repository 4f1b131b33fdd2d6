"""Image readers against independent references (SimpleITK, pydicom) and real scanner files."""

from __future__ import annotations

import gzip

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lnfm.io import ImageReadError, read_image, write_nifti, write_nrrd

DICOM_SERIES = "ct/totalsegmentator/example_ct_dicom"


def sitk_ras_affine(img: sitk.Image) -> np.ndarray:
    """SimpleITK (LPS, origin/direction/spacing) -> RAS voxel->world affine of the (X, Y, Z) array."""
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def sitk_xyz(img: sitk.Image) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def test_nifti_write_read_round_trip(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    aff = np.array([[0, -0.8, 0, 10], [0.9, 0, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]], float)
    write_nifti(tmp_path / "a.nii.gz", data, aff)
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # no temporary file left
    vol = read_image(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    ref = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(sitk_ras_affine(ref), aff, atol=1e-4)


def test_nrrd_lps_space_matches_simpleitk(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 5)).astype(np.int16)
    header = {"space": "left-posterior-superior",
              "space directions": np.array([[0.7, 0.1, 0], [-0.1, 0.7, 0], [0, 0, 2.0]]),
              "space origin": np.array([-12.0, 30.0, 4.0])}
    nrrd.write(str(tmp_path / "a.nrrd"), data, header, index_order="F")
    vol = read_image(tmp_path / "a.nrrd")
    ref = sitk.ReadImage(str(tmp_path / "a.nrrd"))
    np.testing.assert_array_equal(vol.data, sitk_xyz(ref))
    np.testing.assert_allclose(vol.affine, sitk_ras_affine(ref), atol=1e-6)
    write_nrrd(tmp_path / "b.nrrd", vol.data, vol.affine)
    back = read_image(tmp_path / "b.nrrd")
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)
    np.testing.assert_array_equal(back.data, vol.data)


def test_real_nifti_lps_matches_simpleitk(shared_data):
    path = shared_data / "ct/totalsegmentator/chest_vessels/ct_cropped.nii.gz"
    vol = read_image(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(vol.data, sitk_xyz(ref))
    np.testing.assert_allclose(vol.affine, sitk_ras_affine(ref), atol=1e-3)


def test_dicom_series_matches_simpleitk_and_its_nifti_label(shared_data):
    folder = shared_data / DICOM_SERIES
    vol = read_image(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    assert vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data, sitk_xyz(ref))
    np.testing.assert_allclose(vol.affine, sitk_ras_affine(ref), atol=1e-3)
    # The label was made from this series: same world grid (it stores y flipped, LAS).
    seg = nib.load(shared_data / "ct/totalsegmentator/example_seg_dicom.nii.gz")
    assert seg.shape == vol.data.shape
    corners = np.array([[i, j, k, 1] for i in (0, 511) for j in (0, 511) for k in (0, 19)], float).T
    ours = {tuple(np.round(c, 2)) for c in (vol.affine @ corners)[:3].T}
    theirs = {tuple(np.round(c, 2)) for c in (seg.affine @ corners)[:3].T}
    assert ours == theirs


def test_single_dicom_file_applies_rescale(shared_data):
    path = shared_data / "dicom_small/pydicom_CT_small.dcm"
    vol = read_image(path)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert vol.data.shape == (128, 128, 1)
    np.testing.assert_array_equal(vol.data[:, :, 0], hu.T)
    spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])


def test_dicom_sorted_by_position_not_file_name(shared_data, tmp_path):
    src = shared_data / "dicom_small/lungmask"
    # Reverse the names so name order and position order disagree.
    for name, target in (("0.dcm", "b.dcm"), ("1.dcm", "a.dcm")):
        (tmp_path / target).write_bytes((src / name).read_bytes())
    vol = read_image(tmp_path)
    z0 = [float(pydicom.dcmread(src / n).ImagePositionPatient[2]) for n in ("0.dcm", "1.dcm")]
    assert vol.affine[2, 3] == pytest.approx(min(z0))
    assert vol.affine[2, 2] == pytest.approx(abs(z0[1] - z0[0]))


@pytest.mark.parametrize("case", ["missing", "corrupt_gz", "garbage_nii", "unknown_ext", "nonuniform_dicom"])
def test_unreadable_inputs_raise_one_line_error_with_path(case, tmp_path, shared_data):
    if case == "missing":
        path = tmp_path / "none.nii.gz"
    elif case == "corrupt_gz":
        path = tmp_path / "bad.nii.gz"
        path.write_bytes(gzip.compress(b"\x00" * 40)[:30])
    elif case == "garbage_nii":
        path = tmp_path / "bad.nii"
        path.write_bytes(b"this is not an image" * 20)
    elif case == "unknown_ext":
        path = tmp_path / "scan.png"
        path.write_bytes(b"x")
    else:
        path = shared_data / "dicom_small/monai_ct_dicom"
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg and len(msg) > len(str(path)) + 5


@pytest.mark.parametrize("space_line, says", [
    ("space dimension: 3", "NRRD has no 'space' field, so its axes' patient directions are unknown"),
    ("space: scanner-xyz", "unsupported NRRD space 'scanner-xyz'"),
])
def test_nrrd_without_patient_axes_is_refused(tmp_path, space_line, says):
    """Read as RAS, such a header was mirrored in x and y against ITK (SimpleITK, 3D Slicer), which
    reads it as LPS: the same file, two anatomies."""
    path = tmp_path / "n.nrrd"
    path.write_bytes(f"NRRD0004\ntype: int16\ndimension: 3\n{space_line}\nsizes: 2 2 2\n"
                     "space directions: (0.7,0,0) (0,0.8,0) (0,0,2)\nspace origin: (10,20,30)\nencoding: raw\n"
                     "endian: little\n\n".encode() + np.zeros(8, np.int16).tobytes())
    itk = sitk.ReadImage(str(path))
    assert np.diag(sitk_ras_affine(itk))[:2].tolist() == [-0.7, -0.8]  # ITK's reading: LPS
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(e.value).startswith(f"{path}: {says}") and "\n" not in str(e.value)


def _nrrd_bytes(path, data: np.ndarray, directions: np.ndarray, origin: np.ndarray, units: bytes | None) -> None:
    """An attached raw LPS NRRD written byte by byte (pynrrd writes ASCII only; 'µm' needs UTF-8)."""
    vec = lambda v: "(" + ",".join(repr(float(x)) for x in v) + ")"  # noqa: E731
    header = ("NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {' '.join(map(str, data.shape))}\n"
              f"space directions: {' '.join(vec(d) for d in directions)}\nspace origin: {vec(origin)}\n").encode()
    if units is not None:
        header += b"space units: " + units + b"\n"
    path.write_bytes(header + b"endian: little\nencoding: raw\n\n" + np.asarray(data, "<i2").tobytes(order="F"))


@pytest.mark.parametrize("units, mm_per_unit", [
    (None, (1, 1, 1)), (b'"mm" "mm" "mm"', (1, 1, 1)), (b'"cm" "cm" "cm"', (10, 10, 10)),
    (b'"m" "m" "m"', (1000, 1000, 1000)), (b'"um" "um" "um"', (1e-3, 1e-3, 1e-3)),
    ('"µm" "µm" "µm"'.encode(), (1e-3, 1e-3, 1e-3)),  # UTF-8: pynrrd alone would read it as "m" (metres)
    ('"µm" "µm" "µm"'.encode("latin-1"), (1e-3, 1e-3, 1e-3)),
    (b'"mm" "cm" "mm"', (1, 10, 1)),  # a unit per world axis
])
def test_real_ct_as_nrrd_in_other_units_reads_as_the_mm_original(shared_data, tmp_path, units, mm_per_unit):
    src = nib.load(shared_data / "ct/totalsegmentator/example_ct_sm.nii.gz")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ src.affine  # NRRD CTs are usually LPS
    scale = np.asarray(mm_per_unit, float)
    path = tmp_path / "ct.nrrd"
    _nrrd_bytes(path, np.asarray(src.dataobj), lps[:3, :3].T / scale, lps[:3, 3] / scale, units)
    vol = read_image(path)
    np.testing.assert_allclose(vol.affine, src.affine, atol=1e-6)
    np.testing.assert_array_equal(vol.data, np.asarray(src.dataobj))


def test_pynrrd_written_cm_nrrd_reads_in_mm(tmp_path):
    """As a converter writes it: 0.3 cm voxels are 3 mm, the origin 1.5 cm is 15 mm."""
    header = {"space": "right-anterior-superior", "space directions": np.diag([0.3, 0.3, 0.5]),
              "space origin": np.array([1.5, -2.0, 0.25]), "space units": ["cm", "cm", "cm"]}
    nrrd.write(str(tmp_path / "cm.nrrd"), np.zeros((4, 3, 2), np.int16), header, index_order="F")
    np.testing.assert_allclose(read_image(tmp_path / "cm.nrrd").affine, [[3, 0, 0, 15], [0, 3, 0, -20],
                                                                         [0, 0, 5, 2.5], [0, 0, 0, 1]], atol=1e-12)


@pytest.mark.parametrize("unit, units_per_mm", [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0), ("unknown", 1.0)])
def test_real_ct_as_nifti_in_other_spatial_units_reads_as_simpleitk_reads_it(shared_data, tmp_path, unit,
                                                                           units_per_mm):
    """The qform and sform are in xyzt_units' unit: a CT stored in metres or microns is the mm original, with
    the spacing and origin SimpleITK reads (and a header that says metres over a mm geometry is 1000x large,
    for SimpleITK too: the spacing check then refuses it)."""
    src = nib.load(shared_data / "ct/totalsegmentator/example_ct_sm.nii.gz")
    affine = src.affine.copy()
    affine[:3] *= units_per_mm
    img = nib.Nifti1Image(np.asarray(src.dataobj), affine)
    img.header.set_xyzt_units(unit, "sec")  # a time unit beside it changes nothing
    nib.save(img, tmp_path / "ct.nii.gz")
    vol = read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(vol.affine, src.affine, atol=1e-4)
    ref = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 3] * [-1, -1, 1], ref.GetOrigin(), atol=1e-3)  # ITK's origin is LPS
    img = nib.Nifti1Image(np.asarray(src.dataobj), src.affine)
    img.header.set_xyzt_units("meter")  # the unit is wrong, the geometry mm
    nib.save(img, tmp_path / "wrong.nii.gz")
    assert np.allclose(np.linalg.norm(read_image(tmp_path / "wrong.nii.gz").affine[:3, :3], axis=0),
                       sitk.ReadImage(str(tmp_path / "wrong.nii.gz")).GetSpacing())


def test_nifti_spatial_unit_code_outside_the_standard_is_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header["xyzt_units"] = 8 | 5  # seconds, and a spatial code NIfTI does not define
    nib.save(img, tmp_path / "u.nii.gz")
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "u.nii.gz")
    assert str(e.value) == (f"{tmp_path / 'u.nii.gz'}: xyzt_units 13 names no spatial unit (its low 3 bits are 5; "
                            f"NIfTI defines 0 unknown, 1 meter, 2 mm, 3 micron)")


@pytest.mark.parametrize("units, says", [
    (b'"furlong" "furlong" "furlong"', "unsupported NRRD space unit 'furlong' (expected mm, cm, m or um)"),
    (b'"mm" "mm" "inch"', "unsupported NRRD space unit 'inch' (expected mm, cm, m or um)"),
    (b'"cm" "cm"', "NRRD 'space units' names 2 units, expected 3 (one per axis of the space)"),
])
def test_nrrd_space_unit_that_cannot_be_converted_is_refused(tmp_path, units, says):
    path = tmp_path / "u.nrrd"
    _nrrd_bytes(path, np.zeros((2, 2, 2), np.int16), np.eye(3), np.zeros(3), units)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(e.value) == f"{path}: {says}"
