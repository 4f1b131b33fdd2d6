"""`lnfm predict --format nifti,dicom-seg,rtstruct` end to end on the real DICOM series: the DICOM
outputs carry the NIfTI mask of the same prediction onto the source slices; patient data reach
them and nothing else; non-DICOM input is a one-line error."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_phantoms import (PATIENT_ID, PATIENT_NAME, REAL_SERIES, add_canaries, assert_no_canaries, count_reads,
                            expected_frame, files_under, forget_headers, rasterise_rtstruct, read_sources,
                            restored_real_series, seg_frames)
from export_helpers import make_finetune_workdir, tiny  # noqa: F401  (session fixture)
from scipy import ndimage

from lnfm.cli import run_job
from lnfm.eval.report import read_report
from lnfm.io import read_image
from lnfm.io.dicom_source import find_nodes, node_map
from lnfm.jobs import predict as pr
from lnfm.jobs.predict_dicom import export_digest, output_paths, parse_formats


def test_output_paths_and_formats():
    assert parse_formats(None) == ("nifti",)
    assert parse_formats(["rtstruct,nifti", "dicom-seg"]) == ("nifti", "dicom-seg", "rtstruct")
    paths = output_paths(Path("out/case.nii.gz"), ("nifti", "dicom-seg", "rtstruct"))
    assert paths == {"nifti": Path("out/case.nii.gz"), "dicom-seg": Path("out/case.seg.dcm"),
                     "rtstruct": Path("out/case.rtstruct.dcm")}
    assert output_paths(Path("out/case"), ("dicom-seg",)) == {"dicom-seg": Path("out/case.seg.dcm")}
    with pytest.raises(ValueError, match="unknown format 'dicom'"):
        parse_formats(["dicom"])


@pytest.fixture(scope="module")
def marking(tiny, tmp_path_factory):  # noqa: F811
    """The tiny model with a foreground bias that marks a few nodes on the real series."""
    from lnfm.jobs.export import export_model

    root = tmp_path_factory.mktemp("marking")
    workdir, _, _ = make_finetune_workdir(root, tiny.store, bias=-0.1)
    return export_model(workdir, root / "export", "orbax")


def test_real_series_end_to_end(marking, tmp_path, capsys, caplog):
    if not REAL_SERIES.is_dir():
        pytest.skip("../shared/data is absent")
    series = restored_real_series(tmp_path / "in" / "study")
    add_canaries(series)  # optional patient, study and site attributes no output may copy
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="lnfm")
    argv = ["--model", str(marking), "--input", str(series), "--output", str(out / "case.nii.gz"),
            "--format", "nifti,dicom-seg", "--format", "rtstruct", "--rtstruct-all-nodes",
            "--report", str(out / "case.csv"), "--overlay", str(out / "case.png")]
    assert pr.run(pr.build_parser().parse_args(argv)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case.csv", "case.nii.gz", "case.png", "case.rtstruct.dcm",
                                                     "case.seg.dcm"]
    vol = read_image(series)
    nii = nib.load(out / "case.nii.gz")
    assert np.allclose(nii.affine, vol.affine, atol=1e-4)
    labels = np.asarray(nii.dataobj).astype(np.uint8)
    found = find_nodes(labels, vol.affine)
    nodes = node_map(found, vol.shape3)
    assert 0 < len(found) < 200, "the tiny model should mark a few nodes on this scan"
    sources = read_sources(series)

    # DICOM-SEG: exactly the NIfTI mask, frame by frame, placed by each source file's position
    frames = seg_frames(out / "case.seg.dcm", sources)
    for uid, ds in sources.items():
        assert np.array_equal(frames[uid], expected_frame(labels, ds, vol.affine))
    seg = pydicom.dcmread(out / "case.seg.dcm")
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "LNFM" and export_digest(marking) in str(algo.AlgorithmParameters)

    # RTSTRUCT: one ROI per report row, same numbering, each the node of the NIfTI mask
    rows = read_report(out / "case.csv")
    masks = rasterise_rtstruct(out / "case.rtstruct.dcm", sources, vol.affine, vol.shape3)
    assert list(masks) == [f"LN_pelvis_{n:02d}" for n in range(1, len(rows) + 1)] + ["LN_pelvis_all"]
    for row in rows:
        got, want = masks[f"LN_pelvis_{int(row['node']):02d}"], nodes == int(row["node"])
        assert 2 * (got & want).sum() / (got.sum() + want.sum()) >= 0.95
        centroid = vol.affine @ np.append(ndimage.center_of_mass(got), 1)
        voxel = np.abs(vol.affine[:3, :3]).max(axis=1)
        assert np.all(np.abs(centroid[:3] - [row[f"centroid_ras_{a}_mm"] for a in "xyz"]) <= voxel)
        assert got.sum() == int(row["voxels"])
    assert np.array_equal(masks["LN_pelvis_all"], labels > 0)

    # privacy: the DICOM outputs belong to the patient, and copy nothing else of the source's patient, study or
    # site (as sealed); the CSV, the PNG and the log do not name them
    for name in ("case.seg.dcm", "case.rtstruct.dcm"):
        ds = pydicom.dcmread(out / name)
        assert (str(ds.PatientName), ds.PatientID) == (PATIENT_NAME, PATIENT_ID)
        assert ds.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
        assert_no_canaries(out / name)
    text = caplog.text + capsys.readouterr().err
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe"):
        assert secret not in text
        for name in ("case.csv", "case.png"):
            assert secret.encode() not in (out / name).read_bytes()

    # --force replaces these five files, each recognised as predict's by its mark, and nothing of the source
    from lnfm.jobs.predict_marks import made_by_predict

    outputs = sorted(out.iterdir())
    assert all(made_by_predict(p) for p in outputs)
    assert not any(made_by_predict(p) for p in series.iterdir())  # the scanner's slices carry no such mark

    # ...but not once a user has edited one: an ROI renamed and approved in a planning system, a SEG's
    # series described. --force refuses each in one line and leaves it as the user left it; a plain re-save
    # (pydicom, every value kept) is still predict's.
    for name, edit in (("case.rtstruct.dcm", _approve_first_roi), ("case.seg.dcm", _describe_series),
                       ("case.rtstruct.dcm", _move_first_contour), ("case.seg.dcm", _move_first_frame)):
        original = (out / name).read_bytes()
        resaved = pydicom.dcmread(out / name)
        resaved.save_as(out / name, enforce_file_format=True)
        assert made_by_predict(out / name), name
        edited = pydicom.dcmread(out / name)
        edit(edited)
        edited.save_as(out / name, enforce_file_format=True)
        assert edited.Manufacturer == "LNFM" and not made_by_predict(out / name), name
        users = (out / name).read_bytes()
        capsys.readouterr()
        with pytest.raises(pr.PredictError, match=rf"^{re.escape(str(out / name))}: "):
            pr.run(pr.build_parser().parse_args([*argv, "--force"]))
        assert (out / name).read_bytes() == users
        with pytest.raises(pr.PredictError, match=rf"^{re.escape(str(out / name))}: "):  # nor removed
            pr.run(pr.build_parser().parse_args([*argv, "--force", "--min-volume-mm3", "1e9"]))
        assert (out / name).read_bytes() == users
        (out / name).write_bytes(original)
    inodes = {p.name: p.stat().st_ino for p in outputs}
    assert pr.run(pr.build_parser().parse_args([*argv, "--force"])) == 0
    assert all(p.stat().st_ino != inodes[p.name] for p in sorted(out.iterdir()))

    # a rerun that finds no node writes no RTSTRUCT: the earlier run's goes, so no stale structure set stays
    # beside the new, empty mask (a structure set needs at least one ROI)
    caplog.clear()
    assert pr.run(pr.build_parser().parse_args([*argv, "--force", "--min-volume-mm3", "1e9"])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case.csv", "case.nii.gz", "case.png", "case.seg.dcm"]
    assert not np.asarray(nib.load(out / "case.nii.gz").dataobj).any() and read_report(out / "case.csv") == []
    assert "earlier run's RTSTRUCT at this output is removed" in caplog.text


def _approve_first_roi(ds):
    ds.StructureSetROISequence[0].ROIName = "LN confirmed"
    ds.ApprovalStatus = "APPROVED"


def _describe_series(ds):
    ds.SeriesDescription = "reviewed"


def _move_first_contour(ds):  # geometry corrected: 5 mm along x
    points = ds.ROIContourSequence[0].ContourSequence[0].ContourData
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [float(v) + 5.0 * (i % 3 == 0)
                                                               for i, v in enumerate(points)]


def _move_first_frame(ds):
    plane = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    plane.ImagePositionPatient = [float(plane.ImagePositionPatient[0]) + 5.0, *plane.ImagePositionPatient[1:]]


def test_dicom_format_needs_a_dicom_source(tiny, tmp_path, capsys):  # noqa: F811
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 50, (20, 20, 10)).astype(np.int16), np.eye(4)),
             scan)
    out = tmp_path / "out"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(scan), "--output",
                 str(out / "case.nii.gz"), "--format", "nifti,rtstruct"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"lnfm predict: error: {scan}: --format rtstruct needs a DICOM series")
    assert not out.exists()


def test_anonymised_series_without_uids_is_one_line(tiny, tmp_path, capsys):  # noqa: F811
    if not REAL_SERIES.is_dir():
        pytest.skip("../shared/data is absent")
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(REAL_SERIES), "--output",
                 str(tmp_path / "case"), "--format", "dicom-seg"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "lacks StudyInstanceUID" in err


def test_outputs_never_go_into_the_input_series(tiny, tmp_path, capsys):  # noqa: F811
    if not REAL_SERIES.is_dir():
        pytest.skip("../shared/data is absent")
    series = restored_real_series(tmp_path / "study")
    before = sorted(p.name for p in series.iterdir())
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(series), "--output",
                 str(series / "case"), "--format", "dicom-seg"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "inside the input series folder" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in series.iterdir()) == before


def test_batch_writes_dicom_outputs_for_dicom_cases_and_lists_the_others(tiny, tmp_path, capsys):  # noqa: F811
    from dicom_phantoms import write_series

    folder = tmp_path / "batch"
    hu = np.random.default_rng(1).normal(20, 40, (48, 40, 12)).astype(np.int16)
    hu[:8] = -1000  # air beside the body
    write_series(folder / "series_a", hu, [1, 0, 0], [0, 1, 0], (3.0, 3.0), [0, 0, 3.0], [0, 0, 0])
    nib.save(nib.Nifti1Image(hu, np.diag([3.0, 3.0, 3.0, 1.0])), folder / "plain.nii.gz")
    out = tmp_path / "out"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(folder), "--output",
                 str(out), "--format", "nifti,dicom-seg"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED plain: " in err and "needs a DICOM series" in err
    assert sorted(p.name for p in out.iterdir()) == ["series_a.nii.gz", "series_a.seg.dcm"]
    frames = seg_frames(out / "series_a.seg.dcm", read_sources(folder / "series_a"))
    vol = read_image(folder / "series_a")
    labels = np.asarray(nib.load(out / "series_a.nii.gz").dataobj)
    for uid, ds in read_sources(folder / "series_a").items():
        assert np.array_equal(frames[uid], expected_frame(labels, ds, vol.affine))


def test_slices_sharing_one_sop_instance_uid_are_refused_for_dicom_outputs(tiny, tmp_path, capsys):  # noqa: F811
    """A faulty anonymiser gave every slice one SOPInstanceUID: the SEG's frames and the RTSTRUCT's contours all
    referenced that one slice (exit 0, only a highdicom warning naming no file). Refused in one line; NIfTI still
    written for the same series."""
    from dicom_phantoms import write_series

    series = tmp_path / "series"
    hu = np.random.default_rng(2).normal(20, 40, (48, 40, 12)).astype(np.int16)
    hu[:8] = -1000
    write_series(series, hu, [1, 0, 0], [0, 1, 0], (3.0, 3.0), [0, 0, 3.0], [0, 0, 0])
    for f in sorted(series.iterdir())[:3]:  # three slices take the first's UID
        ds = pydicom.dcmread(f)
        first = pydicom.dcmread(sorted(series.iterdir())[3], stop_before_pixels=True).SOPInstanceUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first
        ds.save_as(f, enforce_file_format=True)
    before = {f.name: f.read_bytes() for f in series.iterdir()}
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(series), "--output",
                 str(tmp_path / "out"), "--format", "nifti,dicom-seg,rtstruct"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "3 of its 12 slices share another slice's SOPInstanceUID" in err and str(series) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert {f.name: f.read_bytes() for f in series.iterdir()} == before
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(series), "--output",
                 str(tmp_path / "mask.nii.gz")])
    assert rc == 0 and (tmp_path / "mask.nii.gz").is_file()


def test_a_batch_parses_each_slice_s_header_once_and_each_slice_once(tiny, shared_data, tmp_path, capsys,  # noqa: F811
                                                                       monkeypatch):
    """Finding the batch's series reads their headers; reading a series finds it again, and its DICOM outputs need
    its headers: both reuse them (before, 4 header reads a slice). The whole file is read once, for its pixels."""
    import shutil

    batch = tmp_path / "batch"
    restored_real_series(batch / "ct")
    shutil.copytree(shared_data / "dicom_small" / "lungmask", batch / "lung", ignore=shutil.ignore_patterns("LICENSE"))
    forget_headers(monkeypatch)
    reads = count_reads(monkeypatch, batch)
    out = tmp_path / "out"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(batch), "--output", str(out), "--format",
                             "nifti,dicom-seg"])
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert rc == 1 and failed == [f"FAILED lung: {batch / 'lung'}: the series lacks FrameOfReferenceUID (anonymised?); "
                                  f"DICOM outputs must reference their source, write --format nifti instead"]
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "ct.seg.dcm"]
    assert dict(reads) == {f: [1, 1] for f in files_under(batch)}


def test_a_series_split_over_two_folders_is_refused_in_prepare_and_in_a_batch(tiny, tmp_path, capsys):  # noqa: F811
    """One series' slices in part1/ and part2/ (a PACS export split by size): prepare stored part1 as a whole
    case and called part2 a duplicate; a batch predicted each half as a scan, exit 0. Both halves now fail,
    naming the other folder, and a whole series beside them goes through."""
    import shutil

    from dicom_phantoms import write_series

    from lnfm.data.cases import discover

    hu = np.random.default_rng(1).normal(20, 40, (48, 40, 12)).astype(np.int16)
    hu[:8] = -1000  # air beside the body
    batch = tmp_path / "batch"
    write_series(batch / "whole", hu, [1, 0, 0], [0, 1, 0], (3.0, 3.0), [0, 0, 3.0], [0, 0, 0])
    write_series(tmp_path / "one", hu, [1, 0, 0], [0, 1, 0], (3.0, 3.0), [0, 0, 3.0], [0, 0, 0], seed=2)
    files = sorted((tmp_path / "one").iterdir())
    for n, f in enumerate(files):
        part = batch / ("part1" if n < len(files) // 2 else "part2")
        part.mkdir(exist_ok=True)
        shutil.move(f, part / f.name)
    cases, errors = discover(str(batch), salt="s")
    assert [c.images for c in cases] == [[str(batch / "whole")]]
    assert sorted((e.file, e.reason) for e in errors) == [
        (str(batch / p), f"holds part of a DICOM series whose other slices lie in 1 other folder(s) ({batch / o}): "
                         f"each folder would be read as a short series; move the series' slices into one folder")
        for p, o in (("part1", "part2"), ("part2", "part1"))]
    out = tmp_path / "out"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(batch), "--output", str(out)])
    failed = sorted(line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED "))
    assert rc == 1 and len(failed) == 2 and all("holds part of a DICOM series" in line for line in failed)
    assert sorted(p.name for p in out.iterdir()) == ["whole.nii.gz"]


def test_a_series_without_optional_patient_and_study_tags_gets_its_seg(tiny, tmp_path, capsys):  # noqa: F811
    """Type 2 tags a converter or anonymiser drops (birth date, sex, accession number, study time and ID, the
    referring physician) and SliceThickness: highdicom raised an AttributeError after the prediction, and the
    mask and report of the run were lost with it. The SEG is written with them empty, frames equal to the mask."""
    from dicom_phantoms import write_series

    hu = np.random.default_rng(1).normal(20, 40, (48, 40, 12)).astype(np.int16)
    hu[:8] = -1000  # air beside the body
    series = tmp_path / "series"
    write_series(series, hu, [1, 0, 0], [0, 1, 0], (3.0, 3.0), [0, 0, 3.0], [0, 0, 0])
    dropped = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyTime", "StudyID", "ReferringPhysicianName",
               "SliceThickness")
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        for name in dropped:
            if name in ds:
                delattr(ds, name)
        ds.save_as(f, enforce_file_format=True)
    out = tmp_path / "out"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(series), "--output", str(out / "case.nii.gz"),
                             "--format", "nifti,dicom-seg"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    seg = pydicom.dcmread(out / "case.seg.dcm")
    assert seg.PatientBirthDate == "" and seg.AccessionNumber == ""
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 3.0
    labels = np.asarray(nib.load(out / "case.nii.gz").dataobj)
    vol = read_image(series)
    frames = seg_frames(out / "case.seg.dcm", read_sources(series))
    for uid, ds in read_sources(series).items():
        assert np.array_equal(frames[uid], expected_frame(labels, ds, vol.affine))
