"""`lnfm predict`: same masks as training-time inference, geometry on real scans, report, bad input."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from export_helpers import tiny  # noqa: F401  (session fixture)
from scipy import ndimage

from lnfm.cli import run_job
from lnfm.jobs import predict as pr
from lnfm.io import read_image
from lnfm.eval.report import read_report

REPO = Path(__file__).resolve().parents[2]
REAL = {
    "ras_nifti": "ct/totalsegmentator/example_ct.nii.gz",
    "lps_nifti": "ct/totalsegmentator/chest_vessels/ct_cropped.nii.gz",
    "dicom_series": "ct/totalsegmentator/example_ct_dicom",
}


@pytest.fixture(scope="session")
def predictor(tiny):  # noqa: F811
    return pr.load_predictor(tiny.orbax)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_cli_in_a_fresh_process_equals_the_finetuning_inference(tiny, tmp_path):  # noqa: F811
    from flax import nnx

    from lnfm.data.geometry import restore_to_source
    from lnfm.eval.predictor import softmax_fn
    from lnfm.jobs.finetune import load_cases, make_predictor

    rec = next(r for r in tiny.records if r["split"] == "test")
    scan = tiny.raw / "imagesTr" / f"{rec['case_id']}_0000.nii.gz"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lnfm", "predict", "--model", str(tiny.orbax), "--input", str(scan),
           "--output", str(out / "mask.nii.gz"), "--probabilities", str(out / "prob.nii.gz"),
           "--report", str(out / "nodes.csv"), "--overlay", str(out / "preview.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The finetuning job's own validation/test inference on the stored case, then mapped to the scan grid.
    cfg = tiny.cfg
    case = load_cases([tiny.store], {rec["case_id"]: (tiny.store, rec)}, [rec["case_id"]], cfg.loader)[0]
    graphdef, state = nnx.split(tiny.model)
    label = make_predictor(cfg, softmax_fn(graphdef), (state,))(case.image, case.spacing, case.hu).labels
    expected = restore_to_source(label, rec, order=0)

    img = nib.load(out / "mask.nii.gz")
    src = nib.load(scan)
    got = np.asarray(img.dataobj)
    assert got.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-5)
    assert 0 < (got > 0).sum() < 0.2 * got.size  # a real, partial prediction
    np.testing.assert_array_equal(got, expected)

    prob = np.asarray(nib.load(out / "prob.nii.gz").dataobj)
    assert prob.shape == src.shape and 0.0 <= prob.min() and prob.max() <= 1.0
    assert prob[got > 0].mean() > prob[got == 0].mean()

    rows = read_report(out / "nodes.csv")
    comps, n = ndimage.label(got > 0, structure=np.ones((3, 3, 3), bool))
    assert len(rows) == n
    voxel_ml = abs(np.linalg.det(src.affine[:3, :3])) / 1000
    assert sum(r["voxels"] for r in rows) == (got > 0).sum()
    assert sum(r["volume_ml"] for r in rows) == pytest.approx((got > 0).sum() * voxel_ml, rel=1e-3)
    big = rows[0]
    assert big["voxels"] == np.bincount(comps.ravel())[1:].max()
    # Centroid in RAS mm: the affine applied to the mean voxel index of that component.
    biggest = int(np.argmax(np.bincount(comps.ravel())[1:]) + 1)
    centre = src.affine @ np.append(np.argwhere(comps == biggest).mean(0), 1)
    assert [big["centroid_ras_x_mm"], big["centroid_ras_y_mm"], big["centroid_ras_z_mm"]] == \
        pytest.approx(list(centre[:3]), abs=2e-3)
    hu_src = np.asarray(src.dataobj, np.float64)
    assert big["mean_hu"] == pytest.approx(hu_src[comps == biggest].mean(), abs=2e-3)
    assert big["max_probability"] == pytest.approx(prob[comps == biggest].max(), abs=2e-3)
    assert 0 < big["short_axis_mm"] <= big["long_axis_mm"]
    assert (out / "nodes.csv").read_text().startswith("# ") and "RAS" in (out / "nodes.csv").read_text()
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(out) == []


@pytest.mark.parametrize("name", list(REAL))
def test_real_scans_keep_their_grid(name, shared_data, predictor, tmp_path):
    path = shared_data / REAL[name]
    fn, meta = predictor
    fast = pr.PredictOptions(overlap=0.0)  # geometry is the point here: fewest windows
    pred = pr.predict_case(fn, meta, [str(path)], tmp_path / "mask.nii.gz", probabilities=tmp_path / "p.nii.gz",
                           options=fast)
    src = read_image(path)
    out = nib.load(tmp_path / "mask.nii.gz")
    assert out.shape == src.shape3 and pred.labels.shape == src.shape3
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    assert nib.load(tmp_path / "p.nii.gz").shape == src.shape3
    if name == "lps_nifti":
        # The same scan stored RAS must give the same mask, flipped back: geometry, not array order, decides.
        ras = nib.as_closest_canonical(nib.load(path))
        assert "".join(nib.aff2axcodes(ras.affine)) == "RAS"
        nib.save(ras, tmp_path / "ras.nii.gz")
        pred_ras = pr.predict_case(fn, meta, [str(tmp_path / "ras.nii.gz")], tmp_path / "mask_ras.nii.gz",
                                   options=fast)
        back = nib.orientations.apply_orientation(
            pred_ras.labels, nib.orientations.ornt_transform(nib.io_orientation(ras.affine),
                                                             nib.io_orientation(src.affine)))
        np.testing.assert_array_equal(back, pred.labels)
        assert pred.labels.any()


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _nrrd(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    from lnfm.io import write_nrrd

    write_nrrd(path, data, affine)
    return path


def _bad_inputs(tiny, tmp_path: Path) -> dict:  # noqa: F811
    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    ct = np.asarray(nib.load(scan).dataobj)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a gzip stream")
    return {
        "unreadable": ([str(corrupt)], "corrupt.nii.gz", "unreadable"),
        "channels": ([str(scan), str(scan)], scan.name, "expects 1 channel"),
        "coarse": ([str(_write(tmp_path / "coarse.nii.gz", ct, np.diag([25.0, 1.0, 1.0, 1.0])))], "coarse.nii.gz",
                   "absurd voxel spacing"),
        # NIfTI readers turn a zero pixdim into 1 mm; NRRD keeps the zero voxel size.
        "zero": ([str(_nrrd(tmp_path / "zero.nrrd", ct, np.diag([0.0, 1.0, 1.0, 1.0])))], "zero.nrrd",
                 "invalid voxel-to-world affine"),
        "constant": ([str(_write(tmp_path / "flat.nii.gz", np.full((40, 40, 20), -1000, np.int16), np.eye(4)))],
                     "flat.nii.gz", "constant"),
        "missing": ([str(tmp_path / "absent.nii.gz")], "absent.nii.gz", "not found"),
    }


def test_bad_inputs_fail_with_one_line_and_leave_no_file(tiny, tmp_path, capsys):  # noqa: F811
    for name, (inputs, fname, reason) in _bad_inputs(tiny, tmp_path).items():
        out = tmp_path / f"out_{name}"
        out.mkdir()
        capsys.readouterr()
        rc = run_job("predict", ["--model", str(tiny.orbax), "--input", ",".join(inputs), "--output",
                                 str(out / "m.nii.gz"), "--report", str(out / "n.csv"), "--overlay",
                                 str(out / "o.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert err[-1].startswith("lnfm predict: error: ") and fname in err[-1] and reason in err[-1], (name, err)
        assert list(out.iterdir()) == [], name


def test_bad_input_exit_code_from_the_console_command(tiny, tmp_path):  # noqa: F811
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((30, 30, 10), np.int16), np.eye(4))
    proc = subprocess.run([sys.executable, "-m", "lnfm", "predict", "--model", str(tiny.orbax), "--input", str(flat),
                           "--output", str(tmp_path / "m.nii.gz")], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lnfm predict: error: ") and "flat.nii.gz" in last and "constant" in last
    assert not (tmp_path / "m.nii.gz").exists()



@pytest.mark.parametrize("factor, reason", [(0.1, "is its affine in cm, not mm?"), (10, "is its affine scaled by 10?")])
def test_a_real_ct_whose_affine_is_in_cm_or_times_10_is_refused_in_one_line(tiny, shared_data, tmp_path, capsys,  # noqa: F811
                                                                             factor, reason):
    """An abdomen 3.7 cm across (or 5 m) was segmented: 0 nodes, an empty report and exit 0."""
    src = read_image(shared_data / REAL["dicom_series"])
    affine = src.affine.copy()
    affine[:3] *= factor
    scan = _write(tmp_path / "scaled.nii.gz", src.data, affine)
    out = tmp_path / "out"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(scan), "--output", str(out / "m.nii.gz"),
                             "--report", str(out / "n.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"lnfm predict: error: {scan}: field of view ") \
        and err[0].endswith(reason), err
    assert not out.exists()

def _two_channel(meta, resample: bool = True):
    contract = dataclasses.replace(meta.preprocessing.contract, channels=("CT", "PET"), resample_channels=resample)
    return dataclasses.replace(meta, preprocessing=dataclasses.replace(meta.preprocessing, contract=contract))


def test_a_two_channel_model_refuses_one_channel(tiny, tmp_path):  # noqa: F811
    meta = _two_channel(pr.read_meta(tiny.orbax))
    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    with pytest.raises(pr.PredictError, match=r"expects 2 channel\(s\) \(CT, PET\) but got 1; pass them as "
                                              r"--input ct.nii.gz,pet.nii.gz"):
        pr.read_scan([str(scan)], meta)
    other = _write(tmp_path / "pet.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(pr.PredictError, match="pet.nii.gz: channel grid"):
        pr.read_scan([str(scan), str(other)], _two_channel(meta, resample=False))


def test_a_coarser_pet_is_resampled_onto_the_ct_grid_as_prepare_does(tiny, tmp_path):  # noqa: F811
    """PET at 4 mm beside a 1 mm CT (real PET/CT): accepted, and the PET value at each CT voxel is
    the trilinear interpolation of the PET grid there (computed here with scipy's map_coordinates)."""
    ct_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    ct_aff[:3, 3] = (-20.0, -20.0, -10.0)
    pet_aff = np.diag([4.0, 4.0, 4.0, 1.0])
    pet_aff[:3, 3] = (-18.5, -18.5, -8.5)
    ct = np.full((40, 40, 20), 40, np.int16)
    ct[:, :, :2] = -1000
    pet = np.random.default_rng(0).uniform(0.5, 8.0, (10, 10, 5)).astype(np.float32)
    paths = [str(_write(tmp_path / "ct.nii.gz", ct, ct_aff)), str(_write(tmp_path / "pet.nii.gz", pet, pet_aff))]
    vol = pr.read_scan(paths, _two_channel(pr.read_meta(tiny.orbax)))
    assert vol.data.shape == (40, 40, 20, 2) and np.allclose(vol.affine, ct_aff)
    # Inner CT voxels (the edge band is padded by prepare's edge rule): PET index = inv(pet) @ ct @ ijk.
    ijk = np.stack(np.meshgrid(*[np.arange(4, s - 4) for s in (40, 40, 20)], indexing="ij"), 0).reshape(3, -1)
    pet_ijk = (np.linalg.inv(pet_aff) @ ct_aff @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    ref = ndimage.map_coordinates(pet, pet_ijk, order=1)
    np.testing.assert_allclose(vol.data[..., 1][tuple(ijk)], ref, rtol=1e-5)


def test_a_ct_given_as_the_pet_is_refused_as_prepare_refuses_it(tiny, tmp_path):  # noqa: F811
    """--input ct.nii.gz,ct.nii.gz (or another CT as the PET) segmented a PET channel holding HU, exit 0."""
    meta = _two_channel(pr.read_meta(tiny.orbax))
    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    with pytest.raises(pr.PredictError, match=rf"^{scan}: channel 1 holds the same scan as channel 0 \({scan}\)"):
        pr.read_scan([str(scan), str(scan)], meta)
    ct = nib.load(scan)
    other = _write(tmp_path / "other_ct.nii.gz", np.asanyarray(ct.dataobj)[::-1].copy(), ct.affine)
    with pytest.raises(pr.PredictError, match=rf"^{other}: mean value -[0-9.]+ is below 0 .*: not a PET, whose "):
        pr.read_scan([str(scan), str(other)], meta)


def test_batch_folder_segments_each_case_and_reports_failures(tiny, predictor, tmp_path):  # noqa: F811
    import shutil

    fn, meta = predictor
    folder = tmp_path / "in"
    folder.mkdir()
    rec = tiny.records[0]
    shutil.copy(tiny.raw / "imagesTr" / f"{rec['case_id']}_0000.nii.gz", folder / f"{rec['case_id']}.nii.gz")
    _write(folder / "blank.nii.gz", np.zeros((20, 20, 10), np.int16), np.eye(4))
    cases = pr.find_cases(folder, 1)
    assert sorted(cases) == sorted([rec["case_id"], "blank"])
    failed = pr.predict_folder(fn, meta, folder, tmp_path / "out", report=tmp_path / "csv", show_progress=False)
    assert list(failed) == ["blank"] and "constant" in failed["blank"]
    for rec in tiny.records[:1]:
        mask = nib.load(tmp_path / "out" / f"{rec['case_id']}.nii.gz")
        assert mask.shape == tuple(rec["source_shape"])
        assert (tmp_path / "csv" / f"{rec['case_id']}.csv").is_file()
    assert not (tmp_path / "out" / "blank.nii.gz").exists()
    # nnU-Net style channel files group into one case for a two-channel model.
    (folder / "x_0000.nii.gz").write_bytes(b"")
    (folder / "x_0001.nii.gz").write_bytes(b"")
    grouped = pr.find_cases(folder, 2)
    assert [Path(p).name for p in grouped["x"]] == ["x_0000.nii.gz", "x_0001.nii.gz"]
    # A single-file x beside x's channel files would write the same x.nii.gz: refused, naming both.
    (folder / "x.nii.gz").write_bytes(b"")
    with pytest.raises(pr.PredictError, match=r"x_0000.nii.gz: makes the same case 'x' as .*x.nii.gz"):
        pr.find_cases(folder, 2)


def test_a_batch_reports_what_it_cannot_read_instead_of_passing_over_it(tiny, tmp_path, capsys):  # noqa: F811
    """A broken link and a patient folder holding its series one level down look like cases: each fails on
    its own line (exit 1) beside the case that ran; a note beside them is not a scan and is left alone."""
    import shutil

    folder = tmp_path / "in"
    (folder / "B" / "CT_series").mkdir(parents=True)
    rec = tiny.records[0]
    shutil.copy(tiny.raw / "imagesTr" / f"{rec['case_id']}_0000.nii.gz", folder / "a.nii.gz")
    shutil.copy(tiny.raw / "imagesTr" / f"{rec['case_id']}_0000.nii.gz", folder / "B" / "CT_series" / "x.nii.gz")
    (folder / "b.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (folder / "notes.txt").write_text("reviewed by ...")
    unusable = {}
    assert list(pr.find_cases(folder, 1, unusable)) == ["a"]
    assert sorted(unusable) == ["B", "b.nii.gz"]
    capsys.readouterr()
    assert run_job("predict", ["--model", str(tiny.orbax), "--input", str(folder), "--output",
                               str(tmp_path / "out")]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert failed == [f"FAILED B: {folder / 'B'}: no file directly inside (a DICOM series in a subfolder? pass the "
                      f"series folder itself, or a folder whose subfolders are series)",
                      f"FAILED b.nii.gz: {folder / 'b.nii.gz'}: a broken link (its target does not exist)"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz"]
    # a folder of nothing but such entries has no case: one line, naming the first reason
    (folder / "a.nii.gz").unlink()
    with pytest.raises(pr.PredictError, match=r"in: no NIfTI, NRRD or DICOM series found \(.*no file directly"):
        pr.batch_cases(folder, 1)


def test_loose_dicom_files_beside_scans_are_refused_and_a_dicomdir_is_an_index(shared_data, tmp_path):
    import shutil

    series = shared_data / "ct" / "totalsegmentator" / "example_ct_dicom"
    cd = tmp_path / "cd"
    shutil.copytree(series, cd / "S1")
    shutil.copy(next(series.iterdir()), cd / "DICOMDIR")  # any DICOM file stands for the CD's index here
    assert pr.is_batch_input(cd) and list(pr.find_cases(cd, 1)) == ["S1"]
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz", stray / "a.nii.gz")
    shutil.copy(next(series.iterdir()), stray / "stray.dcm")
    with pytest.raises(pr.PredictError, match=r"stray: holds DICOM files \(stray.dcm\) beside scans or folders "
                                              r"\(a.nii.gz\): pass one series folder"):
        pr.is_batch_input(stray)
    assert not pr.is_batch_input(series)  # a series folder is one scan


def test_options_that_would_change_nothing_are_refused(tiny, tmp_path, capsys):  # noqa: F811
    """Each is one line before the model loads and writes nothing: a file name for a batch's output
    folders, a report that is not .csv, DICOM options without their format, --series for a file."""
    import shutil

    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(scan, folder / "a.nii.gz")
    out = tmp_path / "out"
    cases = [
        (["--input", str(folder), "--output", str(out / "m.nii.gz")],
         f"{out / 'm.nii.gz'}: --output names a file, but --input {folder} is a folder of scans (batch mode, one "
         f"output per case): name a folder"),
        (["--input", str(folder), "--output", str(out / "masks"), "--report", str(out / "r.csv")],
         f"{out / 'r.csv'}: --report names a file, but --input {folder} is a folder of scans (batch mode, one "
         f"output per case): name a folder"),
        (["--input", str(scan), "--output", str(out / "m.nii.gz"), "--report", str(out / "r.nii.gz")],
         f"{out / 'r.nii.gz'}: --report must end with .csv"),
        (["--input", str(scan), "--output", str(out / "m.nii.gz"), "--report", str(out / "rep") + "/"],
         f"{out / 'rep'}: --report must end with .csv"),
        (["--input", str(scan), "--output", str(out / "m.nii.gz"), "--seg-per-node"],
         "--seg-per-node: applies to --format dicom-seg, which is not requested"),
        (["--input", str(scan), "--output", str(out / "m.nii.gz"), "--seg-compression", "none"],
         "--seg-compression: applies to --format dicom-seg, which is not requested"),
        (["--input", str(scan), "--output", str(out / "m.nii.gz"), "--format", "nifti", "--rtstruct-all-nodes"],
         "--rtstruct-all-nodes: applies to --format rtstruct, which is not requested"),
        (["--input", str(scan), "--output", str(out / "m.nii.gz"), "--series", "1.2.3"],
         f"{scan}: --series picks a series of a DICOM folder; this input is a file"),
    ]
    for argv, says in cases:
        capsys.readouterr()
        assert run_job("predict", ["--model", str(tiny.orbax), *argv]) == 2, argv
        assert capsys.readouterr().err.strip().splitlines() == [f"lnfm predict: error: {says}"], argv
        assert not out.exists(), argv


def test_a_path_with_a_comma_is_one_input_when_it_exists(tiny, tmp_path, capsys):  # noqa: F811
    import shutil

    folder = tmp_path / "Smith, John"
    folder.mkdir()
    shutil.copy(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz", folder / "ct.nii.gz")
    assert run_job("predict", ["--model", str(tiny.orbax), "--input", str(folder / "ct.nii.gz"), "--output",
                               str(tmp_path / "m.nii.gz")]) == 0
    assert nib.load(tmp_path / "m.nii.gz").shape == tuple(tiny.records[0]["source_shape"])
    capsys.readouterr()
    missing = str(tmp_path / "Doe, Jane" / "ct.nii.gz")
    assert run_job("predict", ["--model", str(tiny.orbax), "--input", missing, "--output",
                               str(tmp_path / "n.nii.gz")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lnfm predict: error: {tmp_path / 'Doe'}: not found (--input {missing} was read as 2 comma-separated "
        f"channels)"]


def test_a_stablehlo_export_predicts_like_the_orbax_one(tiny, predictor, tmp_path):  # noqa: F811
    from lnfm.jobs.export import export_model

    hlo = export_model(tiny.workdir, tmp_path / "hlo", "stablehlo")
    fn_hlo, meta = pr.load_predictor(hlo)
    fn, _ = predictor
    x = np.random.default_rng(2).random((2, 32, 32, 32, 1), dtype=np.float32)
    np.testing.assert_allclose(fn_hlo(x), fn(x), atol=1e-5)
    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    a = pr.predict_case(fn_hlo, meta, [str(scan)], tmp_path / "a.nii.gz")
    b = pr.predict_case(fn, meta, [str(scan)], tmp_path / "b.nii.gz")
    assert (a.labels == b.labels).mean() > 0.999 and a.labels.any()


# ----------------------------------------------------------------------------- outputs never touch inputs


def test_an_output_naming_the_input_or_the_model_is_refused_and_nothing_changes(tiny, tmp_path, capsys):  # noqa: F811
    import shutil

    from tree_helpers import tree_digest

    scan = tmp_path / "scan.nii.gz"
    shutil.copy(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz", scan)
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(scan, batch / "a.nii.gz")
    ok = str(tmp_path / "ok.nii.gz")
    cases = {
        "output": (["--input", str(scan), "--output", str(scan)], "--output is --input"),
        "report": (["--input", str(scan), "--output", ok, "--report", str(scan)], "--report is --input"),
        "probabilities": (["--input", str(scan), "--output", ok, "--probabilities", str(scan)],
                          "--probabilities is --input"),
        "overlay_in_model": (["--input", str(scan), "--output", ok, "--overlay", str(tiny.orbax / "x.png")],
                             "--overlay lies inside --model"),
        "same_two_outputs": (["--input", str(scan), "--output", ok, "--probabilities", ok], "name the same path"),
        "batch_same_dir": (["--input", str(batch), "--output", str(batch)], "--output is --input"),
        "batch_inside": (["--input", str(batch), "--output", str(batch / "masks")], "--output lies inside --input"),
        "batch_parent": (["--input", str(batch), "--output", str(tmp_path)], "--output contains --input"),
    }
    before = tree_digest(tmp_path, tiny.orbax)
    for name, (args, reason) in cases.items():
        capsys.readouterr()
        rc = run_job("predict", ["--model", str(tiny.orbax), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert len(err) == 1 and "error: " in err[0] and reason in err[0], (name, err)
        assert tree_digest(tmp_path, tiny.orbax) == before, name


def test_an_existing_file_is_replaced_only_with_force(tiny, tmp_path, capsys):  # noqa: F811
    """A mask path that names the user's own label (or a report path their notes) was replaced without a
    word; now it is refused before the model loads, every file unchanged, and --force replaces it."""
    import shutil

    from tree_helpers import tree_digest

    scans = tmp_path / "scans"
    scans.mkdir()
    case = tiny.records[0]["case_id"]
    shutil.copy(tiny.raw / "imagesTr" / f"{case}_0000.nii.gz", scans / f"{case}.nii.gz")
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(tiny.raw / "labelsTr" / f"{case}.nii.gz", labels / f"{case}.nii.gz")
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes\n")
    single = ["--input", str(scans / f"{case}.nii.gz"), "--output", str(labels / f"{case}.nii.gz")]
    for args, clash in [(single, labels / f"{case}.nii.gz"),
                        ([*single[:2], "--output", str(tmp_path / "new.nii.gz"), "--report", str(notes)], notes),
                        (["--input", str(scans), "--output", str(labels)], labels / f"{case}.nii.gz")]:
        before = tree_digest(tmp_path)
        capsys.readouterr()
        assert run_job("predict", ["--model", str(tiny.orbax), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        says = "exists already (pass --force to replace it, or choose another output)"
        assert err == [f"lnfm predict: error: {clash}: {says}"]
        assert tree_digest(tmp_path) == before
    # --force replaces only predict's own files: the user's label and notes stay, a mask predict wrote is replaced
    for args, clash in [(single, labels / f"{case}.nii.gz"),
                        ([*single[:2], "--output", str(tmp_path / "new.nii.gz"), "--report", str(notes)], notes)]:
        before = tree_digest(tmp_path)
        capsys.readouterr()
        assert run_job("predict", ["--model", str(tiny.orbax), *args, "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        says = ("exists and is not an unchanged output of lnfm predict (no mark of predict's, or changed since "
                "predict wrote it); --force replaces only predict's own files")
        assert err == [f"lnfm predict: error: {clash}: {says} (choose another output)"]
        assert tree_digest(tmp_path) == before
    ours = [*single[:2], "--output", str(tmp_path / "ours.nii.gz"), "--report", str(tmp_path / "ours.csv")]
    assert run_job("predict", ["--model", str(tiny.orbax), *ours]) == 0
    inodes = [(tmp_path / n).stat().st_ino for n in ("ours.nii.gz", "ours.csv")]
    assert run_job("predict", ["--model", str(tiny.orbax), *ours, "--force"]) == 0
    assert [(tmp_path / n).stat().st_ino != i for n, i in zip(("ours.nii.gz", "ours.csv"), inodes)] == [True, True]


def test_force_leaves_a_mask_whose_geometry_a_user_corrected(tiny, tmp_path, capsys):  # noqa: F811
    """A mask moved 5 mm with nibabel, predict's header passed along (its description kept), was replaced by
    --force: the mark covered the voxels alone. A mask of an earlier predict, whose mark cannot tell, is
    refused too and the line says why; an unchanged mask is replaced."""
    import hashlib

    scan = str(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz")
    mask = tmp_path / "mask.nii.gz"
    args = ["--model", str(tiny.orbax), "--input", scan, "--output", str(mask)]
    assert run_job("predict", args) == 0
    original = mask.read_bytes()
    img = nib.load(mask)
    voxels = np.asarray(img.dataobj)
    moved = img.affine.copy()
    moved[0, 3] += 5.0
    nib.save(nib.Nifti1Image(voxels, moved, img.header), mask)
    assert nib.load(mask).header["descrip"] == img.header["descrip"]
    h = hashlib.sha256(f"{voxels.dtype.str}{voxels.shape}".encode())
    h.update(np.ascontiguousarray(voxels).tobytes())
    earlier = tmp_path / "earlier.nii.gz"  # as the previous lnfm marked it: the voxels' digest alone
    header = img.header.copy()
    header["descrip"] = f"lnfm predict sha256:{h.hexdigest()[:16]}".encode()
    nib.save(nib.Nifti1Image(voxels, img.affine, header), earlier)
    for path, why in [(mask, "no mark of predict's, or changed since predict wrote it"),
                      (earlier, "marked by an earlier lnfm predict, whose mark does not cover the geometry: a "
                                "corrected affine cannot be told; remove it yourself if it is unchanged")]:
        users = path.read_bytes()
        capsys.readouterr()
        assert run_job("predict", [*args[:4], "--output", str(path), "--force"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"lnfm predict: error: {path}: exists and is not an unchanged output of lnfm predict ({why}); --force "
            f"replaces only predict's own files (choose another output)"]
        assert path.read_bytes() == users
    mask.write_bytes(original)  # the mask as predict wrote it
    inode = mask.stat().st_ino
    assert run_job("predict", [*args, "--force"]) == 0
    assert mask.stat().st_ino != inode and np.array_equal(nib.load(mask).affine, img.affine)


def test_a_full_disk_keeps_the_previous_outputs_and_a_rerun_completes(tiny, predictor, tmp_path):  # noqa: F811
    """`ulimit -f` in a real `lnfm predict` process: writing the new mask fails with EFBIG; the
    previous mask and report are intact, no partial file is left, and the rerun succeeds."""
    import resource

    from tree_helpers import leftovers, tree_digest

    fn, meta = predictor
    scan = str(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz")
    out = tmp_path / "out"
    pr.predict_case(fn, meta, [scan], out / "mask.nii.gz", report=out / "nodes.csv")
    before = tree_digest(out)
    cmd = [sys.executable, "-m", "lnfm", "predict", "--model", str(tiny.orbax), "--input", scan,
           "--output", str(out / "mask.nii.gz"), "--report", str(out / "nodes.csv"),
           "--probabilities", str(out / "prob.nii.gz"), "--force"]  # a rerun over the earlier outputs
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and "error: " in last and "cannot write (File too large)" in last
    assert tree_digest(out) == before and leftovers(out) == []
    pr.predict_case(fn, meta, [scan], out / "mask.nii.gz", probabilities=out / "prob.nii.gz",
                    report=out / "nodes.csv")
    assert (out / "prob.nii.gz").is_file() and leftovers(out) == []


def test_predict_module_loads_without_jax_flax_or_dicom_writers():
    """An ONNX Runtime prediction of NIfTI files never needs JAX, Flax, grain or the DICOM writers;
    importing them would add seconds of start-up to every `lnfm predict` on a CPU."""
    code = ("import sys, lnfm.jobs.predict\n"
            "from lnfm.eval import backends\n"
            "print(backends.choose_backend('auto', 'export', 'onnx', True))\n"  # what a CPU prediction asks first
            "print(sorted(m for m in ('jax', 'flax', 'grain', 'orbax', 'highdicom', 'skimage') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # a user's shell: no CPU pin
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    if out.stdout.split()[0] == "jax":  # a runner with a JAX accelerator plugin: auto rightly asks JAX
        pytest.skip("a JAX accelerator runtime is installed here")
    assert out.stdout.split() == ["onnxruntime", "[]"], out.stdout


def test_accelerator_check_agrees_with_jax_and_reads_the_plugin_switches(monkeypatch):
    import jax

    from lnfm.eval import backends

    # the reference: JAX itself (this machine: a CPU, or whatever accelerator the runner has)
    assert backends.accelerator_present() == (jax.default_backend() != "cpu")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # the suite's conftest may pin the CPU
    monkeypatch.setenv("PJRT_NAMES_AND_LIBRARY_PATHS", "gpu:/opt/plugin.so")
    assert backends.accelerator_runtime_installed()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # forces the CPU whatever is installed
    assert not backends.accelerator_runtime_installed() and not backends.accelerator_present()


@pytest.mark.parametrize("damage, says", [
    (lambda a: np.full_like(a, np.nan), "holds NaN or Inf"),
    (lambda a: a.astype(np.int32), "is int32, not floating point"),
])
def test_weights_rewritten_and_rechecksummed_are_refused(tiny, tmp_path, damage, says):  # noqa: F811
    """Weights edited by hand (checksums rewritten to match) ran and predicted 0 nodes with exit 0."""
    from safetensors.numpy import load_file, save_file

    from lnfm.jobs.export import export_model, write_checksums

    export = export_model(tiny.workdir, tmp_path / "st", "safetensors")
    weights = load_file(str(export / "model.safetensors"))
    name = sorted(k for k in weights if k.startswith("head."))[-1]
    weights[name] = damage(weights[name])
    save_file(weights, str(export / "model.safetensors"))
    write_checksums(export)
    with pytest.raises(pr.ExportError) as e:
        pr.load_predictor(export, "jax")
    assert str(e.value) == f"{export}: weight '{name}' {says}"


def test_a_model_json_whose_spacing_contradicts_its_training_data_is_refused(tiny, tmp_path, capsys):  # noqa: F811
    """model.json's contract spacing edited 6 -> 3 mm (checksums rewritten to match) ran the 6 mm model at 3 mm
    with exit 0 and another mask; training_data.spacing_mm still records the 6 mm the cases were stored at."""
    import json

    from lnfm.jobs.export import export_model, write_checksums

    export = export_model(tiny.workdir, tmp_path / "st", "safetensors")
    meta = json.loads((export / "model.json").read_text())
    assert meta["training_data"]["spacing_mm"] == [[6.0, 6.0, 6.0]]
    meta["preprocessing"]["contract"]["spacing"] = [3.0, 3.0, 3.0]
    (export / "model.json").write_text(json.dumps(meta))
    write_checksums(export)
    scan = str(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz")
    capsys.readouterr()
    assert run_job("predict", ["--model", str(export), "--input", scan, "--output", str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"lnfm predict: error: {export / 'model.json'}: preprocessing.contract.spacing [3.0, 3.0, 3.0] mm disagrees "
        f"with training_data.spacing_mm [[6.0, 6.0, 6.0]] (the spacing the training cases were stored at)")
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_network_whose_output_is_not_finite_is_refused(tiny, tmp_path):  # noqa: F811
    """The check every backend's windows pass (an ONNX graph's weights are not read by load_export)."""
    fn = pr._finite_output(lambda x: np.full(x.shape[:-1] + (2,), np.nan, np.float32), "EXPORT")
    with pytest.raises(pr.ExportError, match="^EXPORT: the network's output holds NaN or Inf"):
        fn(np.zeros((1, 4, 4, 4, 1), np.float32))
    ok = pr._finite_output(lambda x: np.full(x.shape[:-1] + (2,), 0.5, np.float32), "EXPORT")
    assert ok(np.zeros((1, 4, 4, 4, 1), np.float32)).shape == (1, 4, 4, 4, 2)


def test_an_export_as_input_and_an_unwritable_output_are_one_line(tiny, tmp_path, capsys):  # noqa: F811
    """An export folder given as --input ran as a batch of 'scans' (exit 1); an output the system refuses to
    write (sysfs refuses even root; a read-only folder refuses users) was a traceback after the whole run."""
    scan = str(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz")
    cases = [(["--input", str(tiny.orbax), "--output", str(tmp_path / "m")],
              f"{tiny.orbax}: is an lnfm export, not a scan (pass it as --model)")]
    if Path("/sys/kernel").is_dir():
        cases.append((["--input", scan, "--output", "/sys/lnfm_no/x.nii.gz"], "/sys/lnfm_no"))
    for args, says in cases:
        capsys.readouterr()
        assert run_job("predict", ["--model", str(tiny.orbax), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # INFO progress lines may come first
        errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
        assert errors == [err[-1]] and err[-1].startswith("lnfm predict: error: ") and says in err[-1], err


def test_a_folder_the_system_refuses_is_found_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Root passes every permission bit (`os.access` says yes to /sys), so the refusal came only when the
    mask was written, after the whole network had run. The early check now makes a file in the folder."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs on this system")
    monkeypatch.setattr(pr, "load_predictor", lambda *a, **k: pytest.fail("the model loaded"))
    scan = str(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz")
    for out in ("/sys/lnfm_no/x.nii.gz", "/sys/x.nii.gz"):
        capsys.readouterr()
        assert run_job("predict", ["--model", str(tiny.orbax), "--input", scan, "--output", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"lnfm predict: error: {out}: cannot write into /sys ("), err
    # a writable folder takes the check's file and is left as it was
    (tmp_path / "ok").mkdir()
    pr.check_writable([tmp_path / "ok" / "m.nii.gz", tmp_path / "ok" / "r.csv", tmp_path / "new" / "deep" / "p.png"])
    assert list((tmp_path / "ok").iterdir()) == [] and not (tmp_path / "new").exists()


def test_access_denied_is_found_through_the_exception_chain():
    from lnfm.errors import access_denied

    try:
        try:
            raise PermissionError(13, "Permission denied", "/x")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert access_denied(e) == "Permission denied"
    assert access_denied(FileNotFoundError(2, "No such file", "/x")) is None
    assert access_denied(ValueError("a bug")) is None


def test_the_node_size_prior_is_model_json_s_unless_overridden(tiny):  # noqa: F811
    """predict applied model.json's tuned min_short_axis_mm and max_elongation with no way to change or see
    them from the command line; the options override each (0 turns it off), the others keep model.json's."""
    meta = pr.read_meta(tiny.orbax)
    meta = dataclasses.replace(meta, postprocess=dataclasses.replace(meta.postprocess, min_short_axis_mm=6.0,
                                                                     max_elongation=2.5, min_volume_mm3=10.0))
    assert pr.make_predictor(lambda x: x, meta).postprocess == meta.postprocess
    post = pr.make_predictor(lambda x: x, meta, pr.PredictOptions(min_short_axis_mm=0.0)).postprocess
    assert (post.min_short_axis_mm, post.max_elongation, post.min_volume_mm3) == (0.0, 2.5, 10.0)
    post = pr.make_predictor(lambda x: x, meta, pr.PredictOptions(max_elongation=4.0, min_volume_mm3=0.0)).postprocess
    assert (post.min_short_axis_mm, post.max_elongation, post.min_volume_mm3) == (6.0, 4.0, 0.0)
    parsed = pr.build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o", "--min-short-axis-mm", "0",
                                           "--max-elongation", "3"])
    assert (parsed.min_short_axis_mm, parsed.max_elongation) == (0.0, 3.0)


def _writes_meanwhile(monkeypatch, write) -> None:
    """`write()` runs once the scan is predicted, before predict puts its outputs in place: another
    process or a reader saving a file while predict runs."""
    real = pr.predict_volume

    def predict_then_write(*args, **kwargs):
        pred = real(*args, **kwargs)
        write()
        return pred

    monkeypatch.setattr(pr, "predict_volume", predict_then_write)


def test_a_correction_saved_while_force_runs_is_kept(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """--force checked before the model loaded that the mask was predict's; a reader's correction saved
    while the batch ran was then replaced without a word (rc 0). Now that case fails, the correction stays."""
    import shutil

    from tree_helpers import leftovers

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    cases = [r["case_id"] for r in tiny.records[:2]]
    for case in cases:
        shutil.copy(tiny.raw / "imagesTr" / f"{case}_0000.nii.gz", scans / f"{case}.nii.gz")
    args = ["--model", str(tiny.orbax), "--input", str(scans), "--output", str(out), "--report", str(tmp_path / "r")]
    assert run_job("predict", args) == 0
    mask, report = out / f"{cases[1]}.nii.gz", tmp_path / "r" / f"{cases[1]}.csv"
    old_report = report.read_bytes()
    img = nib.load(mask)
    corrected = np.zeros(img.shape, np.uint8)
    corrected[2:5, 2:5, 2:5] = 1
    seen = []

    def correct():
        seen.append(1)
        if len(seen) == 2:  # while the second case runs
            nib.save(nib.Nifti1Image(corrected, img.affine, img.header), mask)  # keeps predict's description

    _writes_meanwhile(monkeypatch, correct)
    capsys.readouterr()
    assert run_job("predict", [*args, "--force"]) == 1
    err = capsys.readouterr().err
    assert f"FAILED {cases[1]}: {mask}: written by another process or a user while predict ran" in err
    assert np.array_equal(np.asarray(nib.load(mask).dataobj), corrected)
    assert report.read_bytes() == old_report  # the case's other outputs are not replaced either
    assert leftovers(out) == [] and leftovers(tmp_path / "r") == []


def test_two_predicts_on_one_output_do_not_replace_each_other(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Without --force both predicts found the output absent at the start and both renamed theirs at the
    end: the mask of one scan, the report of the other. Now the later one fails and writes nothing."""
    from tree_helpers import leftovers

    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    mask = tmp_path / "o" / "mask.nii.gz"
    other = b"the other predict's mask"

    def other_predict():
        mask.parent.mkdir(exist_ok=True)
        mask.write_bytes(other)

    _writes_meanwhile(monkeypatch, other_predict)
    capsys.readouterr()
    assert run_job("predict", ["--model", str(tiny.orbax), "--input", str(scan), "--output", str(mask),
                               "--report", str(tmp_path / "o" / "rep.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lnfm predict: error: {mask}: written by another process or a user while")
    assert mask.read_bytes() == other
    assert sorted(p.name for p in mask.parent.iterdir()) == ["mask.nii.gz"] and leftovers(mask.parent) == []


def test_a_predict_in_another_pid_namespace_leaves_this_one_s_temporary_files(tmp_path, monkeypatch):
    """Two predicts in separate PID namespaces (containers sharing an output folder) cannot see each other's
    pids: one took the other's in-flight `.part` files for a killed writer's and removed them, failing it."""
    from types import SimpleNamespace

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    monkeypatch.setattr(os, "getpid", lambda: dead)  # this predict's pid as the other namespace sees it: none
    write_nifti = pr.write_nifti

    def other_predict_starts(path, *args):  # after the mask's temporary file is written
        if "prob" in path.name:
            pr.remove_stale_temps(tmp_path)
        write_nifti(path, *args)

    monkeypatch.setattr(pr, "write_nifti", other_predict_starts)
    labels = np.zeros((4, 4, 4), np.uint8)
    pred = SimpleNamespace(labels=labels, affine=np.eye(4), probability=labels.astype(np.float32))
    pr.write_outputs(pred, None, tmp_path / "mask.nii.gz", tmp_path / "prob.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "prob.nii.gz"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no_exchange"])
def test_force_leaves_a_file_written_after_its_last_check_as_it_is(tmp_path, monkeypatch, exchange):
    """--force checked each output right before renaming over it: a file written in between was replaced. Each
    new output is now exchanged with the old in one step, and the file moved away must be the one checked, or
    every exchange is undone. Without renameat2 (another system, a file system without it) the plain rename
    remains, gap included."""
    from types import SimpleNamespace

    labels = np.zeros((4, 4, 4), np.uint8)
    pred = SimpleNamespace(labels=labels, affine=np.eye(4), probability=labels.astype(np.float32))
    mask, prob = tmp_path / "mask.nii.gz", tmp_path / "prob.nii.gz"
    pr.write_outputs(pred, None, mask, prob)  # predict's own earlier outputs
    before = os.stat(mask).st_ino
    is_replaceable = pr._is_replaceable
    checks = []

    def user_writes_after_the_last_check(final, force):
        ok = is_replaceable(final, force)
        checks.append(final)
        if len(checks) == 4:  # the probabilities' check right before the renames
            nib.save(nib.Nifti1Image(labels + 1, np.eye(4)), str(tmp_path / "theirs.nii.gz"))
            os.replace(tmp_path / "theirs.nii.gz", prob)
        return ok

    monkeypatch.setattr(pr, "_is_replaceable", user_writes_after_the_last_check)
    if not exchange:
        monkeypatch.setattr(pr, "_renameat2", None)
        pr.write_outputs(pred, None, mask, prob, force=True)
        assert pr.made_by_predict(prob)  # replaced: the gap remains
        return
    with pytest.raises(pr.PredictError, match=f"{prob}: written by another process or a user while predict ran"):
        pr.write_outputs(pred, None, mask, prob, force=True)
    assert np.array_equal(np.asarray(nib.load(prob).dataobj), labels + 1)
    assert os.stat(mask).st_ino == before  # its exchange undone: the earlier output, not an equal new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "prob.nii.gz"]


def test_outputs_are_put_in_place_without_hard_links_too(tmp_path, monkeypatch):
    """Where a file system refuses hard links the new output is still created without replacing anything:
    an empty file made exclusively, then renamed over; one that appeared meanwhile fails the case."""
    def no_link(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(pr.os, "link", no_link)
    tmp, final = tmp_path / ".a.part1.csv", tmp_path / "a.csv"
    tmp.write_text("ours")
    pr._commit([(tmp, final)], force=False)
    assert final.read_text() == "ours" and not tmp.exists()
    tmp.write_text("ours again")
    with pytest.raises(pr.PredictError, match="written by another process or a user while predict ran"):
        pr._commit([(tmp, final)], force=False)
    assert final.read_text() == "ours" and not tmp.exists()
