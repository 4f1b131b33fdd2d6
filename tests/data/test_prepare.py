"""prepare: conversion, manifest, bad inputs, resume, sharding and DICOM privacy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from raw_cases import affine_lps, nnunet_folder, phantom, save, write_csv

from lnfm.data.cases import assign_split, hashed_id
from lnfm.data.geometry import spacing_of
from lnfm.data.prepare import PrepareConfig, main, prepare_dataset
from lnfm.data.store import StoreError, open_array, read_case, read_failures, read_manifest

CFG = PrepareConfig(workers=0, salt="pepper")


def test_nnunet_folder_converts_with_full_manifest(tmp_path):
    raw = nnunet_folder(tmp_path / "raw", n=3, pet=True)
    store = tmp_path / "store"
    res = prepare_dataset(str(raw), f"file://{store}", CFG, show_progress=False)
    assert (res.converted, res.failed, res.skipped) == (3, 0, 0)
    rows = read_manifest(str(store))
    assert [r["case_id"] for r in rows] == ["case000", "case001", "case002"]
    lines = (store / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == ["case000", "case001", "case002"]
    r = rows[1]
    assert r["site"] == "testsite" and r["channels"] == ["CT", "PET"] and r["orientation"] == "RAS"
    assert r["source_orientation"] == "LPS" and r["source_shape"] == [40, 36, 24]
    assert r["split"] == assign_split("case001", 0, (0.7, 0.1, 0.2))
    assert r["spacing"] == pytest.approx([1.0, 1.2, 2.0])
    # Arrays: int16 HU, float32 PET, uint8 labels, sharded zarr3 with blosc/zstd.
    ct, pet, lab = (open_array(str(store), p) for p in r["image_path"] + [r["label_path"]])
    assert (ct.dtype.name, pet.dtype.name, lab.dtype.name) == ("int16", "float32", "uint8")
    meta = json.loads((store / r["image_path"][0] / "zarr.json").read_text())
    codec = meta["codecs"][0]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["chunk_shape"] == [64, 64, 64]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [128, 128, 128]
    assert any(c["name"] == "blosc" and c["configuration"]["cname"] == "zstd"
               for c in codec["configuration"]["codecs"])
    # Stored data = source reoriented to RAS (LPS -> flip x, y) and cropped to the body.
    img, _ = phantom(nodes=((15, 18, 12, 2), (28, 20, 8, 1)), seed=1)
    image, label = read_case(str(store), r)
    s0, s1 = r["crop_start"], r["crop_stop"]
    ras = img[::-1, ::-1, :][s0[0]:s1[0], s0[1]:s1[1], s0[2]:s1[2]]
    np.testing.assert_array_equal(image[..., 0], ras)
    assert s1[0] - s0[0] < 40 and s1[1] - s0[1] < 36  # air margin dropped
    # Nodes: two components with volume, bbox and axial diameters (5x5 voxels of 1 x 1.2 mm).
    nodes = sorted(r["nodes"], key=lambda n: -n["volume_mm3"])
    assert len(nodes) == 2
    assert nodes[0]["volume_mm3"] == pytest.approx(125 * 1.0 * 1.2 * 2.0)
    assert nodes[0]["long_axis_mm"] == pytest.approx(np.hypot(5, 6), abs=1e-3)  # box diagonal 5 x 6 mm
    (x0, y0, z0), (x1, y1, z1) = nodes[0]["bbox"]
    assert label[x0:x1, y0:y1, z0:z1].all() and (x1 - x0, y1 - y0, z1 - z0) == (5, 5, 5)
    # Intensity statistics of body voxels (HU above -500), nnU-Net style.
    body = image[..., 0][image[..., 0] > -500]
    st = r["intensity"][0]
    assert st["mean"] == pytest.approx(body.mean()) and st["p99_5"] == pytest.approx(np.percentile(body, 99.5))


def test_resampled_conversion_in_worker_processes(tmp_path):
    raw = nnunet_folder(tmp_path / "raw", n=2)
    cfg = PrepareConfig(workers=2, spacing=(2.0, 2.0, 2.0), salt="x", crop_body=False)
    res = prepare_dataset(str(raw), str(tmp_path / "store"), cfg, show_progress=False)
    assert res.ok and res.converted == 2
    r = read_manifest(str(tmp_path / "store"))[0]
    assert spacing_of(np.asarray(r["affine"])) == pytest.approx((2.0, 2.0, 2.0))
    assert r["shape"] == [20, 22, 24]


def _bad_inputs(root: Path) -> tuple[Path, dict]:
    aff = affine_lps()
    img, lab = phantom()
    good = [save(root / f"good{i}.nii.gz", img, aff) for i in range(2)]
    good_lab = save(root / "good_lab.nii.gz", lab, aff)
    nan = img.astype(np.float32)
    nan[3, 3, 3] = np.nan
    corrupt = root / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"garbage" * 30)
    rows = [
        {"case_id": "ok1", "image": good[0], "label": good_lab},
        {"case_id": "ok2", "image": good[1]},  # unlabelled is fine
        {"case_id": "corrupt", "image": str(corrupt)},
        {"case_id": "nan", "image": save(root / "nan.nii.gz", nan, aff)},
        {"case_id": "grid", "image": good[0],
         "label": save(root / "shifted.nii.gz", lab, affine_lps(origin=(0, 0, 0)))},
        {"case_id": "flat", "image": save(root / "flat.nii.gz", img[:, :, 0], aff)},
        {"case_id": "empty", "image": good[0], "label": save(root / "empty.nii.gz", lab * 0, aff)},
        {"case_id": "frac", "image": good[0], "label": save(root / "frac.nii.gz", lab * 0.5, aff)},
        {"case_id": "missing", "image": str(root / "nowhere.nii.gz")},
        {"case_id": "ok1", "image": good[1]},  # duplicate id
    ]
    reasons = {"corrupt.nii.gz": "unreadable", "nan.nii.gz": "NaN", "shifted.nii.gz": "affine differs",
               "flat.nii.gz": "2D", "empty.nii.gz": "empty label", "frac.nii.gz": "non-integer",
               "nowhere.nii.gz": "not found", "good1.nii.gz": "duplicate case id"}
    return write_csv(root / "cases.csv", rows), reasons


def test_each_bad_input_is_reported_and_the_rest_converts(tmp_path, capsys):
    csv_path, reasons = _bad_inputs(tmp_path)
    store = tmp_path / "store"
    rc = main(["--input", str(csv_path), "--output", str(store), "--workers", "0", "salt=s"])
    assert rc == 1
    assert [r["case_id"] for r in read_manifest(str(store))] == ["ok1", "ok2"]
    # The console names each bad file; failures.jsonl keeps a salted hash of it and no path.
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED ")]
    assert sorted(Path(line[7:].split(": ", 1)[0]).name for line in printed) == sorted(reasons)
    refs = {hashed_id(str(tmp_path / name), "s"): name for name in reasons}
    fails = read_failures(str(store))
    assert len(fails) == len(reasons)
    for f in fails:
        name = refs[f["ref"]]
        assert reasons[name] in f["reason"], f
        assert "\n" not in f["reason"] and str(tmp_path) not in json.dumps(f) and tmp_path.name not in json.dumps(f)
    # No array of a failed case is left in the store.
    assert sorted(p.name for p in (store / "cases").iterdir()) == ["ok1", "ok2"]
    # A rerun skips the converted cases and changes nothing of them.
    before = (store / "records" / "ok1.json").read_bytes()
    res = prepare_dataset(str(csv_path), str(store), CFG, show_progress=False)
    assert (res.converted, res.skipped, res.failed) == (0, 2, len(reasons))
    assert (store / "records" / "ok1.json").read_bytes() == before


def _snapshot(store: Path) -> dict:
    out = {}
    for r in read_manifest(str(store)):
        image, label = read_case(str(store), r)
        out[r["case_id"]] = (json.dumps(r, sort_keys=True), image.tobytes(), None if label is None else label.tobytes())
    return out


def test_interrupted_sharded_conversion_resumes_to_the_same_result(tmp_path):
    raw = nnunet_folder(tmp_path / "raw", n=4)
    full = tmp_path / "full"
    assert prepare_dataset(str(raw), str(full), CFG, show_progress=False).converted == 4
    part = tmp_path / "part"
    # Host 0 of 2 finishes its slice; host 1 dies mid-case, leaving half-written arrays.
    r0 = prepare_dataset(str(raw), str(part), CFG, num_shards=2, shard_index=0, show_progress=False)
    assert r0.converted == 2
    assert len(read_manifest(str(part))) == 2
    done = {r["case_id"] for r in read_manifest(str(part))}
    half = next(c for c in ["case000", "case001", "case002", "case003"] if c not in done)
    (part / "cases" / half / "image_0000").mkdir(parents=True)
    (part / "cases" / half / "image_0000" / "zarr.json").write_text("{truncated")
    with pytest.raises(StoreError, match=f"^{part}: case {half} has arrays under cases/{half}/ but no "
                                         f"records/{half}.json"):  # readers refuse it, not read past it
        read_manifest(str(part))
    res = prepare_dataset(str(raw), str(part), CFG, show_progress=False)
    assert (res.converted, res.skipped, res.failed) == (2, 2, 0)
    assert _snapshot(part) == _snapshot(full)


def test_split_column_overrides_and_hash_split_is_deterministic(tmp_path):
    # one scan per case: the same image under several ids is refused (it could land in two splits)
    csv_path = write_csv(tmp_path / "c.csv", [{"case_id": f"k{i}", "image": save(tmp_path / f"a{i}.nii.gz",
                                                                                 phantom(seed=i)[0], affine_lps()),
                                               "split": "val" if i == 0 else ""} for i in range(3)])
    prepare_dataset(str(csv_path), str(tmp_path / "s"), CFG, show_progress=False)
    splits = {r["case_id"]: r["split"] for r in read_manifest(str(tmp_path / "s"))}
    assert splits["k0"] == "val"
    assert splits["k1"] == assign_split("k1", 0, (0.7, 0.1, 0.2))
    ids = [f"id{i}" for i in range(4000)]
    got = [assign_split(i, 3, (0.7, 0.1, 0.2)) for i in ids]
    assert got == [assign_split(i, 3, (0.7, 0.1, 0.2)) for i in ids]
    assert abs(got.count("train") / 4000 - 0.7) < 0.03 and abs(got.count("test") / 4000 - 0.2) < 0.03


def test_dicom_identifiers_never_reach_the_store(shared_data, tmp_path, caplog):
    series = shared_data / "ct/totalsegmentator/example_ct_dicom"
    root = tmp_path / "in"
    root.mkdir()
    (root / "series").symlink_to(series)
    store = tmp_path / "store"
    res = prepare_dataset(str(root), str(store), PrepareConfig(workers=0, salt="s3cret", spacing=(4.0, 4.0, 4.0)),
                          show_progress=False)
    assert res.ok and res.converted == 1
    identifiers = set()
    for f in sorted(series.iterdir())[:20]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                    "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StudyID"):
            value = str(ds.get(key, "") or "").strip()
            if len(value) >= 4:
                identifiers.add(value)
        identifiers.add(f.name.removeprefix("CT."))  # these file names are SOP instance UIDs
    assert any("." in v for v in identifiers)  # the UIDs at least are present in the source
    blobs = [p.read_bytes() for p in store.rglob("*") if p.is_file()] + [caplog.text.encode()]
    for ident in identifiers:
        assert not any(ident.encode() in b for b in blobs), ident
    # This series has an emptied SeriesInstanceUID, so its id hashes the folder path.
    uid = str(pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID)
    key = uid or str((root / "series").absolute())
    case_id = read_manifest(str(store))[0]["case_id"]
    assert case_id == hashed_id(key, "s3cret") != hashed_id(key, "other")


def test_site_preset_spacing_and_cli_flags(tmp_path):
    raw = nnunet_folder(tmp_path / "raw", n=1)
    rc = main(["--input", str(raw), "--output", str(tmp_path / "s"), "--workers", "0", "--site-preset", "abdomen",
               "--site", "hospital_b", "salt=x"])
    assert rc == 0
    r = read_manifest(str(tmp_path / "s"))[0]
    assert r["site"] == "hospital_b" and r["spacing"] == pytest.approx([1.0, 1.0, 2.0])
    rc = main(["--input", str(raw), "--output", str(tmp_path / "t"), "--spacing", "2,2,4", "--site-preset", "abdomen"])
    assert rc == 0 and read_manifest(str(tmp_path / "t"))[0]["spacing"] == pytest.approx([2.0, 2.0, 4.0])


def test_multi_site_folder_takes_site_per_case(tmp_path):
    """Phantoms made with `--site all` record each case's site in dataset.json."""
    import json

    from lnfm.data.cases import discover

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for cid in ("pelvis_000", "axilla_000"):
        (tmp_path / "imagesTr" / f"{cid}_0000.nii.gz").write_bytes(b"")
        (tmp_path / "labelsTr" / f"{cid}.nii.gz").write_bytes(b"")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "site": "all",
        "cases": [{"case": "pelvis_000", "site": "pelvis"}, {"case": "axilla_000", "site": "axilla"}]}))
    cases, errors = discover(str(tmp_path))
    assert not errors
    assert {c.case_id: c.site for c in cases} == {"pelvis_000": "pelvis", "axilla_000": "axilla"}


def test_pet_on_coarser_grid_is_resampled_and_labels_mapped(tmp_path):
    """HECKTOR-style case: PET on a 2x coarser grid in the same frame, label 2 = nodal GTV."""
    img, lab = phantom(shape=(40, 36, 24), nodes=((20, 18, 12, 3),))
    lab = lab * 2  # nodes carry value 2; value 1 (primary tumour) marks a separate box
    lab[5:8, 5:8, 5:8] = 1
    ct_aff = affine_lps()
    pet_aff = ct_aff.copy()
    pet_aff[:3, :3] *= 2.0
    # PET value = world x coordinate + 50 (> 0, as PET is), so a linear resampling reproduces it exactly inside
    # the grid.
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in (20, 18, 12)], indexing="ij"), -1)
    pet = (ijk @ pet_aff[:3, :3].T + pet_aff[:3, 3])[..., 0].astype(np.float32) + 50
    rows = [{"case_id": "h1", "image": save(tmp_path / "ct.nii.gz", img, ct_aff),
             "pet": save(tmp_path / "pet.nii.gz", pet, pet_aff), "label": save(tmp_path / "lab.nii.gz", lab, ct_aff),
             "site": "head_neck"}]
    store = tmp_path / "store"
    res = prepare_dataset(str(write_csv(tmp_path / "cases.csv", rows)), str(store),
                          PrepareConfig(workers=0, crop_body=False, label_map={2: 1}), show_progress=False)
    assert res.ok, res.failures
    rec = read_manifest(str(store))[0]
    image, label = read_case(str(store), rec)
    assert image.shape[-1] == 2 and set(np.unique(label)) == {0, 1}
    assert len(rec["nodes"]) == 1 and label.sum() == 7 ** 3  # the value-1 box is dropped
    aff = np.asarray(rec["affine"])
    world_x = (np.stack(np.meshgrid(*[np.arange(s) for s in image.shape[:3]], indexing="ij"), -1)
               @ aff[:3, :3].T + aff[:3, 3])[..., 0]
    inner = (slice(2, -2),) * 3  # away from the PET grid's half-voxel edge
    np.testing.assert_allclose(image[..., 1][inner], world_x[inner] + 50, atol=1e-3)
    strict = prepare_dataset(str(tmp_path / "cases.csv"), str(tmp_path / "s2"),
                             PrepareConfig(workers=0, resample_channels=False), show_progress=False)
    assert not strict.ok and "channel grid" in strict.failures[0]["reason"]


def test_output_apart_from_the_input_and_a_held_store_is_refused(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from lnfm.cli import run_job

    from tree_helpers import tree_digest

    raw = nnunet_folder(tmp_path / "raw", n=1)
    image = raw / "imagesTr" / "case000_0000.nii.gz"
    csv_path = str(write_csv(tmp_path / "cases.csv", [{"case_id": "a", "image": str(image)}]))
    cases = {
        "same": (["--input", str(raw), "--output", str(raw)], "--output is --input"),
        "inside": (["--input", str(raw), "--output", str(raw / "store")], "--output lies inside --input"),
        "parent": (["--input", str(raw), "--output", str(tmp_path)], "--output contains --input"),
        "csv_image": (["--input", csv_path, "--output", str(raw / "imagesTr")], "--output contains --input"),
    }
    before = tree_digest(tmp_path)
    for name, (args, reason) in cases.items():
        capsys.readouterr()
        rc = run_job("prepare", args + ["workers=0", "salt=x"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "error: " in err[-1] and reason in err[-1], (name, err)
        assert tree_digest(tmp_path) == before, name
    hold = ("import sys, time; from lnfm.workdir import lock_folder\n"
            "with lock_folder(sys.argv[1], '.lnfm.lock.shard-0-of-1'):\n"
            "    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "store")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert proc.stdout.readline().strip() == "locked"
        rc = run_job("prepare", ["--input", str(raw), "--output", str(tmp_path / "store"), "workers=0", "salt=x"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and f"in use by another lnfm job (pid {proc.pid} on" in err[-1]
    finally:
        proc.kill()
        proc.wait()
    assert main(["--input", str(raw), "--output", str(tmp_path / "store"), "workers=0", "salt=x"]) == 0
    assert len(read_manifest(str(tmp_path / "store"))) == 1
    assert not list((tmp_path / "store").glob(".lnfm.lock*"))


def test_prepares_of_two_shard_layouts_into_one_store_do_not_run_together(tmp_path, capsys):
    """The lock was per shard layout: a plain prepare ran beside a --num-shards 2 one, both converted a case and
    one failed with a TensorStore error. A held shard lock of another layout refuses in one line naming the store
    and the holder; the shards of the holder's own layout still run beside it."""
    import os
    import subprocess
    import sys

    from lnfm.cli import run_job

    raw, store = nnunet_folder(tmp_path / "raw", n=2), str(tmp_path / "store")
    hold = ("import sys, time; from lnfm.workdir import lock_folder\n"
            "with lock_folder(sys.argv[1], '.lnfm.lock.shard-0-of-2'):\n"
            "    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, store], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert proc.stdout.readline().strip() == "locked"
        args = ["--input", str(raw), "--output", store, "workers=0", "salt=x"]
        capsys.readouterr()
        assert run_job("prepare", args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error: " in err[0] and store in err[-1] and "--num-shards 2" in err[-1], err
        assert f"(pid {proc.pid} on" in err[-1]
        assert not (tmp_path / "store" / "manifest.jsonl").exists()
        assert main(args + ["--num-shards", "2", "--shard-index", "1"]) == 0  # the holder's layout runs beside it
        assert len(read_manifest(store)) == 1
    finally:
        proc.kill()
        proc.wait()
    assert main(["--input", str(raw), "--output", store, "workers=0", "salt=x"]) == 0  # a killed holder: no lock
    assert len(read_manifest(store)) == 2


def test_crop_comes_from_the_image_alone_so_predict_crops_alike(tmp_path, caplog):
    """A node at the body's edge whose label spills into the air: prepare crops from the image
    alone, as predict must (it has no label), drops and counts the spilled voxels, and refuses
    a label that lies wholly outside the body."""
    from lnfm.data.contract import read_contract
    from lnfm.data.prepare import preprocess_case, read_channels

    shape, aff = (40, 36, 24), np.diag([1.0, 1.0, 1.0, 1.0])  # RAS at 1 mm: stored axes = source axes
    img = np.full(shape, -1000, np.int16)
    img[10:30, 8:28, :] = 40  # the body: a box, every z
    lab = np.zeros(shape, np.uint8)
    lab[10:13, 20:23, 5:8] = 1  # a node against the body's edge, inside it
    lab[4:13, 12:15, 10:13] = 1  # a node whose label spills 6 voxels out of the body into air
    raw = tmp_path / "raw"
    rows = [{"case_id": "edge", "image": save(raw / "edge.nii.gz", img, aff),
             "label": save(raw / "edge_lab.nii.gz", lab, aff), "site": "s", "split": "train"}]
    away = np.zeros(shape, np.uint8)
    away[0:3, 0:3, 0:3] = 1  # only air: not a label of this image
    rows.append({"case_id": "away", "image": rows[0]["image"], "label": save(raw / "away_lab.nii.gz", away, aff),
                 "site": "s", "split": "train"})
    store = str(tmp_path / "store")
    res = prepare_dataset(str(write_csv(tmp_path / "cases.csv", rows)), store, CFG, show_progress=False)
    assert res.converted == 1 and len(res.failures) == 1
    assert res.failures[0]["file"].endswith("away_lab.nii.gz")
    assert "every labelled voxel (27) lies outside the body crop" in res.failures[0]["reason"]
    rec = read_manifest(store)[0]
    # Hand-computed: the body box [10, 30) x [8, 28) x [0, 24) plus the 2-voxel margin, clipped.
    assert (rec["crop_start"], rec["crop_stop"]) == ([8, 6, 0], [32, 30, 24])
    assert rec["label_voxels_outside_crop"] == 4 * 3 * 3  # x = 4..7 lie before the crop's x = 8
    image, label = read_case(store, rec)
    np.testing.assert_array_equal(label, lab[8:32, 6:30, :])
    assert label.sum() == lab.sum() - 36 and label[2:5, 14:17, 5:8].all()  # the edge node is whole
    assert any("edge" in r.getMessage() and "36 labelled voxel(s)" in r.getMessage() for r in caplog.records)
    # Predict's path (read_channels + preprocess_case without a label) gives the stored grid and voxels.
    scan = read_channels([rows[0]["image"]], True)
    data, none, geometry = preprocess_case(scan, read_contract(store))
    assert none is None and "label_voxels_outside_crop" not in geometry
    assert {k: geometry[k] for k in ("crop_start", "crop_stop", "shape", "affine")} == \
        {k: rec[k] for k in ("crop_start", "crop_stop", "shape", "affine")}
    np.testing.assert_array_equal(data[..., 0], image[..., 0])


def test_a_float64_value_beyond_float32_is_named_not_called_inf(tmp_path, recwarn):
    """A finite 1e300 became Inf in the float32 cast: a RuntimeWarning plus 'NaN or Inf voxels', which the file
    does not hold."""
    import nibabel as nib

    from lnfm.data.prepare import CaseError, read_channels

    data = np.full((20, 20, 10), -1000.0)
    data[5, 5, 5] = 1e300
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    img.set_qform(img.affine, code=1)
    nib.save(img, str(tmp_path / "f64.nii.gz"))
    with pytest.raises(CaseError) as e:
        read_channels([str(tmp_path / "f64.nii.gz")], False)
    says = "voxel values up to 1e+300 exceed float32's range (no CT or PET value does)"
    assert str(e.value) == f"{tmp_path / 'f64.nii.gz'}: {says}"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_misnamed_undeclared_and_orphan_nnunet_files_are_failed_lines_and_the_rest_converts(tmp_path, capsys):
    """imagesTr/caseB.nii.gz (no _0000), a PET channel dataset.json does not declare and a label without an
    image were passed over in silence (converted 1, failed 0, exit 0)."""
    raw = nnunet_folder(tmp_path / "raw", n=3)
    img, lab = phantom()
    save(raw / "imagesTr" / "caseB.nii.gz", img, affine_lps())
    save(raw / "labelsTr" / "caseB.nii.gz", lab, affine_lps())
    save(raw / "imagesTr" / "case001_0001.nii.gz", img.astype(np.float32), affine_lps())
    save(raw / "labelsTr" / "caseZ.nii.gz", lab, affine_lps())
    store = tmp_path / "store"
    rc = main(["--input", str(raw), "--output", str(store), "--workers", "0", "salt=s"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[0] == "converted 2, skipped 0 (already done), failed 4"
    assert sorted(out[1:]) == sorted([
        f"FAILED {raw}/imagesTr/caseB.nii.gz: name lacks the _NNNN channel suffix nnU-Net uses (CASE_0000 for "
        f"CT, CASE_0001 for PET)",
        f"FAILED {raw}/labelsTr/caseB.nii.gz: label without an image: no imagesTr/caseB_0000 file",
        f"FAILED {raw}/imagesTr/case001_0001.nii.gz: channel 0001 is not declared (dataset.json declares 0000 CT); "
        f"declare it in dataset.json or move the file away",
        f"FAILED {raw}/labelsTr/caseZ.nii.gz: label without an image: no imagesTr/caseZ_0000 file"])
    assert [r["case_id"] for r in read_manifest(str(store))] == ["case000", "case002"]
    assert len(read_failures(str(store))) == 4


def _brute_coverage(ref_aff, ref_shape, aff, shape) -> float:
    """Share of the reference grid's voxel centres inside the other grid's voxels, voxel by voxel."""
    import nibabel as nib

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in ref_shape], indexing="ij"), -1).reshape(-1, 3)
    idx = nib.affines.apply_affine(np.linalg.inv(aff) @ ref_aff, ijk)
    return float(np.all((idx >= -0.5 - 1e-6) & (idx <= np.array(shape) - 0.5 + 1e-6), axis=1).mean())


def test_grid_coverage_matches_a_voxel_by_voxel_count_for_oblique_grids():
    from scipy.spatial.transform import Rotation

    from lnfm.data.prepare import grid_coverage

    rng = np.random.default_rng(4)
    seen = []
    for t in range(12):
        ref, other = np.eye(4), np.eye(4)
        ref[:3, :3] = Rotation.random(random_state=t).as_matrix() @ np.diag(rng.uniform(0.6, 3.0, 3))
        other[:3, :3] = Rotation.random(random_state=50 + t).as_matrix() @ np.diag(rng.uniform(1.0, 5.0, 3))
        ref_shape, shape = tuple(rng.integers(6, 30, 3)), tuple(rng.integers(6, 30, 3))
        # the other grid's centre within 25 mm of the reference grid's: partial overlaps of every degree
        centre = ref[:3, :3] @ ((np.array(ref_shape) - 1) / 2) + rng.uniform(-25, 25, 3)
        other[:3, 3] = centre - other[:3, :3] @ ((np.array(shape) - 1) / 2)
        expected = _brute_coverage(ref, ref_shape, other, shape)
        assert grid_coverage(ref, ref_shape, other, shape) == pytest.approx(expected, abs=1e-12)
        seen.append(expected)
    assert min(seen) < 0.5 < max(seen)  # the draws span partial overlaps, not only 0 or 1


def test_a_pet_ct_of_one_scanner_geometry_covers_its_ct():
    """Whole-body PET/CT (Biograph-like): CT 512 x 512 at 0.977 mm (500 mm across, centred 30 mm off the
    isocentre), 300 slices of 3 mm, LPS; PET 200 x 200 at 4.07 mm (814 mm) around the isocentre, the CT's
    scan range reaching 15 mm beyond the PET beds' at each end. The PET covers 96.7% of the CT, above
    MIN_CHANNEL_COVERAGE (90%); the share is counted here axis by axis."""
    from lnfm.data.prepare import MIN_CHANNEL_COVERAGE, grid_coverage

    ct = np.diag([-0.977, -0.977, 3.0, 1.0])
    ct[:3, 3] = (0.977 * 255.5, 0.977 * 255.5 - 30.0, -900.0)  # recon centre 30 mm off the isocentre in y
    pet = np.diag([-4.07, -4.07, 3.0, 1.0])
    pet[:3, 3] = (4.07 * 99.5, 4.07 * 99.5, -885.0)
    per_axis = []
    for a, (n_ct, n_pet) in enumerate(((512, 200), (512, 200), (300, 290))):
        world = ct[a, a] * np.arange(n_ct) + ct[a, 3]
        idx = (world - pet[a, 3]) / pet[a, a]
        per_axis.append(np.mean((idx >= -0.5) & (idx <= n_pet - 0.5)))
    covered = grid_coverage(ct, (512, 512, 300), pet, (200, 200, 290))
    assert covered == pytest.approx(np.prod(per_axis), abs=1e-12)
    assert per_axis[:2] == [1.0, 1.0] and covered == pytest.approx(290 / 300) and covered > MIN_CHANNEL_COVERAGE


def test_a_pet_beside_the_ct_is_refused_naming_the_file_and_its_coverage(tmp_path, capsys):
    """A PET 1000 mm away was stored all 0, one 30 mm off with 47% zero fill, both exit 0."""
    img, lab = phantom()
    ct_aff = affine_lps()
    pet = (lab * 6.0 + 1.0).astype(np.float32)
    rows, refused = [], {}
    for name, shift in (("good", 0.0), ("far", 1000.0), ("off30", 30.0)):
        pet_aff = ct_aff.copy()
        pet_aff[2, 3] += shift  # along z: 24 slices of 2 mm
        rows.append({"case_id": name, "image": save(tmp_path / f"{name}_ct.nii.gz", img, ct_aff),
                     "pet": save(tmp_path / f"{name}_pet.nii.gz", pet, pet_aff),
                     "label": save(tmp_path / f"{name}_lab.nii.gz", lab, ct_aff)})
        refused[name] = _brute_coverage(ct_aff, img.shape, pet_aff, pet.shape)
    assert refused["good"] == 1.0 and refused["far"] == 0.0 and refused["off30"] == pytest.approx(9 / 24)
    # the 30 mm PET is still a grid of its own beyond GRID_TOL_MM, so it is resampled, not taken as it is
    store = tmp_path / "store"
    rc = main(["--input", str(write_csv(tmp_path / "cases.csv", rows)), "--output", str(store), "--workers", "0",
               "salt=s"])
    failed = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED "))
    says = ("of the first channel's voxels (at least 90% must lie inside it; resampled, the rest would be 0): a PET "
            "of this CT covers it, so an origin or orientation is wrong, or it is another scan's")
    assert rc == 1 and failed == [
        f"FAILED {tmp_path}/far_pet.nii.gz: channel grid covers only 0.0% {says}",
        f"FAILED {tmp_path}/off30_pet.nii.gz: channel grid covers only 37.5% {says}"]
    assert [r["case_id"] for r in read_manifest(str(store))] == ["good"]


def test_a_larger_coarser_pet_field_of_view_is_accepted_and_interpolated(tmp_path):
    """PET at 3 x 3.6 x 4 mm reaching 10 mm beyond the CT on every side (a PET field of view is the wider):
    accepted, and each stored PET voxel is the trilinear value scipy's map_coordinates gives there."""
    from scipy import ndimage

    img, lab = phantom()
    ct_aff = affine_lps()
    pet_aff = np.diag([-3.0, -3.6, 4.0, 1.0])
    pet_aff[:3, 3] = ct_aff[:3, 3] + (10.0, 10.0, -10.0)  # LPS: x and y run towards smaller RAS values
    pet = np.random.default_rng(2).uniform(0.5, 9.0, (24, 20, 20)).astype(np.float32)
    rows = [{"case_id": "p", "image": save(tmp_path / "ct.nii.gz", img, ct_aff),
             "pet": save(tmp_path / "pet.nii.gz", pet, pet_aff), "label": save(tmp_path / "lab.nii.gz", lab, ct_aff)}]
    store = tmp_path / "store"
    res = prepare_dataset(str(write_csv(tmp_path / "c.csv", rows)), str(store),
                          PrepareConfig(workers=0, crop_body=False), show_progress=False)
    assert res.ok, res.failures
    rec = read_manifest(str(store))[0]
    image, _ = read_case(str(store), rec)
    aff = np.asarray(rec["affine"])
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape[:3]], indexing="ij"), 0).reshape(3, -1)
    pet_ijk = (np.linalg.inv(pet_aff) @ aff @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    assert pet_ijk.min() > 0 and (pet_ijk.max(1) < np.array(pet.shape) - 1).all()  # wholly inside the PET
    np.testing.assert_allclose(image[..., 1][tuple(ijk)], ndimage.map_coordinates(pet, pet_ijk, order=1), rtol=1e-5)


def test_a_pet_covering_most_of_its_ct_is_0_beyond_its_field_of_view_with_a_warning(tmp_path, caplog):
    """A PET 2 mm above and 2.5 mm beside its CT covers 91% of it, above MIN_CHANNEL_COVERAGE: accepted
    without a word, and the first uncovered voxels beyond its edge got the edge value (a copy of the uptake
    there), the farther ones 0. Now every voxel whose centre lies outside the PET's field of view is 0, as the
    refusal below MIN_CHANNEL_COVERAGE says the rest would be, and a warning names the case and the share."""
    import logging

    img, lab = phantom()
    ct_aff = affine_lps()
    pet_aff = ct_aff.copy()
    pet_aff[:3, 3] += (-2.5, 0.0, 2.0)  # LPS: x runs towards smaller RAS x; 2.5 of 40 x voxels, 1 of 24 slices
    pet = np.random.default_rng(3).uniform(0.5, 9.0, img.shape).astype(np.float32)
    covered = _brute_coverage(ct_aff, img.shape, pet_aff, pet.shape)
    assert covered == pytest.approx(38 / 40 * 23 / 24)
    rows = [{"case_id": "p", "image": save(tmp_path / "ct.nii.gz", img, ct_aff),
             "pet": save(tmp_path / "pet.nii.gz", pet, pet_aff), "label": save(tmp_path / "lab.nii.gz", lab, ct_aff)}]
    store = tmp_path / "store"
    logger = logging.getLogger("lnfm.data.prepare")  # after lnfm's setup_logging, records no longer reach the root
    logger.addHandler(caplog.handler)
    try:
        res = prepare_dataset(str(write_csv(tmp_path / "c.csv", rows)), str(store),
                              PrepareConfig(workers=0, crop_body=False, salt="s"), show_progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert res.ok, res.failures
    assert {r.getMessage() for r in caplog.records if "covers" in r.getMessage()} == {
        "case p: channel 1 (PET) covers only 91.0% of the first channel's voxels; the other 9.0% lie outside its "
        "field of view and are set to 0 (no signal)"}
    rec = read_manifest(str(store))[0]
    image, _ = read_case(str(store), rec)
    aff = np.asarray(rec["affine"])
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape[:3]], indexing="ij"), 0).reshape(3, -1)
    pet_ijk = (np.linalg.inv(pet_aff) @ aff @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    inside = np.all((pet_ijk >= -0.5 - 1e-6) & (pet_ijk <= np.array(pet.shape)[:, None] - 0.5 + 1e-6), axis=0)
    assert inside.mean() == pytest.approx(covered)
    values = image[..., 1][tuple(ijk)]
    assert (values[~inside] == 0).all() and (values[inside] > 0).all()


def test_a_ct_given_as_the_pet_is_refused_naming_it(tmp_path, capsys):
    """A CSV whose pet column named the CT file (or a copy of it, or another CT) converted with exit 0: the store's
    PET channel held HU down to -1000. Each is a FAILED line naming the PET file; a PET whose reconstruction noise
    goes below 0 (filtered back-projection) still converts."""
    img, lab = phantom()
    other, _ = phantom(seed=1)
    ct = save(tmp_path / "ct.nii.gz", img, affine_lps())
    (tmp_path / "copy.nii.gz").write_bytes(Path(ct).read_bytes())
    noisy = (lab * 5.0 + 1.0 + np.random.default_rng(0).normal(0, 0.8, img.shape)).astype(np.float32)
    assert noisy.min() < -1.5
    pets = {"same": ct, "copy": str(tmp_path / "copy.nii.gz"),
            "other_ct": save(tmp_path / "other_ct.nii.gz", other, affine_lps()),
            "fbp": save(tmp_path / "fbp_pet.nii.gz", noisy, affine_lps())}
    rows = [{"case_id": name, "image": ct, "pet": pet, "label": save(tmp_path / "lab.nii.gz", lab, affine_lps())}
            for name, pet in pets.items()]
    store = tmp_path / "store"
    rc = main(["--input", str(write_csv(tmp_path / "cases.csv", rows)), "--output", str(store), "--workers", "0",
               "salt=s"])
    failed = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED "))
    same = (f"channel 1 holds the same scan as channel 0 ({ct}): each channel needs its own file (the PET's, not "
            f"the CT's)")
    mean = float(np.mean(other, dtype=np.float64))
    assert rc == 1 and failed == sorted([
        f"FAILED {ct}: {same}",
        f"FAILED {tmp_path}/copy.nii.gz: {same}",
        f"FAILED {tmp_path}/other_ct.nii.gz: mean value {mean:.3g} is below 0 (values {other.min()}..{other.max()}): "
        f"not a PET, whose activity (SUV, Bq per mL) is never negative beyond noise around 0 (a CT in HU, its air at "
        f"-1000?)"])
    (record,) = read_manifest(str(store))
    assert record["case_id"] == "fbp" and read_case(str(store), record)[0][..., 1].min() < -1.5
    kept = {f["case_id"]: f["reason"] for f in read_failures(str(store))}  # the value's reason whole, no <path>
    assert kept["other_ct"] == failed[-1].split(": ", 1)[1] and kept["same"].endswith("(the PET's, not the CT's)")


def test_real_cts_given_as_the_pet_are_refused(shared_data, tmp_path, capsys):
    """The real CTs of ../shared/data (NIfTI and a DICOM series), each the PET channel of a phantom CT: refused by
    their values."""
    img, _ = phantom()
    ct = save(tmp_path / "ct.nii.gz", img, affine_lps())
    real = shared_data / "ct" / "totalsegmentator"
    pets = [real / "example_ct.nii.gz", real / "chest_vessels" / "ct_cropped.nii.gz", real / "example_ct_dicom"]
    rows = [{"case_id": f"c{i}", "image": ct, "pet": str(p)} for i, p in enumerate(pets)]
    rc = main(["--input", str(write_csv(tmp_path / "cases.csv", rows)), "--output", str(tmp_path / "store"),
               "--workers", "0", "salt=s"])
    failed = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED "))
    assert rc == 1 and sorted(line.split(": ")[0] for line in failed) == sorted(f"FAILED {p}" for p in pets)
    assert all(" is below 0 " in line and "not a PET, whose activity" in line for line in failed), failed
    assert read_manifest(str(tmp_path / "store")) == []


@pytest.mark.parametrize("salt", ["#s3cr3t", "pepper # v2", "0777", "None"])
def test_salt_and_site_options_are_taken_as_typed(tmp_path, salt):
    """They were passed on as YAML overrides: '#s3cr3t' became the text 'None' (every '#' salt gave the same,
    public ids), 'pepper # v2' lost its end, '0777' became 511; --site yes was stored as 'True'."""
    img, lab = phantom()
    image = save(tmp_path / "a.nii.gz", img, affine_lps())
    csv_path = write_csv(tmp_path / "cases.csv", [{"image": image, "label": save(tmp_path / "l.nii.gz", lab,
                                                                                 affine_lps())}])
    store = tmp_path / "store"
    assert main(["--input", str(csv_path), "--output", str(store), "--workers", "0", "--salt", salt,
                 "--site", "yes"]) == 0
    (record,) = read_manifest(str(store))
    assert record["case_id"] == hashed_id(str(Path(image).absolute()), salt) and record["site"] == "yes"


def test_an_option_and_an_override_of_one_key_are_refused(tmp_path, capsys):
    """--spacing 1.5,1.5,1.5 spacing=3,3,3 stored at 1.5 mm, in either order, without a word."""
    from lnfm.cli import run_job

    img, _ = phantom()
    csv_path = write_csv(tmp_path / "cases.csv", [{"image": save(tmp_path / "a.nii.gz", img, affine_lps())}])
    for argv in (["--spacing", "1.5,1.5,1.5", "spacing=[3,3,3]"], ["salt=x", "--salt", "y"]):
        rc = run_job("prepare", ["--input", str(csv_path), "--output", str(tmp_path / "store"), *argv])
        key = argv[0][2:] if argv[0].startswith("--") else argv[1][2:]
        assert rc == 2 and capsys.readouterr().err.strip().startswith(f"lnfm prepare: error: --{key} and the override")
    assert not (tmp_path / "store").exists()


def _two_cases(tmp_path):
    """Cases a and b, one phantom's label on two scans (its noise seeds 0 and 1), listed in a CSV: (a's image, the
    label, CSV, store path, config)."""
    (img, lab), (other, _) = phantom(), phantom(seed=1)
    rows = [{"case_id": cid, "image": save(tmp_path / f"{cid}.nii.gz", scan, affine_lps()),
             "label": save(tmp_path / f"{cid}_lab.nii.gz", lab, affine_lps())}
            for cid, scan in (("a", img), ("b", other))]
    return img, lab, str(write_csv(tmp_path / "cases.csv", rows)), str(tmp_path / "store"), PrepareConfig(workers=0,
                                                                                                          salt="s")


def test_an_output_holding_other_files_is_refused_and_a_new_empty_or_own_store_is_taken(tmp_path, capsys):
    """prepare wrote its store beside the files of any folder (a user's, an export's, a workdir's: tests/hostile
    has those). Refused in one line, the folder untouched; an empty folder (hidden files aside), the store itself on
    a rerun and a store stopped before its first case (only its contract) are prepare's."""
    import shutil

    from lnfm.cli import run_job

    _, _, csv_path, _, cfg = _two_cases(tmp_path)
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "thesis.docx").write_text("chapter 1")
    rc = run_job("prepare", ["--input", csv_path, "--output", str(mine), "workers=0", "salt=s"])
    assert rc == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lnfm prepare: error: {mine}: holds files prepare did not make (notes, thesis.docx) and is not a store; "
        f"prepare writes a store only into a new or empty folder or a store it made: choose another --output")
    assert sorted(p.name for p in mine.rglob("*")) == ["notes", "thesis.docx"]
    store = tmp_path / "empty"
    store.mkdir()
    (store / ".DS_Store").write_bytes(b"\0")
    assert prepare_dataset(csv_path, str(store), cfg, show_progress=False).converted == 2
    assert prepare_dataset(csv_path, str(store), cfg, show_progress=False).skipped == 2
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(store / "contract.json", stopped / "contract.json")
    assert prepare_dataset(csv_path, str(stopped), cfg, show_progress=False).converted == 2


def test_a_contract_no_reader_takes_is_refused_before_anything_is_written(tmp_path, capsys):
    """An nnU-Net folder whose dataset.json declared channel 0 'T2' (an MR) converted with exit 0, and its
    contract.json was then refused by the rerun and by pretrain ("channels ['T2'] does not start with 'CT'"); so was
    body_threshold_hu=nan. Now the first run refuses, in one line naming dataset.json or the key, and writes
    nothing."""
    from lnfm.cli import run_job

    raw = nnunet_folder(tmp_path / "raw", n=1)
    meta = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T2"}}))
    store = tmp_path / "store"
    assert run_job("prepare", ["--input", str(raw), "--output", str(store), "workers=0", "salt=s"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lnfm prepare: error: {raw}/dataset.json: channels ['T2'] does not start with 'CT' (lnfm reads CT, with PET "
        f"as further channels)")
    (raw / "dataset.json").write_text(json.dumps(meta))
    assert run_job("prepare", ["--input", str(raw), "--output", str(store), "workers=0", "body_threshold_hu=nan"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lnfm prepare: error: body_threshold_hu: nan is not a HU value")
    assert not store.exists()


def test_a_rerun_with_another_site_is_refused_like_another_spacing(tmp_path, capsys):
    """A rerun with another --site said 'skipped 2 (already done)' and kept the old site in every record (and so in
    an export's training_data.sites) without a word; another --spacing was refused. Now so is another site, in one
    line naming the store and both sites, with the store unchanged; the same site, given or not, still skips."""
    from lnfm.cli import run_job

    from tree_helpers import tree_digest

    raw = nnunet_folder(tmp_path / "raw", n=2)  # dataset.json: site 'testsite'
    store = tmp_path / "store"
    base = ["--input", str(raw), "--output", str(store), "--workers", "0", "salt=s"]
    assert main(base) == 0
    before = tree_digest(store)
    assert run_job("prepare", base + ["--site", "head_neck"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lnfm prepare: error: {store}: case case000 was prepared with site 'testsite', this run gives it site "
        f"'head_neck' (and 1 more case(s)); a store keeps the site its cases were prepared with: prepare into a new "
        f"--output, or repeat the site")
    assert tree_digest(store) == before
    for same in ([], ["--site", "testsite"]):
        assert main(base + same) == 0 and "converted 0, skipped 2" in capsys.readouterr().out
    assert {r["site"] for r in read_manifest(str(store))} == {"testsite"}


def test_a_rerun_under_another_salt_is_refused_naming_the_scan_it_would_add_again(tmp_path, monkeypatch, capsys):
    """A CSV without case_id gives salted hashed ids: a rerun into the same store under another LNFM_ID_SALT
    added every scan again under a new id (8 cases for 4 scans, a scan in two splits; rc 0, 'converted 4'). The
    records' source digests are matched across ids: one line naming the file and the case it repeats, the store
    unchanged; the store's salt still skips every case."""
    from lnfm.cli import run_job

    from tree_helpers import tree_digest

    images = []
    for i in range(4):
        img, lab = phantom(nodes=((15 + i, 18, 12, 2),), seed=i)
        images.append(save(tmp_path / f"scan{i}.nii.gz", img, affine_lps()))
        save(tmp_path / f"scan{i}_lab.nii.gz", lab, affine_lps())
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("image,label\n" + "".join(f"scan{i}.nii.gz,scan{i}_lab.nii.gz\n" for i in range(4)))
    store = tmp_path / "store"
    args = ["--input", str(csv_path), "--output", str(store), "--workers", "0"]
    monkeypatch.setenv("LNFM_ID_SALT", "aaa")
    assert run_job("prepare", args) == 0
    assert len(read_manifest(str(store))) == 4
    before = tree_digest(store)
    monkeypatch.setenv("LNFM_ID_SALT", "bbb")
    capsys.readouterr()
    assert run_job("prepare", args) == 2
    new, old = ({hashed_id(str(Path(p).absolute()), salt): p for p in images} for salt in ("bbb", "aaa"))
    first = min(new)
    twin = next(cid for cid, p in old.items() if p == new[first])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lnfm prepare: error: {new[first]}: is the scan of case {twin} in the store {store} (the same image and "
        f"label files, here under the id {first}) (and 3 more): ids hashed under another salt or files renamed would "
        f"add each scan again under a new id; repeat the store's salt (--salt, LNFM_ID_SALT) and file names, or "
        f"prepare into a new --output"]
    assert tree_digest(store) == before
    monkeypatch.setenv("LNFM_ID_SALT", "aaa")
    assert main(args) == 0 and "converted 0, skipped 4" in capsys.readouterr().out


def test_a_copy_of_a_scan_under_another_id_is_a_failed_line_naming_the_case_it_copies(tmp_path, capsys):
    """drop_duplicates refuses one file listed under two ids; a copy of its files under other names (a study
    exported twice, a folder copied) was converted under both ids, one scan in two splits (rc 0, 'converted 3').
    The later case is now a FAILED line naming the case it copies, its arrays removed and its stored reason
    without paths; a rerun fails it again against the store's record."""
    import shutil

    _two_cases(tmp_path)
    for suffix in (".nii.gz", "_lab.nii.gz"):
        shutil.copy(tmp_path / f"a{suffix}", tmp_path / f"copy{suffix}")
    rows = [{"case_id": cid, "image": str(tmp_path / f"{name}.nii.gz"), "label": str(tmp_path / f"{name}_lab.nii.gz")}
            for cid, name in (("a", "a"), ("b", "b"), ("c", "copy"))]
    store = str(tmp_path / "store")
    args = ["--input", str(write_csv(tmp_path / "cases.csv", rows)), "--output", store, "--workers", "0", "--salt", "s"]
    reason = "case 'c' holds a copy of the image and label files of case 'a' (the same bytes); each scan may be " \
             "prepared once"
    assert main(args) == 1
    assert capsys.readouterr().out.splitlines() == ["converted 2, skipped 0 (already done), failed 1",
                                                    f"FAILED {tmp_path / 'copy.nii.gz'}: {reason}"]
    assert sorted(r["case_id"] for r in read_manifest(store)) == ["a", "b"]
    assert not [f for f in (Path(store) / "cases" / "c").rglob("*") if f.is_file()]
    assert [(f["case_id"], f["reason"]) for f in read_failures(store)] == [("c", reason)]
    assert main(args) == 1
    assert capsys.readouterr().out.splitlines() == ["converted 0, skipped 2 (already done), failed 1",
                                                    f"FAILED {tmp_path / 'copy.nii.gz'}: {reason}"]


def test_a_rerun_refuses_a_case_whose_files_changed_since_it_was_prepared(tmp_path):
    """A rerun skipped every case id already in the store: a corrected label, or another phantom set under the
    same ids, never reached it (exit 0, 'skipped'). The record's source digest now tells them apart; the unchanged
    case still skips, and the store keeps the first version."""
    img, lab, csv_path, store, cfg = _two_cases(tmp_path)
    assert prepare_dataset(csv_path, store, cfg, show_progress=False).converted == 2
    before = {r["case_id"]: r for r in read_manifest(store)}
    assert all(r["source"].startswith("sha256:") for r in before.values())
    corrected = lab.copy()
    corrected[2:5, 2:5, 2:5] = 1  # a node the first label missed
    save(tmp_path / "b_lab.nii.gz", corrected, affine_lps())
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.converted, res.skipped, res.failed) == (0, 1, 1)
    assert res.failures[0]["file"] == str(tmp_path / "b_lab.nii.gz")
    assert res.failures[0]["reason"].startswith("its image or label files changed since this case was prepared")
    assert {r["case_id"]: r for r in read_manifest(store)} == before
    save(tmp_path / "b_lab.nii.gz", lab, affine_lps())  # the file as it was: the rerun skips it again
    assert prepare_dataset(csv_path, store, cfg, show_progress=False).skipped == 2


def test_a_rerun_reads_no_unchanged_source_and_still_catches_a_rewritten_one(tmp_path, monkeypatch):
    """A rerun hashed every byte of every finished case's files (as long as reading the collection again). The
    record now also keeps a digest of the files' sizes and times: while they match, nothing is read. A file
    rewritten with its size kept and its modification time set back is still caught (its status-change time
    moved); a file only touched is hashed, found equal and skipped."""
    import os
    import time

    from lnfm.data import prepare as prep

    img, lab, csv_path, store, cfg = _two_cases(tmp_path)
    assert prepare_dataset(csv_path, store, cfg, show_progress=False).converted == 2
    assert all(r["source_stat"].startswith("stat:") for r in read_manifest(store))
    hashed = []
    real_sha256 = prep.file_sha256
    monkeypatch.setattr(prep, "file_sha256", lambda f: hashed.append(Path(f).name) or real_sha256(f))
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.skipped, res.failed, hashed) == (2, 0, [])
    target = tmp_path / "b_lab.nii.gz"
    before, data = target.stat(), bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # another byte, the same size
    while target.stat().st_ctime_ns == before.st_ctime_ns:  # a file system with coarse times: write again
        time.sleep(0.01)
        target.write_bytes(data)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.skipped, res.failed) == (1, 1) and res.failures[0]["file"] == str(target)
    assert hashed == ["b.nii.gz", "b_lab.nii.gz"]  # case a's files were not read
    hashed.clear()
    os.utime(tmp_path / "a.nii.gz")  # touched, not changed: hashed, equal, skipped
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(data)
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.skipped, res.failed) == (2, 0) and sorted(hashed) == ["a.nii.gz", "a_lab.nii.gz", "b.nii.gz",
                                                                       "b_lab.nii.gz"]


def test_a_label_replaced_while_its_case_is_converted_fails_the_case_and_the_rerun_converts_it(tmp_path, monkeypatch):
    """The record's source digest was taken after the arrays were written: a label replaced once prepare had read
    it gave a record naming the new file over the old label's arrays, and every rerun skipped it. The digest is
    now taken before reading and the files' stat compared after: the case fails in one line, with no record."""
    from lnfm.data import prepare as prep

    img, lab = phantom()
    label = tmp_path / "a_lab.nii.gz"
    rows = [{"case_id": "a", "image": save(tmp_path / "a.nii.gz", img, affine_lps()),
             "label": save(label, lab, affine_lps())}]
    csv_path, store = str(write_csv(tmp_path / "cases.csv", rows)), str(tmp_path / "store")
    corrected = lab.copy()
    corrected[2:5, 2:5, 2:5] = 1  # a node the first label missed
    real_read = prep._read3d

    def read_then_replace(path, *args):
        vol = real_read(path, *args)
        if Path(path) == label:  # a corrected label moved over the file once it was read
            save(tmp_path / "fixed.nii.gz", corrected, affine_lps())
            (tmp_path / "fixed.nii.gz").replace(label)
        return vol

    monkeypatch.setattr(prep, "_read3d", read_then_replace)
    cfg = PrepareConfig(workers=0, salt="s")
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.converted, res.failed) == (0, 1)
    assert (res.failures[0]["file"], res.failures[0]["reason"]) == (
        str(label), "changed while it was being converted; rerun prepare")
    assert read_manifest(store) == []  # the arrays written before the check are removed with the failed case
    assert not [f for f in (Path(store) / "cases").rglob("*") if f.is_file()]
    monkeypatch.setattr(prep, "_read3d", real_read)
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.converted, res.failed) == (1, 0)
    (record,) = read_manifest(store)
    clean = str(tmp_path / "clean")
    prepare_dataset(csv_path, clean, cfg, show_progress=False)
    assert np.array_equal(read_case(store, record)[1], read_case(clean, read_manifest(clean)[0])[1])


def test_two_prepares_into_a_new_store_at_once_settle_one_contract(tmp_path, monkeypatch):
    """settle_contract read and wrote contract.json before any lock: two prepares into a new store at once both
    found none, each wrote its own and converted at its own spacing. The contract step now holds a store-wide
    lock: the second, started while the first is writing its contract, waits and is refused in one line."""
    import threading

    from lnfm.data import prepare as prep
    from lnfm.data.cases import CaseSpec
    from lnfm.data.contract import ContractError, read_contract

    store = str(tmp_path / "store")
    cases = [CaseSpec(case_id="a", images=[str(tmp_path / "a.nii.gz")], label=None, site="s")]
    second: dict = {}

    def settle_second():
        try:
            second["contract"] = prep.settle_contract(store, PrepareConfig(spacing=(2.0, 2.0, 2.0)), cases)
        except ContractError as e:
            second["error"] = str(e)

    real_write = prep.write_contract

    def write_while_another_settles(output, contract):  # the first run, about to write: the second one starts
        if "thread" in second:  # the second run's own write (the old code)
            return real_write(output, contract)
        second["thread"] = other = threading.Thread(target=settle_second)
        other.start()
        other.join(timeout=1.0)  # the old code let it read no contract and write its own meanwhile
        real_write(output, contract)

    monkeypatch.setattr(prep, "write_contract", write_while_another_settles)
    first = prep.settle_contract(store, PrepareConfig(spacing=(1.5, 1.5, 1.5)), cases)
    second["thread"].join(timeout=30)
    assert first.spacing == (1.5, 1.5, 1.5) and read_contract(store).spacing == (1.5, 1.5, 1.5)
    assert "contract" not in second and "\n" not in second["error"]
    assert "was prepared with other settings" in second["error"]


# Canaries: text that must not reach failures.jsonl or the log, written into folder and file names and DICOM headers.
CANARY = "CANARY"


def _real_series(shared_data, folder: Path, edit=None, n: int = 3, texts: dict | None = None) -> Path:
    """The first `n` slices of the real series, decompressed, `edit(i, ds)` applied, then each numeric placeholder
    of `texts` replaced by its text of the same length in the files' bytes (pydicom writes no text into a number)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((shared_data / "ct/totalsegmentator/example_ct_dicom").iterdir())[:n]):
        ds = pydicom.dcmread(f)
        ds.decompress()
        if edit is not None:
            edit(i, ds)
        out = folder / f"{CANARY}SLICE_{i:03d}.dcm"
        ds.save_as(out)
        data = out.read_bytes()
        for placeholder, text in (texts or {}).items():
            data = data.replace(placeholder.encode(), text.encode())
        out.write_bytes(data)
    return folder


def _kept(store: Path, caplog) -> str:
    """Everything prepare keeps beyond the console: failures.jsonl (and its parts) and the log."""
    return "".join(p.read_text() for p in store.rglob("failures*.jsonl")) + caplog.text


def test_stored_reasons_and_the_log_name_no_part_of_a_case_path_with_spaces(tmp_path, monkeypatch, caplog):
    """The scrub replaced only words holding a slash: a folder 'CANARY Mary CANARYMIDDLEA Smith' left
    '<path> Mary CANARYMIDDLEA <path>', a bare file name beside the CSV and an NRRD header's data file stayed whole."""
    aff = affine_lps()
    img, _ = phantom()
    spaced = tmp_path / f"{CANARY} Mary {CANARY}MIDDLEA Smith"
    spaced.mkdir()
    (spaced / f"{CANARY}SPACED Doe.nii").write_bytes(b"garbage" * 100)
    (tmp_path / f"{CANARY}FILE_Doe_John_garbage.nii").write_bytes(b"garbage" * 100)
    (tmp_path / "scan.nhdr").write_text("NRRD0004\ntype: int16\ndimension: 3\nspace: right-anterior-superior\n"
                                        "sizes: 4 4 4\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: "
                                        f"(0,0,0)\nendian: little\nencoding: raw\ndata file: ../{CANARY}DATA Doe.raw\n")
    write_csv(tmp_path / "cases.csv", [
        {"case_id": "good", "image": save(tmp_path / "good.nii.gz", img, aff)},
        {"case_id": "spaced", "image": str(spaced / f"{CANARY}SPACED Doe.nii")},
        {"case_id": "bare", "image": f"{CANARY}FILE_Doe_John_garbage.nii"},
        {"case_id": "nhdr", "image": "scan.nhdr"}])
    monkeypatch.chdir(tmp_path)  # the CSV and its files named relative to the current folder, as a user types them
    store = tmp_path / "store"
    res = prepare_dataset("cases.csv", str(store), CFG, show_progress=False)
    assert (res.converted, res.failed) == (1, 3)
    printed = {f["case_id"]: f["reason"] for f in res.failures}  # what the FAILED console lines say
    assert printed["spaced"] == f'unreadable NIfTI (Cannot work out file type of "{spaced}/{CANARY}SPACED Doe.nii")'
    reasons = {f["case_id"]: f["reason"] for f in read_failures(str(store))}
    assert CANARY not in _kept(store, caplog) and "Mary" not in _kept(store, caplog), reasons
    assert reasons["bare"] == reasons["spaced"] == 'unreadable NIfTI (Cannot work out file type of "<path>")'
    assert reasons["nhdr"] == "NRRD 'data file' must lie beside the header, not at '<path>'"


def test_stored_reasons_hold_no_dicom_uid_the_console_line_keeps(shared_data, tmp_path, capsys, caplog):
    """'folder holds 2 DICOM series: 1.2.826...; 1.2.826...' went into failures.jsonl whole."""
    uids = [generate_uid(), generate_uid(), generate_uid()]

    def two_series(i, ds):
        ds.SeriesInstanceUID = uids[i % 2]

    folder = _real_series(shared_data, tmp_path / "scans", two_series, n=4)
    img, _ = phantom()
    table = write_csv(tmp_path / "cases.csv", [{"case_id": "good", "image": save(tmp_path / "g.nii.gz", img,
                                                                                 affine_lps())},
                                               {"case_id": "two", "image": str(folder)}])
    for extra in ([], ["--series", uids[2]]):  # none chosen, or one the folder lacks
        store = tmp_path / f"store{len(extra)}"
        assert main(["--input", str(table), "--output", str(store), "--workers", "0", "salt=s", *extra]) == 1
        failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED ")]
        assert failed == [f"FAILED {folder}: folder holds 2 DICOM series: {uids[0]} (2 file(s)); {uids[1]} (2 "
                          f"file(s)); choose one with --series UID"]  # the user picks one from this line
        assert [f["reason"] for f in read_failures(str(store))] == [
            "folder holds 2 DICOM series: <uid> (2 file(s)); <uid> (2 file(s)); choose one with --series UID"]
        assert not any(uid in _kept(store, caplog) for uid in uids)


def test_a_header_value_that_is_text_is_a_one_line_failure_and_stays_out_of_the_stored_reason(shared_data, tmp_path,
                                                                                             capsys, caplog):
    """A PixelSpacing or ImagePositionPatient holding text was logged as 'unexpected error (a bug)' with a
    traceback; the text of RescaleSlope or PhotometricInterpretation went into failures.jsonl."""
    def header(tag, value):
        def edit(i, ds):
            if i == 1:
                setattr(ds, tag, value(ds))
        return edit

    texts = {"9999999999": f"{CANARY}SPC1", "8888888888": f"{CANARY}SLP1", "77777777777": f"{CANARY}PHOTO"}
    edits = {"spacing": header("PixelSpacing", lambda ds: [ds.PixelSpacing[0], "9999999999"]),
             "position": header("ImagePositionPatient", lambda ds: [*ds.ImagePositionPatient[:2], "9999999999"]),
             "slope": header("RescaleSlope", lambda ds: "8888888888"),
             "photometric": header("PhotometricInterpretation", lambda ds: "77777777777")}
    rows = [{"case_id": name, "image": str(_real_series(shared_data, tmp_path / name, edit, texts=texts))}
            for name, edit in edits.items()]
    store = tmp_path / "store"
    assert main(["--input", str(write_csv(tmp_path / "cases.csv", rows)), "--output", str(store), "--workers", "0",
                 "salt=s"]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out + caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]
    assert f"FAILED {tmp_path / 'spacing'}: file 2 of 3: PixelSpacing holds a value that is not a number" in out
    reasons = {f["case_id"]: f["reason"] for f in read_failures(str(store))}
    assert reasons == {
        "spacing": "file 2 of 3: PixelSpacing holds a value that is not a number",
        "position": "file 2 of 3: ImagePositionPatient holds a value that is not a number",
        "slope": "file 2 of 3: RescaleSlope holds a value that is not a number (a finite number, not 0)",
        "photometric": "file 2 of 3: unreadable DICOM (ValueError: Unknown (0028,0004) 'Photometric Interpretation' "
                       "value <value>)"}
    assert CANARY not in _kept(store, caplog)


def test_a_failure_ref_is_salted_and_the_same_for_one_file_named_from_any_folder(tmp_path, monkeypatch):
    """The ref hashed the path as the CSV's row and the current folder made it: a rerun of the same CSV from another
    folder gave the same file another ref."""
    img, _ = phantom()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 30)
    write_csv(tmp_path / "d" / "cases.csv", [{"case_id": "good", "image": save(tmp_path / "d" / "g.nii.gz", img,
                                                                                affine_lps())},
                                              {"case_id": "bad", "image": "bad.nii.gz"}])
    refs = []
    for cwd, table, salt in ((tmp_path, "d/cases.csv", "a"), (tmp_path / "d", "cases.csv", "a"),
                             (tmp_path, "d/cases.csv", "b")):
        monkeypatch.chdir(cwd)
        store = tmp_path / f"store{len(refs)}"
        assert prepare_dataset(table, str(store), PrepareConfig(workers=0, salt=salt), show_progress=False).failed == 1
        refs += [f["ref"] for f in read_failures(str(store))]
    bad = str(tmp_path / "d" / "bad.nii.gz")
    assert refs == [hashed_id(bad, "a"), hashed_id(bad, "a"), hashed_id(bad, "b")] and refs[0] != refs[2]


def test_a_case_killed_between_its_arrays_and_its_record_is_refused_by_readers_and_redone_by_prepare(tmp_path,
                                                                                                      monkeypatch):
    """prepare writes a case's arrays, then its record. A prepare killed in between left a case folder without a
    record, and every reader (pretrain, finetune and its evaluation, the loader) left the case out without a word.
    Readers now refuse the store in one line naming it and the case; prepare, reading records alone, redoes it."""
    from lnfm.data import prepare as prep
    from lnfm.data.loader import LoaderConfig, make_loader
    from lnfm.data.store import check_stores

    img, lab, csv_path, store, cfg = _two_cases(tmp_path)
    real_write = prep.st.write_record

    def killed_at_b(output, record):
        if record["case_id"] == "b":
            raise KeyboardInterrupt  # as kill -9 would stop it: b's arrays are written, its record is not
        real_write(output, record)

    monkeypatch.setattr(prep.st, "write_record", killed_at_b)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(csv_path, store, cfg, show_progress=False)
    monkeypatch.setattr(prep.st, "write_record", real_write)
    assert (Path(store) / "records/a.json").is_file() and (Path(store) / "cases/b/label/zarr.json").is_file()
    said = (f"^{store}: case b has arrays under cases/b/ but no records/b.json \\(a prepare stopped while converting "
            f"it, or converts it now\\); rerun prepare over the same input to convert it again, or remove the folder "
            f"cases/b$")
    for read in (read_manifest, lambda s: check_stores([s]),
                 lambda s: make_loader([s], LoaderConfig(), split=None, shard_index=0, shard_count=1)):
        with pytest.raises(StoreError, match=said):
            read(store)
    res = prepare_dataset(csv_path, store, cfg, show_progress=False)
    assert (res.converted, res.skipped, res.failed) == (1, 1, 0)
    clean = str(tmp_path / "clean")
    prepare_dataset(csv_path, clean, cfg, show_progress=False)
    assert [r["case_id"] for r in read_manifest(store)] == ["a", "b"]
    for got, want in zip(read_manifest(store), read_manifest(clean)):
        assert all(np.array_equal(x, y) for x, y in zip(read_case(store, got), read_case(clean, want)))


def test_a_scan_or_pet_too_large_for_the_host_is_a_failed_line_from_its_header_none_of_it_read(tmp_path, capsys,
                                                                                                 monkeypatch):
    """A case whose scan (or PET) the host cannot hold was read whole first: a compressed one inflated until the
    kernel killed prepare (exit 137, no message, the batch's other cases with it). Its header's grid refuses it,
    as predict's does, in the case's FAILED line naming the file and the size; the others convert."""
    from scan_bombs import nifti_bomb

    from lnfm.data import prepare as prep
    from lnfm.data import prepare_memory

    monkeypatch.setattr(prepare_memory, "host_memory", lambda: (16 * 1024**3, 16 * 1024**3))
    img, lab = phantom()
    aff = affine_lps()
    huge_ct, huge_pet = nifti_bomb(tmp_path / "huge_ct.nii.gz"), nifti_bomb(tmp_path / "huge_pet.nii.gz")
    read = prep._read3d

    def read_unless_huge(path, series=None):
        if "huge" in str(path):
            pytest.fail(f"{path} was read before its size was checked")
        return read(path, series)

    monkeypatch.setattr(prep, "_read3d", read_unless_huge)
    ct = save(tmp_path / "ct.nii.gz", img, aff)
    pet = save(tmp_path / "pet.nii.gz", (lab * 6.0 + 1.0).astype(np.float32), aff)
    label = save(tmp_path / "lab.nii.gz", lab, aff)
    rows = [{"case_id": "good", "image": ct, "pet": pet, "label": label},
            {"case_id": "bigct", "image": huge_ct, "pet": pet, "label": label},
            {"case_id": "bigpet", "image": ct, "pet": huge_pet, "label": label}]
    store = tmp_path / "store"
    rc = main(["--input", str(write_csv(tmp_path / "cases.csv", rows)), "--output", str(store), "--workers", "0",
               "salt=s", "spacing=[1.5,1.5,1.5]"])
    failed = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED "))
    assert rc == 1 and len(failed) == 2, failed
    for line, path in zip(failed, (huge_ct, huge_pet)):
        assert line.startswith(f"FAILED {path}: converting this case needs about "), line
        assert "(4000x4000x2000 voxels in this file, " in line and line.endswith("more than this host's 16.0 GiB")
    assert [r["case_id"] for r in read_manifest(str(store))] == ["good"]
