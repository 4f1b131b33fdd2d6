"""Self-training (`finetune --unlabelled`): the teacher's pseudo-labels are correct masks of the
right scans, the student trains on them, the time counts every stage, a rerun resumes without
retraining, and unusable unlabelled stores are one-line errors."""

import json

import numpy as np
import pytest
from sphere_cases import TINY_FINETUNE as BASE
from sphere_cases import unlabelled_store

from lnfm.cli import run_job
from lnfm.data.store import read_case, read_manifest
from lnfm.errors import DataError
from lnfm.eval.surface import dice
from lnfm.jobs.export import export_model
from lnfm.jobs.finetune import Splits, load_finetune_config, run, unlabelled_records
from lnfm.runs import FinetuneRun, RepeatRun

def test_teacher_pseudo_labels_then_the_student_trains_on_them(stores, tmp_path):
    labelled, unlabelled, truths = stores
    wd = tmp_path / "st"
    cfg = load_finetune_config("pelvis", BASE, data=[labelled], unlabelled=[unlabelled], num_labeled=2)
    assert run(cfg, wd) == 0
    s = json.loads((wd / "summary.json").read_text())
    info = s["self_training"]
    pseudo = str(RepeatRun(wd).pseudo_labels)
    kept = read_manifest(pseudo)
    assert info["unlabelled"] == 6 and info["pseudo_labelled"] == len(kept) >= 4
    assert s["train_time_s"] == pytest.approx(info["teacher_train_time_s"] + info["pseudo_label_s"]
                                              + info["student_train_time_s"])
    # The repeat keeps the model that validates better; its figures are the summary's, its weights the export's.
    selected = json.loads(RepeatRun(wd).selected.read_text())
    model = "teacher" if info["teacher_best_val_dice"] > info["student_best_val_dice"] else "student"
    assert selected["model"] == info["kept"] == model
    assert s["dice"] == pytest.approx(info[f"{model}_dice"]) and s["best_val_dice"] == info[f"{model}_best_val_dice"]
    assert FinetuneRun(wd).first().root == (wd / "teacher" if model == "teacher" else wd)
    teacher = RepeatRun(wd).teacher
    assert teacher.best_record() is not None and (teacher.root / "summary.json").is_file()
    assert RepeatRun(wd).best_record() is not None and len(s["train_ids"]) == 2
    # Each pseudo-label is the teacher's mask of that very scan on its stored grid: scored against the
    # scan's true spheres (matched by the image itself), it must be a good segmentation.
    scores = []
    for rec in kept:
        image, label = read_case(pseudo, rec)
        truth = [t for img, t in truths if np.array_equal(img, image[..., 0])]
        assert len(truth) == 1 and rec["pseudo_label"]
        scores.append(dice(label > 0, truth[0] > 0))
    print("pseudo-label Dice", np.round(scores, 3), "teacher", info["teacher_dice"], "student", s["dice"])
    assert min(scores) > 0.3 and np.mean(scores) > 0.5, scores
    # The export says how many pseudo-labelled scans the model trained on, and names no store.
    export_model(wd, tmp_path / "export", "orbax")
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    data = meta["training_data"]
    assert data["pseudo_labelled_cases"] == s["pseudo_labelled"] and data["unlabelled_stores"] == 1
    assert s["pseudo_labelled"] == (len(kept) if info["kept"] == "student" else 0)
    assert str(tmp_path) not in json.dumps(meta) and unlabelled not in json.dumps(meta)
    # A rerun finds every stage finished: it retrains nothing and reports the same.
    stamp = (teacher.root / "summary.json").stat().st_mtime_ns
    assert run(cfg, wd) == 0
    assert (teacher.root / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((wd / "summary.json").read_text())["dice"] == pytest.approx(s["dice"])


def test_unlabelled_scans_that_are_held_out_or_already_labelled(stores, tmp_path, capsys):
    labelled, unlabelled, _ = stores
    ids = [r["case_id"] for r in read_manifest(unlabelled)]
    by_id = {r["case_id"]: (unlabelled, r) for r in read_manifest(unlabelled)}
    got = unlabelled_records([unlabelled], by_id, Splits(pool=ids[:2], val=[], test=[]))
    assert [r["case_id"] for _, r in got] == ids[2:]  # labelled training cases keep their real labels
    with pytest.raises(DataError, match=f"training scan {ids[3]} is the test case {ids[3]} of --data"):
        unlabelled_records([unlabelled], by_id, Splits(pool=[], val=[], test=[ids[3]]))
    # Scans are matched by content, not by name: another dataset's case with the same id is a different scan.
    other = read_manifest(labelled)[0]
    renamed = {**by_id, ids[3]: (labelled, {**other, "case_id": ids[3]})}
    got = unlabelled_records([unlabelled], renamed, Splits(pool=[], val=[ids[3]], test=[]))
    assert [r["case_id"] for _, r in got] == ids
    copy = {"held": (labelled, {**by_id[ids[4]][1], "case_id": "held"})}  # the same scan under another name
    with pytest.raises(DataError, match=f"training scan {ids[4]} is the validation case held of --data"):
        unlabelled_records([unlabelled], copy, Splits(pool=[], val=["held"], test=[]))
    # The labelled store itself: its training scans are the labelled pool, so nothing is left to pseudo-label.
    rc = run_job("finetune", ["--site", "pelvis", "--data", labelled, "--unlabelled", labelled, "--init", "scratch",
                              "--workdir", str(tmp_path / "wd"), *BASE])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nothing to pseudo-label" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "wd").exists()


def test_a_resume_after_the_unlabelled_store_was_prepared_again_with_other_scans_is_refused(stores, tmp_path, capsys,
                                                                                           monkeypatch):
    """--unlabelled's content check (content.json) is --paste-into's code, tested end to end here too: a run
    stopped in its teacher's first step, its --unlabelled store removed and prepared again in place from other scans
    under the same case ids, then the same command, is refused in one line naming the store and the case, its
    workdir unchanged (the resume pseudo-labelled the other scans)."""
    import os
    import signal

    from tree_helpers import tree_digest

    import lnfm.jobs.finetune as ft

    labelled, _, _ = stores
    raw, unl, wd = tmp_path / "unl", str(tmp_path / "unlabelled"), tmp_path / "st"
    unlabelled_store(raw, unl, 2, seed=21)
    real = ft.make_train_step

    def stopped(*args, **kwargs):  # SIGTERM in the first step: the loop saves it and returns, a run to resume
        step = real(*args, **kwargs)
        return lambda state, batch: os.kill(os.getpid(), signal.SIGTERM) or step(state, batch)

    monkeypatch.setattr(ft, "make_train_step", stopped)
    argv = ["--site", "pelvis", "--data", labelled, "--unlabelled", unl, "--init", "scratch", "--workdir", str(wd),
            *BASE]
    assert run_job("finetune", argv) == 0 and not (wd / "summary.json").exists()
    assert sorted(json.loads((wd / "content.json").read_text())["unlabelled_1"]) == ["u00", "u01"]
    monkeypatch.setattr(ft, "make_train_step", real)
    unlabelled_store(raw, unl, 2, seed=22)  # other scans under the same file names, so the same case ids
    before = tree_digest(wd)
    capsys.readouterr()
    assert run_job("finetune", argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lnfm finetune: error: {wd / 'content.json'}: the run to resume recorded other content for case u00 (and 1 "
        f"more) of {unl} (prepared again since, from other images or labels): its data changed since it started; "
        f"resume with the data it had, or choose a new --workdir"]
    assert tree_digest(wd) == before
