"""predict's mark on its own outputs: what `--force` may replace. Files a user has (a real CT and a real
segmentation mask, a scanner's DICOM slice, a CSV, a PNG saved without the mark, a link) are not predict's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lnfm.eval.report import node_table, report_csv, write_overlay
from lnfm.io import write_nifti
from lnfm.jobs.predict_marks import earlier_nifti_mark, made_by_predict, nifti_descrip


def test_predicts_own_files_carry_its_mark(tmp_path):
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[3:7, 3:6, 2:5] = 1
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    write_nifti(tmp_path / "mask.nii.gz", labels, affine, nifti_descrip(labels, affine))
    (tmp_path / "nodes.csv").write_text(report_csv(node_table(labels, affine, labels * 40.0, labels * 0.9,
                                                              ["background", "lymph_node"])))
    write_overlay(tmp_path / "view.png", labels * 40.0, labels, affine)
    for name in ("mask.nii.gz", "nodes.csv", "view.png"):
        assert made_by_predict(tmp_path / name), name
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "mask.nii.gz")  # predict never writes a link
    assert not made_by_predict(tmp_path / "link.nii.gz")


def test_a_users_files_are_not_predicts(tmp_path, shared_data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct = shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
    mask = shared_data / "ct" / "totalsegmentator" / "example_seg.nii.gz"  # a real segmentation mask
    dicom = shared_data / "dicom_small" / "pydicom_CT_small.dcm"
    assert ct.is_file() and mask.is_file() and dicom.is_file()
    assert pydicom.dcmread(dicom, stop_before_pixels=True).get("Manufacturer") != "LNFM"
    write_nifti(tmp_path / "plain.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))  # no description
    (tmp_path / "notes.csv").write_text("node,short_axis_mm\n1,9.5\n")
    fig = plt.figure()
    fig.savefig(tmp_path / "plot.png")
    plt.close(fig)
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    (tmp_path / "mask.seg.dcm").write_bytes(b"DICM but not DICOM")
    for path in (ct, mask, dicom, tmp_path / "plain.nii.gz", tmp_path / "notes.csv", tmp_path / "plot.png",
                 tmp_path / "broken.nii.gz", tmp_path / "mask.seg.dcm", tmp_path / "missing.nii.gz", tmp_path):
        assert not made_by_predict(path), path


def test_a_changed_output_is_no_longer_predicts(tmp_path):
    """A mask corrected in nibabel with predict's header passed along keeps the description's text, and an
    annotated report keeps its first line: the digests tell them from predict's own unchanged files."""
    import nibabel as nib

    labels = np.zeros((12, 10, 8), np.uint8)
    labels[3:7, 3:6, 2:5] = 1
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    write_nifti(tmp_path / "mask.nii.gz", labels, affine, nifti_descrip(labels, affine))
    img = nib.load(tmp_path / "mask.nii.gz")
    assert bytes(img.header["descrip"]).startswith(b"lnfm predict v2 sha256:")
    same = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(same, img.affine, img.header), tmp_path / "resaved.nii.gz")  # the same voxels
    reviewed = same.copy()
    reviewed[3, 3, 2] = 0  # one voxel corrected
    nib.save(nib.Nifti1Image(reviewed, img.affine, img.header), tmp_path / "reviewed.nii.gz")
    assert bytes(nib.load(tmp_path / "reviewed.nii.gz").header["descrip"]) == bytes(img.header["descrip"])
    assert made_by_predict(tmp_path / "resaved.nii.gz")
    assert not made_by_predict(tmp_path / "reviewed.nii.gz")
    write_nifti(tmp_path / "old.nii.gz", labels, affine, "lnfm predict")  # the mark's text without a digest
    assert not made_by_predict(tmp_path / "old.nii.gz")

    text = report_csv(node_table(labels, affine, labels * 40.0, labels * 0.9, ["background", "lymph_node"]))
    (tmp_path / "nodes.csv").write_text(text)
    assert made_by_predict(tmp_path / "nodes.csv")
    first, table = text.split("\n", 1)
    (tmp_path / "annotated.csv").write_text(f"{first}\n{table.rstrip()},reviewed: benign\n")
    assert not made_by_predict(tmp_path / "annotated.csv")


def test_a_mask_whose_geometry_was_corrected_is_no_longer_predicts(tmp_path):
    """A mask moved into place with nibabel (the affine corrected, voxels and predict's header passed along)
    kept the mark's text and the voxels' digest, so --force replaced the user's correction. The digest now
    covers the geometry as written: qform, sform, their codes, voxel sizes, units and the voxels' scaling."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    sheared = np.array([[0.8, 0.3, 0, 4], [0, 0.8, 0, -3], [0, 0, 2.0, 7], [0, 0, 0, 1]])  # no qform holds it
    for name, data, affine in [("mask.nii.gz", (rng.random((12, 10, 8)) > 0.7).astype(np.uint8),
                                np.diag([0.8, -0.8, 2.0, 1.0])),
                               ("prob.nii", rng.random((12, 10, 8, 2)).astype(np.float32), sheared)]:
        path = tmp_path / name
        write_nifti(path, data, affine, nifti_descrip(data, affine))
        img = nib.load(path)
        assert img.header["descrip"].tobytes().startswith(b"lnfm predict v2 sha256:")
        assert made_by_predict(path) and not earlier_nifti_mark(path)
        moved = img.affine.copy()
        moved[0, 3] += 5.0  # 5 mm along x

        def qform_moved(header):  # the qform alone: a reader that takes it sees the scan moved
            header.set_qform(moved, code=1)

        def scaled(header):  # every voxel value doubled
            header.set_slope_inter(2.0, 0.0)

        def in_metres(header):
            header.set_xyzt_units("meter")

        for edit_affine, edit_header, ours in [(img.affine, None, True),  # re-saved unchanged: still predict's
                                               (moved, None, False),  # both forms follow the new affine
                                               (img.affine, qform_moved, False),
                                               (img.affine, scaled, False),
                                               (img.affine, in_metres, False)]:
            edited = nib.Nifti1Image(np.asarray(img.dataobj), edit_affine, img.header.copy())
            if edit_header is not None:
                edit_header(edited.header)
            nib.save(edited, tmp_path / f"edited_{name}")
            assert nib.load(tmp_path / f"edited_{name}").header["descrip"] == img.header["descrip"]  # text kept
            assert made_by_predict(tmp_path / f"edited_{name}") == ours, (name, edit_header)


def test_an_earlier_predicts_mark_is_known_and_not_replaced(tmp_path):
    """The mark before v2 digested the voxels alone: a file carrying it may have had its geometry corrected
    since, which it cannot tell, so it is not predict's own (and predict's refusal says why)."""
    import hashlib

    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2:4, 2:4, 1:3] = 1
    h = hashlib.sha256(f"{labels.dtype.str}{labels.shape}".encode())
    h.update(labels.tobytes())
    write_nifti(tmp_path / "old.nii.gz", labels, np.eye(4), f"lnfm predict sha256:{h.hexdigest()[:16]}")
    assert earlier_nifti_mark(tmp_path / "old.nii.gz") and not made_by_predict(tmp_path / "old.nii.gz")
    write_nifti(tmp_path / "new.nii.gz", labels, np.eye(4), nifti_descrip(labels, np.eye(4)))
    (tmp_path / "notes.csv").write_text("lnfm predict sha256:0\n")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "old.nii.gz")
    os.mkfifo(tmp_path / "pipe.nii.gz")  # never opened: reading it would wait for a writer
    assert made_by_predict(tmp_path / "new.nii.gz") and not earlier_nifti_mark(tmp_path / "new.nii.gz")
    for path in ("notes.csv", "missing.nii.gz", "link.nii.gz", "pipe.nii.gz"):
        assert not earlier_nifti_mark(tmp_path / path) and not made_by_predict(tmp_path / path), path


def test_a_bad_nifti_is_no_earlier_mark_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """What a bad file raises (not gzip, cut short, damaged, empty, foreign) is no mark; any other error was read
    as 'no mark' too, a bug inside the read included."""
    import gzip

    from lnfm.jobs import predict_marks

    labels = np.zeros((6, 5, 4), np.uint8)
    write_nifti(tmp_path / "old.nii.gz", labels, np.eye(4), "lnfm predict sha256:0123456789abcdef")
    raw = (tmp_path / "old.nii.gz").read_bytes()
    damaged = bytearray(raw)
    damaged[20:200] = bytes(180)
    bad = {"cut.nii.gz": raw[:40], "damaged.nii.gz": bytes(damaged), "plain.nii.gz": gzip.decompress(raw),
           "empty.nii": b"", "text.nii": b"hello " * 100}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        assert not earlier_nifti_mark(tmp_path / name), name
    assert earlier_nifti_mark(tmp_path / "old.nii.gz")

    def bug(path):
        raise TypeError("a bug inside the read")

    monkeypatch.setattr(predict_marks, "stored_header", bug)
    with pytest.raises(TypeError, match="a bug inside the read"):
        earlier_nifti_mark(tmp_path / "old.nii.gz")


def test_a_bad_file_of_each_kind_is_not_predicts_and_a_bug_keeps_its_traceback(tmp_path, shared_data, monkeypatch):
    """What a damaged, cut or foreign file of each kind predict writes raises (found by reading thousands of them)
    is not predict's: nibabel's and gzip's errors, PIL's (a
    broken chunk is a SyntaxError, a size damaged in IHDR a DecompressionBombError), pydicom's (a TypeError too,
    where a damaged VR makes SpecificCharacterSet a number). Any other error was read as 'not predict's' too, a bug
    inside the check included."""
    import gzip
    import struct
    import zlib

    from PIL import Image, PngImagePlugin

    from lnfm.eval.report import OVERLAY_DIGEST, OVERLAY_SOFTWARE, overlay_digest
    from lnfm.io.dicom_source import MANUFACTURER
    from lnfm.jobs import predict_marks
    from lnfm.jobs.predict_marks import seal_dicom

    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2:4, 2:4, 1:3] = 1
    write_nifti(tmp_path / "mask.nii", labels, np.eye(4), nifti_descrip(labels, np.eye(4)))
    nii = (tmp_path / "mask.nii").read_bytes()
    (tmp_path / "mask.nii.gz").write_bytes(gzip.compress(nii, mtime=0))
    (tmp_path / "nodes.csv").write_text(report_csv(node_table(labels, np.eye(4), labels * 40.0, labels * 0.9,
                                                              ["background", "lymph_node"])))
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", OVERLAY_SOFTWARE)
    info.add_text(OVERLAY_DIGEST, overlay_digest(Image.new("RGB", (8, 8))))
    Image.new("RGB", (8, 8)).save(tmp_path / "view.png", pnginfo=info)
    png = (tmp_path / "view.png").read_bytes()
    ds = pydicom.dcmread(shared_data / "dicom_small/pydicom_CT_small.dcm")
    ds.Manufacturer = MANUFACTURER
    ds.save_as(tmp_path / "case.seg.dcm")
    seal_dicom(tmp_path / "case.seg.dcm")
    dcm = (tmp_path / "case.seg.dcm").read_bytes()
    for name in ("mask.nii", "mask.nii.gz", "nodes.csv", "view.png", "case.seg.dcm"):
        assert made_by_predict(tmp_path / name), name

    def at(raw: bytes, offset: int, value: bytes) -> bytes:  # `value` written over the bytes at `offset`
        return raw[:offset] + value + raw[offset + len(value):]

    idat = png.index(b"IDAT") - 4  # its length 8 short: the next chunk's type is read from the data
    ihdr = png[12:16] + struct.pack(">II", 1 << 20, 1 << 20) + png[24:29]
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from pydicom.errors import InvalidDicomError

    deflate = gzip.compress(nii, mtime=0)
    bad = {"cut.nii": (nii[:360], OSError),
           "nan_offset.nii": (at(nii, 108, struct.pack("<f", float("nan"))), ValueError),
           "huge_offset.nii": (at(nii, 108, struct.pack("<f", 1e30)), OverflowError),
           "dtype.nii": (at(nii, 70, struct.pack("<h", 99)), HeaderDataError),
           "negative_dim.nii": (at(nii, 42, struct.pack("<h", -7)), ValueError),
           "magic.nii": (at(nii, 344, b"xyz\0"), ImageFileError), "cut.nii.gz": (deflate[:100], EOFError),
           "deflate.nii.gz": (at(deflate, 10, bytes([deflate[10] | 6])), zlib.error),  # a reserved block type
           "plain.nii.gz": (nii, OSError),
           "cut.png": (png[:60], OSError), "text.png": (b"hello", OSError),
           "chunk.png": (at(png, idat, struct.pack(">I", struct.unpack(">I", png[idat:idat + 4])[0] - 8)), SyntaxError),
           "bomb.png": (at(png, 12, ihdr + struct.pack(">I", zlib.crc32(ihdr))), Image.DecompressionBombError),
           "charset_vr.dcm": (dcm.replace(b"\x08\x00\x05\x00CS", b"\x08\x00\x05\x00US", 1), TypeError),
           "unknown_vr.dcm": (dcm.replace(b"\x08\x00\x70\x00LO", b"\x08\x00\x70\x00Lx", 1), NotImplementedError),
           "cut.dcm": (dcm[:152], struct.error), "text.dcm": (b"hello", InvalidDicomError)}

    def png_text(path):
        with Image.open(path) as image:
            return image.text

    reads = {".nii": predict_marks._nifti_is_predicts, ".gz": predict_marks._nifti_is_predicts, ".png": png_text,
             ".dcm": predict_marks._dicom_is_predicts}
    for name, (data, raises) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(raises):  # what each is
            reads[Path(name).suffix](tmp_path / name)
        assert not made_by_predict(tmp_path / name), name
    # 35 TB claimed: nibabel's buffer for it failed, or under overcommit the read found the file short; the
    # size alone now tells it is not predict's, and nothing is read
    (tmp_path / "huge.nii").write_bytes(at(nii, 42, struct.pack("<hhh", 32767, 32767, 32767)))
    assert predict_marks._nifti_is_predicts(tmp_path / "huge.nii") is False

    def bug(*args, **kwargs):
        raise TypeError("a bug inside the check")

    for where, name, path in ((predict_marks, "nifti_digest", "mask.nii.gz"), (predict_marks, "nifti_digest",
                              "mask.nii"), (predict_marks, "report_is_unchanged", "nodes.csv"),
                              (Image, "open", "view.png"), (predict_marks, "dicom_digest", "case.seg.dcm")):
        with monkeypatch.context() as m:
            m.setattr(where, name, bug)
            with pytest.raises(TypeError, match="a bug inside the check"):
                made_by_predict(tmp_path / path)


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.nii"])
def test_a_marked_nifti_claiming_more_voxels_than_its_file_holds_is_not_read(tmp_path, monkeypatch, name):
    """A damaged header of predict's mask that claims 64 GB was read whole: nibabel allocated and zero-filled
    it, which ends in the kernel's out-of-memory kill rather than an error. Such a file is not predict's,
    and is told so from its size (deflate packs at most about 1032 bytes into one) without reading it."""
    import gzip

    import lnfm.jobs.predict_marks as M

    labels = np.zeros((12, 10, 8), np.uint8)
    labels[3:7, 3:6, 2:5] = 1
    path = tmp_path / name
    write_nifti(path, labels, np.eye(4), nifti_descrip(labels, np.eye(4)))
    assert made_by_predict(path)
    raw = bytearray(gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes())
    raw[42:48] = np.array([4000, 4000, 4000], "<i2").tobytes()  # dim[1:4] of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    assert M.stored_header(str(path)).get_data_shape() == (4000, 4000, 4000)

    def no_read(*args, **kwargs):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(M.nib, "load", no_read)
    assert not made_by_predict(path)


def test_an_overlay_edited_with_its_text_chunks_kept_is_no_longer_predicts(tmp_path):
    """The overlay's mark was its Software text alone: an annotated copy saved with its text chunks kept (as
    PIL does when given them back) was replaced by `--force`. The mark now holds a digest of the pixels; an
    overlay of an earlier predict (Software alone) is refused, naming why, as earlier NIfTI marks are."""
    from PIL import Image, ImageDraw, PngImagePlugin

    from lnfm.jobs.predict_marks import earlier_mark

    labels = np.zeros((12, 10, 8), np.uint8)
    labels[3:7, 3:6, 2:5] = 1
    write_overlay(tmp_path / "view.png", labels * 40.0, labels, np.diag([0.8, 0.8, 2.0, 1.0]))
    assert made_by_predict(tmp_path / "view.png") and earlier_mark(tmp_path / "view.png") is None
    with Image.open(tmp_path / "view.png") as image:
        text = dict(image.text)
        edited = image.copy()
    assert text["Software"] == "lnfm predict" and text["LNFM digest"].startswith("sha256:")
    ImageDraw.Draw(edited).line([(5, 5), (40, 40)], fill=(255, 255, 0, 255), width=3)  # a user's annotation
    kept = PngImagePlugin.PngInfo()
    for key, value in text.items():
        kept.add_text(key, value)
    edited.save(tmp_path / "annotated.png", pnginfo=kept)
    assert not made_by_predict(tmp_path / "annotated.png") and earlier_mark(tmp_path / "annotated.png") is None
    earlier = PngImagePlugin.PngInfo()
    earlier.add_text("Software", "lnfm predict")
    edited.save(tmp_path / "earlier.png", pnginfo=earlier)
    assert not made_by_predict(tmp_path / "earlier.png")
    assert earlier_mark(tmp_path / "earlier.png") == ("whose overlay mark holds no digest of its pixels: an edited "
                                                      "copy cannot be told")
