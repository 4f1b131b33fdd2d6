"""Slices of one folder that disagree in what makes them one series: a position that is no number, a rescale
only some carry, two series numbers without series UIDs. Each was read without a word (a scrambled slice order,
one slice 1024 HU off, two series interleaved); each is now refused in one line. Built from the real series of
../shared/data (its UIDs are blank, as an anonymiser leaves them)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lnfm.io import ImageReadError, read_image

SOURCE = "ct/totalsegmentator/example_ct_dicom"


def real_slices(shared_data, folder, edit=None, n: int = 8, prefix: str = ""):
    """The first `n` slices of the real series, decompressed, `edit(i, ds)` applied, written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((shared_data / SOURCE).iterdir())[:n]):
        ds = pydicom.dcmread(f)
        ds.decompress()
        if edit is not None:
            edit(i, ds)
        ds.save_as(folder / f"{prefix}{i:03d}.dcm")
    return folder


def test_the_unedited_slices_read_as_simpleitk_reads_them(shared_data, tmp_path):
    folder = real_slices(shared_data, tmp_path / "s")
    vol = read_image(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    np.testing.assert_array_equal(vol.data, np.transpose(sitk.GetArrayFromImage(reader.Execute()), (2, 1, 0)))


def test_a_slice_position_that_is_no_number_is_refused(shared_data, tmp_path):
    def nan_position(i, ds):
        if i == 4:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], "NaN"]

    folder = real_slices(shared_data, tmp_path / "s", nan_position)
    with pytest.raises(ImageReadError) as e:
        read_image(folder)
    assert str(e.value).startswith(f"{folder}: file 5 of 8: ImagePositionPatient [") and \
        str(e.value).endswith(", nan] is not a finite position")


def test_a_slice_without_the_rescale_the_others_carry_is_refused(shared_data, tmp_path):
    def no_rescale(i, ds):
        if i == 4:
            del ds.RescaleIntercept, ds.RescaleSlope

    folder = real_slices(shared_data, tmp_path / "s", no_rescale)
    with pytest.raises(ImageReadError) as e:
        read_image(folder)
    assert str(e.value) == (f"{folder}: 1 of 8 slices carry no RescaleIntercept or RescaleSlope where the others "
                            f"do: their HU cannot be known")


def test_two_series_without_uids_are_told_apart_by_their_series_numbers(shared_data, tmp_path):
    """The second copy sits half a slice gap above the first, so the two interleave into a uniform grid."""
    folder = tmp_path / "s"
    gap = 2.0  # the real series' slice spacing (mm)

    def series(number, shift):
        def edit(i, ds):
            ds.SeriesNumber = number
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + shift]
        return edit

    real_slices(shared_data, folder, series(2, 0.0), prefix="a")
    real_slices(shared_data, folder, series(3, gap / 2), prefix="b")
    with pytest.raises(ImageReadError) as e:
        read_image(folder)
    assert str(e.value) == f"{folder}: slices carry SeriesNumber 2, 3: more than one series (split them into one " \
                           f"folder each)"
    for p in folder.glob("b*.dcm"):
        p.unlink()
    assert read_image(folder).data.shape == (512, 512, 8)  # one series number: read


def test_a_jpeg_lossless_series_reads_as_simpleitk_reads_it(shared_data, tmp_path):
    """JPEG Lossless (Process 14, SV1), the usual lossless syntax of a PACS export, written by GDCM through
    SimpleITK: pydicom decodes it with python-gdcm. Without a decoder the refusal said only 'RuntimeError'."""
    folder = tmp_path / "jpeg"
    scratch = tmp_path / "one.dcm"

    def jpeg_lossless(i, ds):
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(scratch))
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array.astype(np.uint16)[None]))
        coded = pydicom.dcmread(scratch)
        ds.PixelData = coded.PixelData
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = coded.file_meta.TransferSyntaxUID
        ds.BitsStored, ds.HighBit = coded.BitsStored, coded.HighBit

    real_slices(shared_data, folder, jpeg_lossless, n=4)
    assert pydicom.dcmread(folder / "000.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    expected = np.transpose(sitk.GetArrayFromImage(reader.Execute()), (2, 1, 0))
    vol = read_image(folder)
    np.testing.assert_array_equal(vol.data, expected)
    np.testing.assert_array_equal(vol.data, read_image(real_slices(shared_data, tmp_path / "plain", n=4)).data)


def test_slices_written_without_the_preamble_are_read_not_passed_over(shared_data, tmp_path):
    """Datasets without the 128-byte preamble and 'DICM' (older scanners, some PACS exports), named without
    '.dcm': passed over, so a series with six such slices of twenty was read fourteen deep, exit 0. They are
    read as SimpleITK reads them, alone or beside Part-10 files; a text file beside them is still no slice."""
    folder = real_slices(shared_data, tmp_path / "s", n=8)
    for n in range(5, 8):
        ds = pydicom.dcmread(folder / f"{n:03d}.dcm")
        ds.preamble = None
        del ds.file_meta
        ds.save_as(folder / f"IM{n:04d}", enforce_file_format=False, implicit_vr=True, little_endian=True)
        (folder / f"{n:03d}.dcm").unlink()
    (folder / "README").write_text("exported by a PACS\n")
    assert (folder / "IM0005").read_bytes()[:2] == b"\x08\x00"  # the raw dataset's first element, group 0008
    vol = read_image(folder)
    assert vol.data.shape == (512, 512, 8)
    np.testing.assert_array_equal(vol.data, read_image(real_slices(shared_data, tmp_path / "p", n=8)).data)


def test_pydicom_s_warnings_about_a_bad_slice_go_into_its_one_line_refusal(shared_data, tmp_path, repo_root):
    """A slice of garbage bytes that pydicom parses with a warning: `lnfm prepare` printed pydicom's two-line
    UserWarning dump, then the one-line refusal. The warning's text is now part of that line, and nothing else
    from pydicom reaches the console."""
    import subprocess
    import sys

    folder = real_slices(shared_data, tmp_path / "series", n=2)
    (folder / "002.dcm").write_bytes(b"DICM? no" * 50)  # 'DICM' at offset 128: parsed as a dataset, with a warning
    table = tmp_path / "cases.csv"
    table.write_text(f"case_id,image\nc,{folder}\n")
    proc = subprocess.run([sys.executable, "-m", "lnfm", "prepare", "--input", str(table), "--output",
                           str(tmp_path / "store"), "--workers", "0", "salt=s"], cwd=repo_root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Warning" not in proc.stderr.replace("WARNING lnfm.", ""), proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    assert failed == [f"FAILED {folder}: file 3 of 3: unreadable DICOM (AttributeError: Unable to decode the pixel "
                      "data as the dataset's 'file_meta' has no (0002,0010) 'Transfer Syntax UID' element; pydicom "
                      "warned: Expected implicit VR, but found explicit VR - using explicit VR for reading)"]


def _text_in_header(folder, placeholder: str, text: str):
    """`text` in place of the numeric `placeholder` (the same length) in every slice of `folder`: a decimal string
    holding letters, which pydicom refuses to write but reads."""
    for f in folder.iterdir():
        f.write_bytes(f.read_bytes().replace(placeholder.encode(), text.encode()))
    return folder


@pytest.mark.parametrize("tag,value", [("PixelSpacing", lambda ds: [ds.PixelSpacing[0], "9999999999"]),
                                       ("ImagePositionPatient", lambda ds: [ds.ImagePositionPatient[0], "9999999999",
                                                                           ds.ImagePositionPatient[2]]),
                                       ("ImageOrientationPatient", lambda ds: ["9999999999",
                                                                               *ds.ImageOrientationPatient[1:]])])
def test_a_geometry_value_that_is_text_is_refused_naming_the_slice_and_tag_not_the_text(shared_data, tmp_path, tag,
                                                                                         value):
    """A decimal string holding text ('CANARYSPC1') ended in a ValueError that prepare logged as a bug, with a
    traceback, and its reason repeated the header's text."""
    def edit(i, ds):
        if i == 4:
            setattr(ds, tag, value(ds))

    folder = _text_in_header(real_slices(shared_data, tmp_path / "s", edit), "9999999999", "CANARYSPC1")
    with pytest.raises(ImageReadError) as e:
        read_image(folder)
    assert str(e.value) == f"{folder}: file 5 of 8: {tag} holds a value that is not a number"


@pytest.mark.parametrize("tag,text,wrong", [
    ("RescaleSlope", "CANARYSLP1", "holds a value that is not a number (a finite number, not 0)"),
    ("RescaleSlope", "0000000000", "0 is not a usable value (a finite number, not 0)"),  # a number: shown
    ("RescaleIntercept", "CANARYINT1", "holds a value that is not a number (a finite number)")])
def test_a_rescale_that_is_no_usable_number_is_refused_without_its_text(shared_data, tmp_path, tag, text, wrong):
    def edit(i, ds):
        if i == 2:
            setattr(ds, tag, "8888888888")

    folder = _text_in_header(real_slices(shared_data, tmp_path / "s", edit), "8888888888", text)
    with pytest.raises(ImageReadError) as e:
        read_image(folder)
    assert str(e.value) == f"{folder}: file 3 of 8: {tag} {wrong}"


def test_series_numbers_holding_text_are_not_repeated_in_the_refusal(shared_data, tmp_path):
    def number(value):
        def edit(i, ds):
            ds.SeriesNumber = value
        return edit

    real_slices(shared_data, tmp_path / "s", number(2), n=2, prefix="a")
    real_slices(shared_data, tmp_path / "s", number(777777), n=2, prefix="b")
    folder = _text_in_header(tmp_path / "s", "777777", "CANARY")
    with pytest.raises(ImageReadError) as e:
        read_image(folder)
    assert str(e.value) == f"{folder}: slices carry SeriesNumber 2 different values: more than one series (split " \
                           f"them into one folder each)"


def test_a_single_slice_whose_thickness_is_text_is_refused_naming_the_tag(shared_data, tmp_path):
    def edit(i, ds):
        ds.SliceThickness = "9999999999"
        if "SpacingBetweenSlices" in ds:
            del ds.SpacingBetweenSlices

    folder = _text_in_header(real_slices(shared_data, tmp_path / "s", edit, n=1), "9999999999", "CANARYTHK1")
    with pytest.raises(ImageReadError) as e:
        read_image(folder / "000.dcm")
    assert str(e.value) == f"{folder / '000.dcm'}: SliceThickness holds a value that is not a number"
