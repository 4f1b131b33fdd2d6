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
