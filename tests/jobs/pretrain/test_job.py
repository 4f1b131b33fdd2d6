"""The pretraining job end to end on phantom CT: learning, sharding equivalence, preemption, resume, failures."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from override_helpers import once
from pretrain_helpers import FAST, checkpoint_steps, finish, losses, output, start, wait_for

from lnfm.jobs import pretrain
from lnfm.cli import run_job
from lnfm.data.store import read_manifest
from lnfm.errors import NonFiniteLoss


def test_missing_or_empty_data_fails_before_compiling(tmp_path, capsys):
    assert run_job("pretrain", ["--config", "vit_tiny", "--data", str(tmp_path / "nowhere"),
                                "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere: dataset not found" in err
    (tmp_path / "empty").mkdir()
    assert run_job("pretrain", ["--config", "vit_tiny", "--data", str(tmp_path / "empty"),
                                "--workdir", str(tmp_path / "w")]) == 2
    assert "empty: dataset is empty" in capsys.readouterr().err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_store_given_twice_as_a_link_or_as_a_copy_is_refused_in_one_line(phantom_store, tmp_path, capsys):
    """Each would sample every scan of the store twice as often; finetuning refuses the same."""
    import os
    import shutil

    from tree_helpers import tree_digest

    os.symlink(phantom_store, tmp_path / "link")
    shutil.copytree(phantom_store, tmp_path / "copy")
    before = tree_digest(tmp_path, phantom_store)
    for second in (phantom_store, str(tmp_path / "link"), str(tmp_path / "copy")):
        assert run_job("pretrain", ["--config", "vit_tiny", "--data", f"{phantom_store},{second}",
                                    "--workdir", str(tmp_path / "w")]) == 2, second
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "twice" in err, err
        assert phantom_store in err and second in err, err
        assert tree_digest(tmp_path, phantom_store) == before, second
    assert not (tmp_path / "w").exists()


def test_each_store_is_listed_once_from_the_checks_to_the_loader(phantom_store, tmp_path, monkeypatch):
    """A manifest read lists the store's records/ and every key under its cases/: the two store checks, the
    recorded case ids and the loader each read it (four reads a store); the job reads it once and passes it on."""
    from lnfm.data import store as st

    listed: list[str] = []
    for name in ("_case_folder_ids", "_record_ids"):
        real = getattr(st, name)
        monkeypatch.setattr(st, name, lambda store, real=real: listed.append(store) or real(store))

    class Stop(Exception):
        pass

    real_loader = pretrain.make_loader

    def loader_then_stop(*args, **kwargs):  # the loader is the last reader: stop before training
        real_loader(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(pretrain, "make_loader", loader_then_stop)
    with pytest.raises(Stop):
        run_job("pretrain", ["--config", "vit_tiny", "--data", phantom_store, "--workdir", str(tmp_path / "w"), *FAST])
    assert listed == [phantom_store] * 2, listed  # its records/ and its cases/, once each


def test_fsdp_matches_1_device_learns_and_resumes_exactly_after_kill9_and_sigterm(phantom_store, tmp_path):
    """One test so the four runs overlap: an uninterrupted 8-device FSDP reference, the same on 1
    device, and an 8-device run killed with -9 then resumed and stopped with SIGTERM."""
    args = ["train.steps=40", "checkpoint.every=5"]
    ref_dir, one_dir, run = tmp_path / "ref", tmp_path / "one", tmp_path / "run"
    ref = start(phantom_store, ref_dir, *args, "mesh.fsdp=8", "train.image_every=20", devices=8)
    one = start(phantom_store, one_dir, *args, devices=1)
    # 1) kill -9 once a checkpoint exists and later steps have run
    proc = start(phantom_store, run, *args, "mesh.fsdp=8")
    wait_for(lambda: checkpoint_steps(run) and max(losses(run), default=0) >= checkpoint_steps(run)[-1] + 2,
             proc, run, what="a checkpoint and two more steps")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed_from = checkpoint_steps(run)[-1]
    assert max(losses(run)) > resumed_from  # these rows are dropped and redone on resume
    # 2) resume, then SIGTERM: the current step finishes, a checkpoint is saved, exit 0
    proc = start(phantom_store, run, *args, "mesh.fsdp=8")
    wait_for(lambda: checkpoint_steps(run)[-1] > resumed_from, proc, run, what="a checkpoint after resuming")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, run) == 0, output(run)
    stopped = max(losses(run))
    assert stopped < 40 and checkpoint_steps(run)[-1] == stopped, output(run)
    assert f"resumed from step {resumed_from}" in (run / "log.txt").read_text()
    # 3) the reference learns, logs and previews; 1 device gives the same losses as 8-device FSDP
    assert finish(ref, ref_dir) == 0, output(ref_dir)
    assert finish(one, one_dir) == 0, output(one_dir)
    want, single = losses(ref_dir), losses(one_dir)
    assert sorted(want) == sorted(single) == list(range(1, 41))
    seq = [want[s] for s in sorted(want)]
    assert np.mean(seq[-5:]) < 0.6 * np.mean(seq[:5])  # the MAE loss falls on phantoms
    np.testing.assert_allclose([single[s] for s in sorted(want)], seq, rtol=2e-4)
    assert "'fsdp': 8" in (ref_dir / "log.txt").read_text()
    assert (ref_dir / "images" / "step_40.png").stat().st_size > 1000
    assert checkpoint_steps(ref_dir) == [30, 35, 40]  # keep 3, the last at the end
    check_summary(ref_dir, want, read_manifest(phantom_store)[0]["spacing"])
    assert not (run / "summary.json").exists()  # a preempted run has not finished
    # 4) the interrupted-and-resumed run reproduces the reference (same data order and masks)
    got = losses(run)
    assert sorted(got) == list(range(1, stopped + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], seq[:stopped], rtol=1e-6)


def check_summary(workdir, logged: dict[int, float], store_spacing: list[float]) -> None:
    """summary.json of a finished 40-step run, against metrics.jsonl, config.yaml and the store."""
    summary = json.loads((workdir / "summary.json").read_text())
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert summary["step"] == 40 and summary["steps_run"] == 40 and summary["resumed_from"] is None
    assert summary["loss"] == pytest.approx(logged[40], rel=1e-6)
    assert summary["config_sha256"] == hashlib.sha256((workdir / "config.yaml").read_bytes()).hexdigest()
    assert 0 < summary["fit_time_s"] < summary["wall_time_s"] < 240
    assert summary["steps_per_s"] == pytest.approx(40 / summary["fit_time_s"])
    assert summary["spacing_mm"] == pytest.approx(store_spacing) and summary["channels"] == ["CT"]
    assert summary["hu_window"] == config["data"]["hu_window"] == [-175.0, 250.0]  # vit_tiny.yaml's soft-tissue window
    assert summary["pet_scale"] == config["data"]["pet_scale"]
    assert summary["patch_size"] == config["model"]["img_size"]


def test_summary_of_a_finished_run_started_again_takes_the_logged_loss(tmp_path):
    """No step runs when a finished run is started again: its final loss is the one metrics.jsonl logged."""
    from lnfm.data.contract import Normalization, PrepareContract, Preprocessing
    from lnfm.train.loop import LoopResult

    (tmp_path / "metrics.jsonl").write_text('{"step": 39, "loss": 0.5}\n{"step": 40, "loss": 0.25}\n')
    contract = PrepareContract(version=2, spacing=None, orientation="RAS", crop_body=True, body_threshold_hu=-500.0,
                               channels=("CT", "PET"), ct_storage="int16", label_map={}, resample_channels=True)
    prep = Preprocessing(contract, Normalization((-1000.0, 1000.0), 10.0), (64, 64, 32))
    summary = pretrain.pretrain_summary(prep, LoopResult(None, 40, False, {}), 40, 3.0, tmp_path)
    assert summary == {"step": 40, "loss": 0.25, "resumed_from": 40, "steps_run": 0, "fit_time_s": 3.0,
                       "steps_per_s": None, "spacing_mm": None, "channels": ("CT", "PET"),
                       "hu_window": (-1000.0, 1000.0), "pet_scale": 10.0, "patch_size": (64, 64, 32)}


def test_nan_loss_exits_3_with_the_message(phantom_store, tmp_path, capsys, monkeypatch):
    def diverge(*args, **kwargs):
        raise NonFiniteLoss("loss is nan at step 7; stopping (the last good checkpoint is kept)")

    monkeypatch.setattr(pretrain, "run", diverge)  # the loop itself is tested in tests/train/test_loop.py
    assert run_job("pretrain", ["--config", "vit_tiny", "--data", phantom_store, "--workdir", str(tmp_path)]) == 3
    assert "lnfm pretrain: error: loss is nan at step 7" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    ("train.global_batch=6", "multiple of the 8 batch shards"),
    ("data.weights=[1,2]", "data.weights has 2 values for 1 datasets"),
    ("data.spacing=[1.0,1.0,1.0]", "4 of 4 cases are not at data.spacing=[1.0, 1.0, 1.0] mm"),
    ("data.split=val", "no cases in split 'val'"),
    ("optim.ema_decay=0.99", "the moving average applies to finetuning only")])
def test_config_errors_are_one_line(phantom_store, tmp_path, capsys, bad, message):
    assert run_job("pretrain", ["--config", "vit_tiny", "--data", phantom_store, "--workdir", str(tmp_path / "w"),
                                bad]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_partial_multiprocess_flags_are_one_line_errors(tmp_path, capsys):
    args = ["--config", "vit_tiny", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"), "--num-processes", "2"]
    assert run_job("pretrain", args) == 2
    assert "must be given together" in capsys.readouterr().err


def test_workdir_apart_from_data_and_a_refused_resume_writes_nothing(phantom_store, tmp_path, capsys):
    from pathlib import Path

    from tree_helpers import tree_digest

    from lnfm.jobs.pretrain import load_pretrain_config
    from lnfm.workdir import open_workdir

    wd = tmp_path / "wd"
    open_workdir(wd, load_pretrain_config("vit_tiny", ["model.depth=2"])).close()
    (wd / "checkpoints" / "5").mkdir(parents=True)  # a run to resume
    cases = {
        "in_data": (["--data", phantom_store, "--workdir", str(Path(phantom_store) / "run")],
                    "--workdir lies inside --data"),
        "is_data": (["--data", phantom_store, "--workdir", phantom_store], "--workdir is --data"),
        "other_model": (["--data", phantom_store, "--workdir", str(wd), "model.depth=3"], "model.depth=2 (new: 3)"),
    }
    before = tree_digest(tmp_path, phantom_store)
    for name, (args, reason) in cases.items():
        capsys.readouterr()
        assert run_job("pretrain", ["--config", "vit_tiny", *args]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], (name, err)
        assert tree_digest(tmp_path, phantom_store) == before, name


def test_a_resume_that_changes_how_the_run_trains_is_refused_and_the_record_holds_what_ran(phantom_store, tmp_path,
                                                                                           capsys):
    """config.yaml records the patch and batch the loader read (not the loader section's defaults); a resume
    with another learning rate, augmentation or global batch is refused in one line with nothing written
    (it had resumed and rewritten the record, or failed the restore after rewriting it); more steps resume."""
    from tree_helpers import tree_digest

    wd = tmp_path / "wd"
    args = ["--config", "vit_tiny", "--data", phantom_store, "--workdir", str(wd), "data.workers=0",
            "train.global_batch=8", "train.steps=2", "checkpoint.every=1"]
    assert run_job("pretrain", args) == 0
    recorded = yaml.safe_load((wd / "config.yaml").read_text())
    assert recorded["data"]["patch_size"] == recorded["model"]["img_size"] == [32, 32, 32]
    assert recorded["data"]["batch_size"] == 8  # one process: the whole global batch
    before = tree_digest(wd)
    for extra, says in [("optim.lr=0.5", "optim.lr=0.001 (new: 0.5)"), ("data.flips=false", "data.flips=true (new: "
                                                                                          "false)"),
                        ("train.global_batch=16", "train.global_batch=8 (new: 16)")]:
        capsys.readouterr()
        assert run_job("pretrain", once(args, [extra])) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"the run to resume has {says}" in err[0], (extra, err)
        assert tree_digest(wd) == before, extra
    # Other data under the same settings: the loader's saved position would continue in another dataset
    # (it resumed, exit 0). The run records each store's cases (data.json); a store that lost one is refused.
    import shutil

    from lnfm.data import store as st

    other = shutil.copytree(phantom_store, tmp_path / "other")
    first = sorted((other / "records").iterdir())[0]
    first.unlink()
    shutil.rmtree(other / "cases" / first.stem)  # a case folder without its record is refused on its own
    st.write_manifest(str(other))
    capsys.readouterr()
    assert run_job("pretrain", [a if a != phantom_store else str(other) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{wd / 'data.json'}: the run to resume recorded other data (store_1 " in err[0], err
    assert tree_digest(wd) == before
    assert run_job("pretrain", once(args, ["train.steps=3"])) == 0
    assert "resumed from step 2" in (wd / "log.txt").read_text()


@pytest.fixture(scope="module")
def two_step_run(phantom_store, tmp_path_factory):
    """A finished pretraining run of 2 steps, a checkpoint at each, and `argv(workdir, *overrides)`, the command
    that made it; tests resume copies of it."""
    def argv(wd, *extra):
        return ["--config", "vit_tiny", "--data", phantom_store, "--workdir", str(wd),
                *once(["data.workers=0", "train.global_batch=8", "model.depth=2", "train.image_every=0",
                       "train.steps=2", "checkpoint.every=1"], extra)]

    wd = tmp_path_factory.mktemp("two_steps") / "wd"
    assert run_job("pretrain", argv(wd)) == 0
    return wd, argv


def _copy_run(two_step_run, tmp_path):
    import shutil

    wd, argv = two_step_run
    return shutil.copytree(wd, tmp_path / "wd"), argv


def test_a_resume_with_fewer_steps_than_the_run_reached_is_refused_and_writes_nothing(two_step_run, tmp_path,
                                                                                        capsys):
    """It resumed at step 2, trained nothing and exited 0 with config.yaml saying train.steps=1. A resume
    lengthens a run, never shortens it: one line, nothing written; as many steps as it reached resume."""
    from tree_helpers import tree_digest

    wd, argv = _copy_run(two_step_run, tmp_path)
    before = tree_digest(wd)
    capsys.readouterr()
    assert run_job("pretrain", argv(wd, "train.steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lnfm pretrain: error: {wd}: the run to resume has reached step 2, beyond train.steps=1; a "
                   f"resumed run may lengthen a run, not shorten it: give train.steps=2 or more, or choose a new "
                   f"--workdir"], err
    assert tree_digest(wd) == before
    assert run_job("pretrain", argv(wd)) == 0  # the finished run started again


def test_a_resume_over_a_store_prepared_again_with_other_images_under_the_same_ids_is_refused(two_step_run, tmp_path,
                                                                                               capsys):
    """The store prepared again from other images (+300 HU above 0 HU) under the same case ids: data.json,
    which records only ids, matched, and the run resumed on the new images (rc 0). The run records each case's
    content fingerprint (content.json); a changed case is refused in one line naming the store and the case,
    nothing written. A run from before content.json resumes unchecked and records it."""
    import shutil

    import nibabel as nib
    from tree_helpers import tree_digest

    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    wd, argv = _copy_run(two_step_run, tmp_path)
    phantom_store = argv(wd)[argv(wd).index("--data") + 1]
    raw = shutil.copytree(Path(phantom_store).parent / "raw", tmp_path / "raw")
    for path in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.int16)
        nib.save(nib.Nifti1Image(np.where(data > 0, data + 300, data).astype(np.int16), img.affine), path)
    other = str(tmp_path / "other")
    assert prepare_dataset(str(raw), other, PrepareConfig(workers=0, salt="test", spacing=(1.5, 1.5, 1.5)),
                           show_progress=False).ok
    ids = sorted(r["case_id"] for r in read_manifest(other))
    assert ids == sorted(r["case_id"] for r in read_manifest(phantom_store))
    before = tree_digest(wd)
    capsys.readouterr()
    resume = [a if a != phantom_store else other for a in argv(wd, "train.steps=3")]
    assert run_job("pretrain", resume) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lnfm pretrain: error: {wd / 'content.json'}: the run to resume recorded other content for case "
                   f"{ids[0]} (and {len(ids) - 1} more) of {other} (prepared again since, from other images or "
                   f"labels): its data changed since it started; resume with the data it had, or choose a new "
                   f"--workdir"], err
    assert tree_digest(wd) == before
    recorded = json.loads((wd / "content.json").read_text())
    assert sorted(recorded["store_1"]) == ids
    (wd / "content.json").unlink()  # a run started before the record: resumed, and recorded from now on
    assert run_job("pretrain", resume) == 0
    assert "resumed from step 2" in (wd / "log.txt").read_text()
    now = json.loads((wd / "content.json").read_text())["store_1"]
    assert sorted(now) == ids and all(now[i] != recorded["store_1"][i] for i in ids)


def test_a_failed_restore_leaves_config_yaml_as_it_was(two_step_run, tmp_path, capsys):
    """A resume that may change train.steps, whose checkpoints all fail to restore (here: corrupt), stops in
    one line; it had rewritten config.yaml with the new train.steps first, for a run that never resumed."""
    wd, argv = _copy_run(two_step_run, tmp_path)
    for step in (1, 2):
        (wd / "checkpoints" / str(step) / "state" / "_METADATA").write_text("garbage")
    config = (wd / "config.yaml").read_bytes()
    capsys.readouterr()
    assert run_job("pretrain", argv(wd, "train.steps=4")) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert len(err) == 1 and "checkpoints: no checkpoint could be restored" in err[0], err
    assert (wd / "config.yaml").read_bytes() == config


def test_a_preview_is_written_whole_and_a_killed_runs_temporaries_go(tmp_path, monkeypatch):
    """The preview PNG was written to a fixed `.step_N.png.tmp` by hand: a full disk or a kill left it, and
    nothing removed it. It goes through temp_file now, and each write clears what a killed run left."""
    import errno
    from pathlib import Path

    images = tmp_path / "images"
    images.mkdir()
    (images / "step_10.png").write_bytes(b"preview 10")
    for name in (".step_20.png.tmp", ".step_20.png.tmp123-0123abcd"):  # the earlier fixed name; a killed temp_file
        (images / name).write_bytes(b"half")
    pretrain.write_preview(images / "step_30.png", b"preview 30")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == {"step_10.png": b"preview 10",
                                                                 "step_30.png": b"preview 30"}

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        pretrain.write_preview(images / "step_30.png", b"preview 30, again")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == {"step_10.png": b"preview 10",
                                                                 "step_30.png": b"preview 30"}
