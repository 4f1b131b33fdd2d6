"""A scan the host cannot segment is refused in one line before the network runs (it ended in an OOM kill)."""

from __future__ import annotations

import pytest
from export_helpers import tiny  # noqa: F401  (session fixture)
from scan_bombs import nifti_bomb

from lnfm.cli import run_job
from lnfm.jobs import predict as pr
from lnfm.jobs import predict_memory as pm


def test_the_estimate_by_hand():
    # 100x100x50 voxels of 0.75x0.75x3 mm on a 1.5 mm grid: 50x50x100 = 250,000 grid voxels, 500,000 scan voxels
    assert pm.grid_voxels((100, 100, 50), (0.75, 0.75, 3.0), (1.5, 1.5, 1.5)) == 250_000
    assert pm.prediction_bytes((100, 100, 50, 1), (0.75, 0.75, 3.0), (1.5, 1.5, 1.5), 2, False) == \
        500_000 * 9 + 250_000 * 15
    assert pm.prediction_bytes((100, 100, 50), (0.75, 0.75, 3.0), (1.5, 1.5, 1.5), 4, True) == \
        500_000 * (9 + 8) + 250_000 * (15 + 2 * 4)
    assert pm.grid_voxels((10, 10, 10), (1.0, 1.0, 1.0), (3.0, 3.0, 3.0)) == 4 * 4 * 4  # a partial voxel counts
    assert pm.process_bytes() > 0  # this process's VmRSS


def _scan(tiny):  # noqa: F811
    return str(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz")


def test_a_scan_larger_than_the_host_is_one_line_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pm, "host_memory", lambda: (1024, 1024))
    monkeypatch.setattr(pr, "load_predictor", lambda *a, **k: pytest.fail("the model loaded"))
    scan = _scan(tiny)
    args = ["--model", str(tiny.orbax), "--input", scan, "--output", str(tmp_path / "m.nii.gz")]
    assert run_job("predict", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lnfm predict: error: {scan}: segmenting it needs about "), err
    assert "more than this host's 0.0 GiB" in err[-1] and not (tmp_path / "m.nii.gz").exists()


def test_a_scan_larger_than_the_free_memory_is_warned_without_its_path(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pm, "host_memory", lambda: (10**15, 1024))
    scan = _scan(tiny)
    assert run_job("predict", ["--model", str(tiny.orbax), "--input", scan, "--output", str(tmp_path / "m.nii.gz"),
                               "--probabilities", str(tmp_path / "p.nii.gz")]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "segmenting it needs about" in line]
    assert len(warned) == 1 and "with the probabilities" in warned[0] and "free now" in warned[0], err
    assert scan not in err and str(tiny.raw) not in err  # logs carry no input path
    assert (tmp_path / "m.nii.gz").exists()
    monkeypatch.setattr(pm, "host_memory", lambda: (10**15, 10**15))
    args = ["--model", str(tiny.orbax), "--input", scan, "--output", str(tmp_path / "n.nii.gz")]
    assert run_job("predict", args) == 0
    assert "segmenting it needs" not in capsys.readouterr().err


def test_a_batchs_case_too_large_fails_on_its_own_line(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """In a batch each case is checked when it is read; a case too large is reported and the batch goes on."""
    monkeypatch.setattr(pm, "host_memory", lambda: (1024, 1024))
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(tiny.raw / "imagesTr"),
                             "--output", str(tmp_path / "masks")])
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED ")]
    assert rc == 1 and len(failed) == len(tiny.records), failed
    assert all("segmenting it needs about" in line and "more than this host's" in line for line in failed)
    assert not list((tmp_path / "masks").glob("*.nii.gz"))


def _no_read(*args, **kwargs):
    pytest.fail("the scan's voxels were read before its size was checked")


def test_a_scan_too_large_is_refused_from_its_header_before_a_voxel_is_read(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A compressed scan that inflates to nearly the host's memory was read in full (pushing other processes out)
    before the same sentence refused it."""
    monkeypatch.setattr(pm, "host_memory", lambda: (16 * pm.GIB, 16 * pm.GIB))
    monkeypatch.setattr(pr, "read_channels", _no_read)
    scan = nifti_bomb(tmp_path / "bomb.nii.gz")
    assert run_job("predict", ["--model", str(tiny.orbax), "--input", scan, "--output", str(tmp_path / "m.nii.gz")]) \
        == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lnfm predict: error: {scan}: segmenting it needs about "), err
    assert "(4000x4000x2000 voxels, " in err[0] and err[0].endswith("more than this host's 16.0 GiB"), err


def test_the_header_check_says_what_the_check_after_the_read_says(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pm, "host_memory", lambda: (1024, 1024))
    monkeypatch.setattr(pm, "process_bytes", lambda: 0)
    meta, scan = pr.read_meta(tiny.orbax), _scan(tiny)
    with pytest.raises(pr.PredictError) as before:
        pr.check_header_memory([scan], meta, True)
    with pytest.raises(pr.PredictError) as after:
        pr.check_scan_memory(pr.read_scan([scan], meta), meta, True, scan)
    assert str(before.value) == str(after.value) and "with the probabilities" in str(before.value)
    monkeypatch.setattr(pm, "host_memory", lambda: (10**15, 1024))  # more than is free: warned once, after the read
    pr.check_header_memory([scan], meta, True)


def test_a_batchs_case_too_large_is_refused_before_its_voxels_are_read(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pm, "host_memory", lambda: (1024, 1024))
    monkeypatch.setattr(pr, "read_channels", _no_read)
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(tiny.raw / "imagesTr"),
                             "--output", str(tmp_path / "masks")])
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED ")]
    assert rc == 1 and len(failed) == len(tiny.records), failed
    assert all("segmenting it needs about" in line and "more than this host's" in line for line in failed)
