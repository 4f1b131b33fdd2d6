"""Node paste in the finetuning job (`finetune --paste-into`): a model that sees labelled nodes only
pasted into other scans learns to segment them; the export records it without a path; misuse is a
one-line error before anything is written."""

import json

import pytest
from sphere_cases import TINY_FINETUNE as BASE
from sphere_cases import unlabelled_store

from lnfm.cli import run_job
from lnfm.jobs.export import export_model
from lnfm.jobs.export_meta import read_meta


def test_pasted_nodes_alone_teach_the_task(stores, tmp_path):
    """Every patch is pasted (paste_p=1): the labelled scans are seen only through their nodes, in
    unlabelled scans' fat, scored in a shell around them. The model still segments the test spheres."""
    labelled, unlabelled, _ = stores
    wd = tmp_path / "ft"
    rc = run_job("finetune", ["--site", "pelvis", "--data", labelled, "--paste-into", unlabelled, "--init", "scratch",
                              "--workdir", str(wd), "--num-labeled", "2", *BASE, "loader.paste_p=1.0"])
    assert rc == 0
    s = json.loads((wd / "summary.json").read_text())
    # Learning nothing scores under 0.04 (all background: 0; every voxel a node: about 0.034 here).
    assert s["dice"] > 0.2 and s["node_sensitivity"] > 0, s
    export_model(wd, tmp_path / "exp", "orbax")
    assert read_meta(tmp_path / "exp").training_data["paste_stores"] == 1
    text = (tmp_path / "exp" / "model.json").read_text()
    assert unlabelled not in text and str(tmp_path) not in text


@pytest.mark.parametrize("extra, message", [
    (["--paste-into", "LABELLED"], "nothing to paste into"),
    (["--paste-into", "UNLABELLED", "--unlabelled", "UNLABELLED"], "cannot be combined"),
    (["--paste-into", "UNLABELLED", "loader.paste_p=0"], "loader.paste_p: 0"),
])
def test_misuse_is_one_line_before_the_workdir(stores, tmp_path, capsys, extra, message):
    labelled, unlabelled, _ = stores
    extra = [{"LABELLED": labelled, "UNLABELLED": unlabelled}.get(a, a) for a in extra]
    flags = [a for a in extra if "=" not in a]
    overrides = [a for a in extra if "=" in a]
    rc = run_job("finetune", ["--site", "pelvis", "--data", labelled, "--init", "scratch", *flags,
                              "--workdir", str(tmp_path / "wd"), *BASE, *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "wd").exists()


def test_a_resume_after_the_paste_store_was_prepared_again_with_other_scans_is_refused(stores, tmp_path, capsys):
    """The --paste-into store removed and prepared again in place from other scans under the same case ids: the
    resumed run read them (content.json recorded --data only) and resumed (rc 0). Its cases' content is recorded
    too; a changed one is refused in one line naming the store and the case, nothing written."""

    from override_helpers import once
    from tree_helpers import tree_digest


    labelled, _, _ = stores
    raw, paste, wd = tmp_path / "unl", str(tmp_path / "paste"), tmp_path / "ft"
    unlabelled_store(raw, paste, 4, seed=21)
    base = ["--site", "pelvis", "--data", labelled, "--paste-into", paste, "--init", "scratch", "--workdir", str(wd)]
    tiny = ["train.steps=2", "checkpoint.every=2", "train.eval_every=0", "train.log_every=1"]
    assert run_job("finetune", base + once(BASE, tiny)) == 0
    assert sorted(json.loads((wd / "content.json").read_text())["paste_into_1"]) == ["u00", "u01", "u02", "u03"]
    unlabelled_store(raw, paste, 4, seed=22)  # other scans under the same file names, so the same case ids
    before = tree_digest(wd)
    capsys.readouterr()
    assert run_job("finetune", base + once(BASE, tiny, ["train.steps=4"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lnfm finetune: error: {wd / 'content.json'}: the run to resume recorded other content for case "
                   f"u00 (and 3 more) of {paste} (prepared again since, from other images or labels): its data "
                   f"changed since it started; resume with the data it had, or choose a new --workdir"], err
    assert tree_digest(wd) == before
    # a content.json of an lnfm that recorded --data only: the resume goes on unchecked and records the store now
    record = json.loads((wd / "content.json").read_text())
    recorded = record.pop("paste_into_1")
    (wd / "content.json").write_text(json.dumps(record))
    assert run_job("finetune", base + once(BASE, tiny, ["train.steps=4"])) == 0
    now = json.loads((wd / "content.json").read_text())["paste_into_1"]
    assert sorted(now) == sorted(recorded) and all(now[i] != recorded[i] for i in now)
