"""Scans that are not a usable body CT, and target spacings that are not a voxel size, are
refused in one line by prepare (and by the same checks in predict: tests/hostile)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from raw_cases import affine_lps, phantom, save, write_csv

from lnfm.config import ConfigError
from lnfm.cli import run_job
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.scan_checks import check_target_spacing


@pytest.mark.parametrize("spacing", [(-1.5, 1.5, 1.5), (0.0, 1.0, 1.0), (math.nan, 1, 1), (1e4, 1e4, 1e4),
                                     (1e-4, 1.0, 1.0), (math.inf, 1, 1)])
def test_absurd_target_spacing_is_one_config_error_before_any_case(tmp_path, spacing):
    img, _ = phantom()
    csv_path = write_csv(tmp_path / "cases.csv", [{"case_id": "a", "image": save(tmp_path / "a.nii.gz", img,
                                                                                  affine_lps())}])
    with pytest.raises(ConfigError, match=r"^spacing: .* is not a voxel size"):
        prepare_dataset(str(csv_path), str(tmp_path / "store"), PrepareConfig(workers=0, spacing=spacing),
                        show_progress=False)
    assert not (tmp_path / "store").exists()


def test_valid_spacing_passes_as_floats():
    assert check_target_spacing([1, "1.5", 2.0]) == (1.0, 1.5, 2.0) and check_target_spacing(None) is None


def test_spacing_flag_error_is_one_line_and_exit_2(tmp_path, capsys):
    img, _ = phantom()
    csv_path = write_csv(tmp_path / "cases.csv", [{"case_id": "a", "image": save(tmp_path / "a.nii.gz", img,
                                                                                  affine_lps())}])
    rc = run_job("prepare", ["--input", str(csv_path), "--output", str(tmp_path / "store"), "--spacing=-1,1,1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["lnfm prepare: error: spacing: [-1.0, 1.0, 1.0] is not a voxel size (three values "
                               "from 0.05 to 20 mm)"]


def _bad_scans(root):
    img, _ = phantom()
    return {
        "one_voxel": (save(root / "one.nii.gz", np.full((1, 1, 1), 40, np.int16), np.eye(4)), "at least 2 voxels"),
        "all_air": (save(root / "air.nii.gz", np.full(img.shape, -1000, np.int16) + (img > 0), affine_lps()),
                    "all air"),
        "saturated": (save(root / "sat.nii.gz", np.where(img > 0, 32767, img).astype(np.int16), affine_lps()),
                      "int16 range"),
        "beyond_int16": (save(root / "big.nii.gz", img.astype(np.float32) * 1000, affine_lps()), "int16 range"),
        "coarse_source": (save(root / "coarse.nii.gz", img, np.diag([25.0, 1, 1, 1])), "absurd voxel spacing"),
    }


def test_unusable_scans_fail_in_one_line_naming_the_file(tmp_path):
    scans = _bad_scans(tmp_path)
    img, _ = phantom()
    rows = [{"case_id": k, "image": path} for k, (path, _) in scans.items()]
    rows.append({"case_id": "good", "image": save(tmp_path / "good.nii.gz", img, affine_lps())})
    res = prepare_dataset(str(write_csv(tmp_path / "cases.csv", rows)), str(tmp_path / "store"),
                          PrepareConfig(workers=0, salt="s"), show_progress=False)
    assert res.converted == 1
    got = {f["case_id"]: (f["file"], f["reason"]) for f in res.failures}
    for case, (path, reason) in scans.items():
        assert got[case][0] == path and reason in got[case][1] and "\n" not in got[case][1], (case, got[case])
