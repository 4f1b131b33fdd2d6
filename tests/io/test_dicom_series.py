"""A folder holding two DICOM series: refused with their list, or one read by --series,
against SimpleITK's GDCM series selection as the reference."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from lnfm.io import ImageReadError, SeriesChoiceError, read_image

UID_B = "1.2.826.0.1.3680043.8.498.99999999999999999999999999999999999"


def two_series_folder(shared_data, folder):
    """The two real lungmask slices (series A) plus a copy of them as series B: other UID, other
    pixel values, positions half a slice gap above A's, so a merge would interleave them."""
    src = shared_data / "dicom_small/lungmask"
    folder.mkdir(parents=True)
    first, second = (pydicom.dcmread(src / n) for n in ("0.dcm", "1.dcm"))
    gap = abs(float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]))
    uid_a = str(first.SeriesInstanceUID)
    for name, ds in (("0.dcm", first), ("1.dcm", second)):
        ds.save_as(folder / f"a{name}")
        ds.SeriesInstanceUID = UID_B
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + gap / 2]
        ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"b{name}")
    return uid_a


def sitk_series(folder, uid) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return np.transpose(sitk.GetArrayFromImage(reader.Execute()), (2, 1, 0))


def test_two_series_are_refused_with_their_list(shared_data, tmp_path):
    folder = tmp_path / "scans"
    uid_a = two_series_folder(shared_data, folder)
    with pytest.raises(SeriesChoiceError) as err:
        read_image(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder}: folder holds 2 DICOM series") and "\n" not in msg
    assert uid_a in msg and UID_B in msg and "--series" in msg


@pytest.mark.parametrize("which", ["a", "b"])
def test_series_option_reads_exactly_that_series(shared_data, tmp_path, which):
    folder = tmp_path / "scans"
    uid_a = two_series_folder(shared_data, folder)
    uid = uid_a if which == "a" else UID_B
    vol = read_image(folder, series=uid)
    assert vol.data.shape == (512, 512, 2)  # not 4 interleaved slices
    np.testing.assert_array_equal(vol.data, sitk_series(folder, uid))
    if which == "a":  # series A is the untouched real pair
        np.testing.assert_array_equal(vol.data, read_image(shared_data / "dicom_small/lungmask").data)


def test_unknown_series_names_the_ones_present(shared_data, tmp_path):
    folder = tmp_path / "scans"
    uid_a = two_series_folder(shared_data, folder)
    with pytest.raises(ImageReadError, match=f"no DICOM series 1.2.3 here .*{uid_a}"):
        read_image(folder, series="1.2.3")


def test_prepare_refuses_the_folder_or_takes_the_chosen_series(shared_data, tmp_path):
    from lnfm.data.prepare import PrepareConfig, PrepareError, prepare_dataset
    from lnfm.data.store import read_case, read_manifest

    root = tmp_path / "in"
    two_series_folder(shared_data, root / "scans")
    cfg = PrepareConfig(workers=0, salt="s", crop_body=False)
    with pytest.raises(PrepareError, match=f"^{root / 'scans'}: folder holds 2 DICOM series"):
        prepare_dataset(str(root), str(tmp_path / "st1"), cfg, show_progress=False)
    assert not (tmp_path / "st1").exists()  # no usable case: no store
    cfg.series = [UID_B]
    res = prepare_dataset(str(root), str(tmp_path / "st2"), cfg, show_progress=False)
    assert res.ok and res.converted == 1
    record = read_manifest(str(tmp_path / "st2"))[0]
    image, _ = read_case(str(tmp_path / "st2"), record)
    # Stored RAS (the series is LPS: x and y flipped), same voxels as SimpleITK's series B.
    np.testing.assert_array_equal(image[::-1, ::-1, :, 0], sitk_series(root / "scans", UID_B))


def test_damaged_slices_are_left_to_the_read_and_a_bug_in_the_lookups_keeps_its_traceback(shared_data, tmp_path,
                                                                                        monkeypatch):
    """What a damaged, cut or foreign slice's header raises (found by reading thousands of such files) leaves it
    out of the series lookups (series_of, series_uid_of_file, _instance_uids) for the read to name, a TypeError
    too when pydicom raises it (a damaged VR makes SpecificCharacterSet a number). Any other error was read that
    way too, a bug inside the lookups included."""
    import shutil
    import struct

    from pydicom.errors import BytesLengthException

    from lnfm.io import dicom

    good = shared_data / "dicom_small/lungmask/0.dcm"
    raw = good.read_bytes()
    bad = {"cut.dcm": (raw[:152], struct.error), "cut_value.dcm": (raw[:141], BytesLengthException),
           "empty.dcm": (b"", InvalidDicomError),
           "random.dcm": (bytes(range(256)) * 4, InvalidDicomError),
           "charset_vr.dcm": (raw.replace(b"\x08\x00\x05\x00CS", b"\x08\x00\x05\x00US", 1), TypeError),
           "charset_null.dcm": (raw.replace(b"ISO_IR 100", b"ISO_IR\x00100", 1), ValueError),
           "uid_vr.dcm": (raw.replace(b"\x20\x00\x0e\x00UI", b"\x20\x00\x0e\x00Uf", 1), NotImplementedError)}
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(good, folder / "good.dcm")
    for name, (data, raises) in bad.items():
        (folder / name).write_bytes(data)
        with pytest.raises(raises):  # what each is
            dicom.slice_header(folder / name)
            dicom.slice_header(folder / name).get("SeriesInstanceUID")
        assert dicom.series_uid_of_file(folder / name) == "", name
    ds = pydicom.dcmread(good, stop_before_pixels=True)
    groups, unreadable = dicom.series_of(dicom.dicom_files(folder) + [folder / "gone.dcm"])
    assert groups == {ds.SeriesInstanceUID: [folder / "good.dcm"]}
    assert sorted(p.name for p in unreadable) == sorted([*bad, "gone.dcm"])
    assert dicom._instance_uids(str(folder)) == {ds.SOPInstanceUID}

    def bug(*args, **kwargs):
        raise TypeError("a bug inside the read")

    fresh = tmp_path / "fresh"  # headers not read yet
    fresh.mkdir()
    shutil.copy(good, fresh / "good.dcm")
    monkeypatch.setattr(dicom, "read_dataset", bug)
    for lookup in (lambda: dicom.series_of([fresh / "good.dcm"]), lambda: dicom.series_uid_of_file(fresh / "good.dcm"),
                   lambda: dicom._instance_uids(str(fresh))):
        with pytest.raises(TypeError, match="a bug inside the read"):
            lookup()
