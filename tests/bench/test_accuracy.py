"""bench/accuracy.py: a smoke run of every arm that checks the report is written (it asserts
nothing about accuracy)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow
def test_smoke_run_of_every_arm_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    base = [sys.executable, str(REPO / "bench" / "accuracy.py"), "--smoke", "--workdir", str(tmp_path / "wd"),
            "--out", str(out)]
    # First every arm but one peer; the extension below adds it, as a user extends a finished run.
    proc = subprocess.run(base + ["--peers", "unet,dynunet"], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    lnfm = {("lnfm_pretrained", "both"), ("lnfm_scratch", "both"), ("lnfm_paste", "both"),
            ("lnfm_paste_target", "both")}
    assert {(r["arm"], r["budget"]) for r in rows} == lnfm | {
        (p, b) for p in ("unet", "dynunet") for b in ("patches", "time")}
    assert "- resumed " not in (out / "accuracy.md").read_text()

    # Extending the finished run (all peers) computes only the new peer's arms, and the report names the
    # extension; a rerun that computes nothing adds no such line.
    for _ in range(2):
        proc = subprocess.run(base, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done in") == 0, "a rerun of a finished run computed an arm again"
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    arms = {(r["arm"], r["budget"]) for r in rows}
    assert arms == lnfm | {(p, b) for p in ("unet", "dynunet", "swinunetr") for b in ("patches", "time")}
    assert all(r["test_volumes"] == "1" and r["dice"] != "" and r["num_labeled"] == "1" for r in rows)
    md = (out / "accuracy.md").read_text()
    assert md.count("- resumed ") == 1 and "`python bench/accuracy.py --smoke` (arms not finished" in md
    assert "- command: `python bench/accuracy.py --smoke --peers unet,dynunet`" in md  # the run's first command
    assert "Paired differences" in md and "lnfm_pretrained - dynunet (time)" in md
    assert "lnfm_pretrained - swinunetr (time)" in md and "lnfm_paste - lnfm_pretrained" in md
    assert "lnfm_paste_target - lnfm_paste" in md
    # A peer on lnfm_paste's loader (nodes pasted into the pool, ignored voxels out of its loss) extends it too.
    proc = subprocess.run(base + ["--arms", "lnfm_paste", "--peers", "unet,unet_paste"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done in") == 2  # its two budgets, nothing else
    md = (out / "accuracy.md").read_text()
    assert "unet_paste (time) - unet (time)" in md and "lnfm_paste - unet_paste (time)" in md
    for png in ("accuracy_dice_vs_labelled.png", "accuracy_dice_vs_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "accuracy_cases.csv").is_file()


def test_an_unknown_peer_is_refused_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--smoke", "--out", str(tmp_path / "o"),
                           "--workdir", str(tmp_path / "w"), "--peers", "unet,unetx"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--peers: choose from unet, dynunet, swinunetr, unet_paste, dynunet_paste, swinunetr_paste" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_a_workdir_of_another_recipe_is_refused_before_any_work(tmp_path):
    """Cached arms of another finetuning recipe (a changed `finetune --quick`) would mix with new ones."""
    import json

    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "header.json").write_text(json.dumps({"date": "d", "machine": "m", "commit": "c",
                                                "recipe": ["train.steps=1"]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--preset", "cpu", "--out",
                           str(tmp_path / "o"), "--workdir", str(wd)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "another finetuning recipe" in proc.stderr, proc.stderr
    assert sorted(p.name for p in wd.iterdir()) == ["header.json"]


def test_a_finished_run_is_reused_only_for_the_same_config(tmp_path):
    import accuracy as A
    from lnfm.config import dump_yaml
    from lnfm.jobs import finetune as F

    cfg = F.load_finetune_config("pelvis", [], quick=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "config.yaml").write_text(dump_yaml(F.load_finetune_config("pelvis", ["optim.ema_decay=0"], quick=True)))
    with pytest.raises(SystemExit, match=r"optim.ema_decay=0.0 \(new: 0.998\)"):
        A.finetune_and_export(cfg, run_dir)
