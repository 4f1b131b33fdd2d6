"""Case discovery: CSV encodings and DICOM-folder sites that do not leak folder names."""

from __future__ import annotations

import numpy as np
from raw_cases import phantom, save

from lnfm.data.cases import UNSPECIFIED_SITE, discover


def test_csv_with_a_byte_order_mark_keeps_its_case_id_column(tmp_path):
    img, _ = phantom()
    image = save(tmp_path / "a.nii.gz", img, np.eye(4))
    # Excel's "CSV UTF-8" starts with a byte-order mark before the first column name.
    (tmp_path / "cases.csv").write_bytes("\ufeffcase_id,image,site\nmy_case,a.nii.gz,pelvis\n".encode())
    cases, errors = discover(str(tmp_path / "cases.csv"))
    assert errors == []
    assert [(c.case_id, c.images, c.site) for c in cases] == [("my_case", [image], "pelvis")]


def test_a_csv_column_prepare_does_not_read_is_one_input_error(tmp_path):
    """'Label' and 'PET' were passed over: the case was stored unlabelled and CT-only, exit 0."""
    img, lab = phantom()
    save(tmp_path / "a.nii.gz", img, np.eye(4))
    save(tmp_path / "a_lab.nii.gz", lab, np.eye(4))
    (tmp_path / "cases.csv").write_text("case_id,image,Label\nmy_case,a.nii.gz,a_lab.nii.gz\n")
    cases, errors = discover(str(tmp_path / "cases.csv"))
    assert cases == [] and [(e.file, e.reason) for e in errors] == [(str(tmp_path / "cases.csv"), (
        "CSV column 'Label' is not one prepare reads (the columns are case_id,image,label,site,pet,split; names are "
        "case-sensitive)"))]


def test_csv_that_is_not_utf8_is_one_input_error(tmp_path):
    (tmp_path / "cases.csv").write_bytes("case_id,image\nf\xe9e,a.nii.gz\n".encode("latin-1"))
    cases, errors = discover(str(tmp_path / "cases.csv"))
    assert cases == [] and [(e.file, e.reason) for e in errors] == [(str(tmp_path / "cases.csv"),
                                                                     "CSV is not UTF-8 text")]


def test_dicom_folder_site_is_never_the_folder_name(shared_data, tmp_path):
    root = tmp_path / "DOE_JOHN_PID12345"
    root.mkdir()
    (root / "series").symlink_to(shared_data / "ct/totalsegmentator/example_ct_dicom")
    cases, errors = discover(str(root), salt="s")
    assert errors == [] and [c.site for c in cases] == [UNSPECIFIED_SITE]
    cases, _ = discover(str(root), site="mediastinum", salt="s")
    assert [c.site for c in cases] == ["mediastinum"]


def _nnunet(root, images, labels, dataset='{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}'):
    """An nnU-Net raw folder of empty files (discovery reads names only)."""
    for folder, names in (("imagesTr", images), ("labelsTr", labels)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n in names:
            (root / folder / n).write_bytes(b"")
    if dataset is not None:
        (root / "dataset.json").write_text(dataset)
    return root


def test_nnunet_image_without_channel_suffix_and_its_label_are_reported_not_dropped(tmp_path):
    root = _nnunet(tmp_path, ["caseA_0000.nii.gz", "caseB.nii.gz", "notes.txt"], ["caseA.nii.gz", "caseB.nii.gz"])
    cases, errors = discover(str(root))
    assert [(c.case_id, c.images, c.label) for c in cases] == [
        ("caseA", [str(root / "imagesTr/caseA_0000.nii.gz")], str(root / "labelsTr/caseA.nii.gz"))]
    assert [(e.file, e.reason) for e in errors] == [
        (str(root / "imagesTr/caseB.nii.gz"),
         "name lacks the _NNNN channel suffix nnU-Net uses (CASE_0000 for CT, CASE_0001 for PET)"),
        (str(root / "labelsTr/caseB.nii.gz"), "label without an image: no imagesTr/caseB_0000 file")]


def test_nnunet_undeclared_channel_fails_its_case_and_an_orphan_label_is_named(tmp_path):
    root = _nnunet(tmp_path, ["caseA_0000.nii.gz", "caseA_0001.nii.gz", "caseC_0000.nrrd"],
                   ["caseA.nii.gz", "caseC.nii.gz", "caseZ.nii.gz"])
    cases, errors = discover(str(root))
    assert [c.case_id for c in cases] == ["caseC"]
    assert [(e.file, e.reason) for e in errors] == [
        (str(root / "imagesTr/caseA_0001.nii.gz"), "channel 0001 is not declared (dataset.json declares 0000 CT); "
                                                   "declare it in dataset.json or move the file away"),
        (str(root / "labelsTr/caseZ.nii.gz"), "label without an image: no imagesTr/caseZ_0000 file")]
    # Without a dataset.json the folder has one channel, CT: a PET file beside it is named the same way.
    (root / "dataset.json").unlink()
    _, errors = discover(str(root))
    assert (str(root / "imagesTr/caseA_0001.nii.gz"), "channel 0001 is not declared (no dataset.json: 0000 CT "
                                                       "only); declare it in dataset.json or move the file away") \
        in [(e.file, e.reason) for e in errors]
    # Declared, the same files make a two-channel case (and caseC, lacking its PET, is named).
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT", "1": "PET"}}')
    cases, errors = discover(str(root))
    assert [(c.case_id, c.channels) for c in cases] == [("caseA", ["CT", "PET"])]
    assert [(e.file, e.reason) for e in errors] == [(str(root / "imagesTr/caseC_0001"), "missing file (channel)"),
                                                    (str(root / "labelsTr/caseZ.nii.gz"),
                                                     "label without an image: no imagesTr/caseZ_0000 file")]
