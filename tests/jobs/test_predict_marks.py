"""predict's mark on its own outputs: what `--force` may replace. Files a user has (a real CT and a real
segmentation mask, a scanner's DICOM slice, a CSV, a PNG saved without the mark, a link) are not predict's."""

from __future__ import annotations

import numpy as np
import pydicom

from lnfm.eval.report import node_table, report_csv, write_overlay
from lnfm.io import write_nifti
from lnfm.jobs.predict_marks import made_by_predict, nifti_descrip


def test_predicts_own_files_carry_its_mark(tmp_path):
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[3:7, 3:6, 2:5] = 1
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    write_nifti(tmp_path / "mask.nii.gz", labels, affine, nifti_descrip(labels))
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
    write_nifti(tmp_path / "mask.nii.gz", labels, affine, nifti_descrip(labels))
    img = nib.load(tmp_path / "mask.nii.gz")
    assert bytes(img.header["descrip"]).startswith(b"lnfm predict sha256:")
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
