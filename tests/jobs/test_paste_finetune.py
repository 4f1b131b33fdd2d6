"""Node paste in the finetuning job (`finetune --paste-into`): a model that sees labelled nodes only
pasted into other scans learns to segment them; the export records it without a path; misuse is a
one-line error before anything is written."""

import json

import pytest
from sphere_cases import TINY_FINETUNE as BASE

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
