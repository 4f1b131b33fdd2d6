"""Acceptance test of the preprocessing contract: a store kept at native anisotropic spacing
(0.8 x 0.8 x 2.5 mm phantoms) -> finetune -> export -> predict on the raw scan of a test case.
predict's mask must be the finetuning job's own evaluation mask of that case, and the
metrics in summary.json must be those of that mask."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lnfm.cli import run_job
from lnfm.data.contract import read_contract
from lnfm.data.geometry import restore_to_source
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.store import read_case, read_manifest
from lnfm.data.synth import SynthConfig, write_dataset
from lnfm.eval.metrics import evaluate_case
from lnfm.eval.surface import dice
from lnfm.jobs import finetune as ft
from lnfm.jobs.export import export_model, read_meta

NATIVE = (0.8, 0.8, 2.5)
TINY = ["site.patch=[16,16,16]", "model.img_size=[16,16,16]", "model.patch_size=[8,8,8]", "model.depth=1",
        "model.width=32", "model.heads=2", "train.global_batch=8", "train.steps=2", "train.eval_every=0",
        "head.kind=linear", "strategy.freeze=none", "checkpoint.every=0", "inference.sw_batch_size=8",
        "inference.overlap=0.25", "optim.warmup_steps=0", "postprocess.min_volume_mm3=0"]
# Node-centred patches, 4^3 tokens and a recall-weighted loss: ten steps give partial, ragged
# masks (about 0.5-6% of voxels), every voxel of which must agree between the two paths.
LEARN = ["loader.fg_fraction=1.0", "model.patch_size=[4,4,4]", "loss.name=tversky", "train.steps=10",
         "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def native_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    write_dataset(SynthConfig(site="pelvis", num_cases=4, seed=5, shape=(56, 56, 20), gallery=False,
                              use_real_shapes=False, spacing_inplane=(NATIVE[0], NATIVE[0]),
                              slice_thickness=(NATIVE[2], NATIVE[2]), nodes_per_case=(2, 3),
                              short_axis_mm=(8.0, 12.0)), root / "raw")
    store = str(root / "store")
    res = prepare_dataset(str(root / "raw"), store, PrepareConfig(workers=0, salt="t", split_fractions=(0.5, 0.0, 0.5)),
                          show_progress=False)
    assert res.ok, res.failures
    return root / "raw", store


def test_finetune_refuses_a_store_at_another_spacing_than_the_preset(native_store, tmp_path, capsys):
    _, store = native_store
    wd = tmp_path / "wd"
    argv = ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd), *TINY]
    rc = run_job("finetune", argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert store in err and "--spacing 1.5,1.5,1.5" in err and "[0.8, 0.8, 2.5]" in err
    assert not wd.exists()  # refused before anything was written


def test_predict_on_the_raw_scan_equals_finetunings_own_evaluation(native_store, tmp_path):
    raw, store = native_store
    assert read_contract(store).spacing is None  # native: prepare kept each case's spacing
    records = {r["case_id"]: r for r in read_manifest(store)}
    assert all(np.allclose(r["spacing"], NATIVE, rtol=1e-5) for r in records.values())
    tests = [cid for cid, r in records.items() if r["split"] == "test"]
    assert tests and len(records) - len(tests) >= 2

    wd = tmp_path / "ft"
    cfg = ft.load_finetune_config("pelvis", TINY + LEARN + [f"site.spacing=[{NATIVE[0]},{NATIVE[1]},{NATIVE[2]}]"],
                                  data=[store])
    assert ft.run(cfg, wd) == 0
    summary = json.loads((wd / "summary.json").read_text())
    out = export_model(wd, tmp_path / "export", "orbax")
    meta = read_meta(out)
    # model.json holds what training used: the store's spacing and the window it normalised with.
    assert meta.preprocessing.contract.spacing == pytest.approx(NATIVE)
    assert meta.preprocessing.normalization.hu_window == tuple(cfg.site.window)
    assert meta.preprocessing.contract.crop_body and meta.postprocess.min_volume_mm3 == 0.0

    for cid in tests:
        rec = records[cid]
        own = np.asarray(nib.load(wd / "test_masks" / f"{cid}.nii.gz").dataobj)
        # summary.json scores exactly the saved evaluation mask.
        _, label = read_case(store, rec)
        row = next(c for c in summary["cases"] if c["case_id"] == cid)
        assert row["dice"] == pytest.approx(evaluate_case(own > 0, label > 0, rec["spacing"])["dice"], abs=1e-9)

        scan = raw / "imagesTr" / f"{cid}_0000.nii.gz"
        mask = tmp_path / f"{cid}.nii.gz"
        assert run_job("predict", ["--model", str(out), "--input", str(scan), "--output", str(mask)]) == 0
        got = np.asarray(nib.load(mask).dataobj)
        expected = restore_to_source(own, rec, order=0)
        assert got.shape == nib.load(scan).shape and 0.001 < (expected > 0).mean() < 0.9
        assert dice(got > 0, expected > 0) >= 0.999
