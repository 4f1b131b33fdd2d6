"""`make demo`: its data split (what pretraining, node paste, finetuning and the test each see), and the
whole demo at toy sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lnfm.data.store import read_manifest
from lnfm.eval.report import read_report
from lnfm.jobs.demo import demo_rows

REPO = Path(__file__).resolve().parents[2]


def _phantoms(folder, names):
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"cases": [{"case": n} for n in names]}))
    return folder


def test_validation_phantoms_are_out_of_the_pools_training_split(tmp_path):
    phantoms = _phantoms(tmp_path / "p", [f"pelvis_{i:03d}" for i in range(6)])
    heldout = _phantoms(tmp_path / "h", ["pelvis_000", "pelvis_001"])
    pool, labelled, test = demo_rows(phantoms, heldout, labelled=2)
    assert [(r[0], r[3]) for r in labelled] == [("p_pelvis_000", "train"), ("p_pelvis_001", "train"),
                                                ("p_pelvis_004", "val"), ("p_pelvis_005", "val")]
    # Every phantom is in the pool, the validation ones in its val split; those the labelled store does not
    # hold (002, 003) are what node paste can paste into.
    assert [(r[0], r[3]) for r in pool] == [("p_pelvis_000", "train"), ("p_pelvis_001", "train"),
                                            ("p_pelvis_002", "train"), ("p_pelvis_003", "train"),
                                            ("p_pelvis_004", "val"), ("p_pelvis_005", "val")]
    assert all(r[2] == "" for r in pool) and all(r[2].endswith("labelsTr/" + r[0][2:] + ".nii.gz") for r in labelled)
    assert [(r[0], r[3]) for r in test] == [("h_pelvis_000", "test"), ("h_pelvis_001", "test")]
    assert not {r[1] for r in test} & {r[1] for r in pool}  # no held-out scan reaches pretraining or paste


@pytest.mark.slow
@pytest.mark.shared  # real CT joins the pool when ../shared/data exists: run with and without it
def test_the_demo_runs_end_to_end_and_scores_lnfm_beside_the_unets(tmp_path):
    """`make demo`'s command at toy sizes: every stage runs as a user's command, the prediction and its
    report are written, and the last lines score LNFM, the U-Net and the U-Net with node paste on the same
    held-out volumes."""
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")  # one CPU device, as for a user (not the suite's 8)
    proc = subprocess.run([sys.executable, "-m", "lnfm", "demo", "--out", str(out), "--cases", "5",
                           "--labelled", "2", "--test", "1", "--pretrain-steps", "2", "--steps", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = out / "predict"
    mask = nib.load(pred / "h_pelvis_000_mask.nii.gz")
    scan = nib.load(out / "phantoms_heldout" / "imagesTr" / "pelvis_000_0000.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    # One report row per 26-connected component of the written mask (scipy counts them independently).
    _, components = ndimage.label(np.asarray(mask.dataobj) > 0, structure=np.ones((3, 3, 3), bool))
    assert len(read_report(pred / "h_pelvis_000_nodes.csv")) == components
    assert (pred / "h_pelvis_000_preview.png").read_bytes()[:4] == b"\x89PNG"
    # The CSVs name the demo's own phantoms relative to the folder: it can be moved whole, and shows no home path.
    for csv in ("labelled.csv", "unlabelled.csv"):
        assert str(tmp_path) not in (out / csv).read_text()
    lines = proc.stdout.splitlines()
    scored = [(m.group(1), ln) for ln in lines
              if (m := re.match(r"(LNFM|U-Net \+ paste|U-Net) +Dice \d\.\d{3}, node sensitivity", ln))]
    assert [name for name, _ in scored] == ["LNFM", "U-Net", "U-Net + paste"], proc.stdout[-2000:]
    assert all("1 held-out volumes" in ln for _, ln in scored)
    steps = {name: int(re.search(r", (\d+) steps,", ln).group(1)) for name, ln in scored}
    assert steps["LNFM"] == 3 and steps["U-Net"] >= 1 and steps["U-Net + paste"] >= 1, steps
    assert json.loads((out / ".lnfm-demo.json").read_text()) == {"cases": 5, "labelled": 2, "test": 1,
                                                                 "pretrain_steps": 2, "steps": 3, "no_paste": False}
    # Pretraining's store holds the training phantoms and never a held-out scan.
    ids = {r["case_id"] for r in read_manifest(str(out / "store_unlabelled"))}
    assert ids and not any(i.startswith("h_") for i in ids)


def test_a_rerun_with_other_settings_is_refused_before_any_stage(tmp_path, capsys):
    """A demo folder records its settings (.lnfm-demo.json); another --cases into it stopped at synth's refusal,
    whose --force the demo does not take. Now one line names the differences and nothing is written."""
    from tree_helpers import tree_digest

    from lnfm.cli import run_job

    out = tmp_path / "demo"
    (out / "phantoms_pelvis").mkdir(parents=True)  # a stage's output of the earlier run
    (out / ".lnfm-demo.json").write_text(json.dumps({"cases": 16, "labelled": 4, "test": 4, "pretrain_steps": 300,
                                                     "steps": 600, "no_paste": False}))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    try:
        rc = run_job("demo", ["--out", str(out), "--cases", "18", "--no-paste"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"lnfm demo: error: {out}: holds a demo run with other settings (--cases: 16 there, 18 now; --no-paste: "
        f"false there, true now): rerun with those, choose another --out, or remove the folder to start over"]
    assert tree_digest(tmp_path) == before


def test_an_out_that_is_no_demo_folder_is_refused_before_any_stage(tmp_path, capsys):
    """--out on a user's folder replaced their labelled.csv and unlabelled.csv; a file, a path below one and a
    link to nothing were tracebacks or a demo run into wherever the link pointed; --test 0 failed after the first
    stage and was recorded, so the corrected rerun was refused. Each is one line now, and nothing is written."""
    from tree_helpers import tree_digest

    from lnfm.cli import run_job

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "labelled.csv").write_text("precious\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [(["--out", str(tmp_path / "mine")], "holds files and no demo run"),
             (["--out", str(tmp_path / "afile")], "exists and is not a folder"),
             (["--out", str(tmp_path / "afile" / "sub")], "exists and is not a folder"),
             (["--out", str(tmp_path / "dangling")], "which does not exist"),
             (["--out", str(tmp_path / "new"), "--test", "0"], "--test must be at least 1, got 0"),
             (["--out", str(tmp_path / "new"), "--pretrain-steps", "0"], "--pretrain-steps must be at least 1")]
    before = tree_digest(tmp_path)
    for argv, says in cases:
        capsys.readouterr()
        try:
            rc = run_job("demo", argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and says in err[-1], (argv, err)
        assert tree_digest(tmp_path) == before, argv
