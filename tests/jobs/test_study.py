"""The transfer study's bookkeeping: presets, cell grid, aggregation, table and plots."""

import csv
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lnfm.jobs import study as S
from lnfm.workdir import atomic_write_csv
from lnfm.config import ConfigError, load_config


def _summary(dices, sens, params=1000):
    return {"repeats": [{"repeat": i, "dice": d, "node_sensitivity": s, "hd95": 3.0 + i, "nsd": 0.5,
                         "fp_per_volume": 1.0, "trainable_params": params, "total_params": 5000,
                         "train_time_s": 10.0 + i} for i, (d, s) in enumerate(zip(dices, sens))]}


def test_presets_load_and_grid_covers_every_cell():
    quick = load_config(S.StudyConfig, "quick", kind="study")
    full = load_config(S.StudyConfig, "full", kind="study")
    for cfg in (quick, full):
        S.check(cfg)
        assert cfg.repeats >= 5 and set(cfg.inits) == {"scratch", "pretrained"}
        # Pretraining has a pool of its own, larger than any labelled set; the test phantoms are held out.
        assert cfg.unlabelled > max(cfg.num_labeled) and cfg.test >= 8
    # The full (GPU) preset is the whole grid; the quick (CPU) one a slice of it with
    # every strategy, the light head, and the curve's two ends and middle.
    assert full.num_labeled == [1, 2, 4, 8, 16] and set(full.strategies) == set(S.STRATEGIES)
    assert set(full.heads) == {"unetr", "light"} and not full.quick
    assert quick.quick and quick.num_labeled == [1, 4, 16] and quick.heads == ["fine"]
    assert set(quick.strategies) == set(S.STRATEGIES)
    for cfg, n in ((full, 2 * 4 * 2 * 5), (quick, 2 * 4 * 1 * 3)):  # init x strategy x head x labelled
        grid = S.cells(cfg)
        assert len(grid) == n and len({tuple(c.values()) for c in grid}) == n


def test_invalid_study_config_is_rejected():
    with pytest.raises(ConfigError, match="unknown strategy 'frozen'"):
        S.check(S.StudyConfig(strategies=["frozen"]))
    with pytest.raises(ConfigError, match="unknown head"):
        S.check(S.StudyConfig(heads=["big"]))
    with pytest.raises(ConfigError, match="the labelled pool has 4"):
        S.check(S.StudyConfig(labelled=4, num_labeled=[1, 8]))


@pytest.mark.parametrize("changes, message", [
    # an empty list left no cell (a matplotlib traceback after the data was built)
    ({"strategies": []}, "strategies: the list is empty; give at least one of freeze_all, first_k, full_llrd, lora"),
    ({"heads": []}, "heads: the list is empty; give at least one of unetr, light, fine, linear"),
    ({"inits": []}, "inits: the list is empty; give at least one of scratch, pretrained"),
    ({"num_labeled": []}, "num_labeled: the list is empty; give at least one number of labelled cases"),
    # a value listed twice ran one cell twice, reported as twice the repeats
    ({"num_labeled": [1, 4, 1]}, "num_labeled: 1 is listed 2 times; list each value once (repeats sets the runs "
                                 "per cell)"),
    ({"inits": ["scratch", "scratch"]}, "inits: scratch is listed 2 times"),
    ({"num_labeled": [0, 1]}, "num_labeled: 0 must be at least 1 (labelled training cases)"),
    ({"repeats": 0}, "repeats must be at least 1, got 0"),
    ({"unlabelled": 0}, "unlabelled must be at least 1 (phantoms of the pretraining pool, built whatever the inits), "
                        "got 0"),
    ({"val": -1}, "val must be at least 1 (validation phantoms; with none, finetuning would validate on part of the "
                  "labelled pool), got -1"),
    ({"val": 0}, "val must be at least 1"),
    ({"test": 0}, "test must be at least 1 (held-out test phantoms every cell is scored on), got 0"),
    ({"labelled": 0, "num_labeled": [1]}, "labelled must be at least 1 (phantoms the few-shot subsets are drawn "
                                          "from), got 0"),
    ({"shape": (-5, 32, 32)}, "shape: [-5, 32, 32] is not a phantom grid synth makes (--shape wants X,Y,Z with each "
                              ">= 16, got '-5,32,32')"),
    ({"shape": (15, 32, 32)}, "shape: [15, 32, 32] is not a phantom grid synth makes"),
    ({"spacing": (1.5, -1.5, 1.5)}, "spacing: [1.5, -1.5, 1.5] is not a voxel size"),
    ({"spacing": (2.0, 2.0, 2.0)}, "spacing [2.0, 2.0, 2.0] differs from the site.spacing [1.5, 1.5, 1.5] finetuning "
                                   "uses (site pelvis): every cell would refuse the data; make them equal "
                                   "(site.spacing in finetune_overrides)"),
    ({"site": "knee"}, "site: unknown site 'knee' (choices: head_neck, axilla, mediastinum, abdomen, pelvis)"),
    ({"pretrain_config": "vit_nope"}, "pretrain_config: unknown pretrain config 'vit_nope'; did you mean 'vit_tiny'?"),
    ({"pretrain_overrides": ["model.size=huge9"]}, "pretrain_config / pretrain_overrides: model.size: 'huge9'"),
    ({"pretrain_overrides": ["train.steps=0"]}, "pretrain_config / pretrain_overrides: train.steps must be at least 1"),
    ({"pretrain_overrides": ["model.img_size=[8,8,8]"]},
     "pretrain_config / pretrain_overrides: model.img_size [8, 8, 8] holds 1 token(s)"),
    ({"finetune_overrides": ["train.steps=0"]}, "finetune_overrides (strategy freeze_all, head unetr): train.steps "
                                                "must be at least 1"),
    ({"finetune_overrides": ["head.knd=light"]}, "finetune_overrides (strategy freeze_all, head unetr): unknown config "
                                                 "key 'head.knd'"),
    # the finetune / pretrain CLIs refuse a key given twice: a study cell would fail after the data was made
    ({"finetune_overrides": ["train.steps=2", "train.steps=3"]},
     "finetune_overrides: train.steps: given twice as an override; give it once"),
    ({"pretrain_overrides": ["train.steps=2", "train.steps=3"]},
     "pretrain_overrides: train.steps: given twice as an override; give it once"),
    ({"finetune_overrides": ["train.steps=2", "train={steps: 3}"]},
     "finetune_overrides: train.steps: given twice as an override; give it once"),
    ({"finetune_overrides": ["head.options.b=2", "head.options={}"]},
     "finetune_overrides: head.options: given whole and as head.options.b among the overrides; give it once"),
    # a key each cell sets: the cell replaced it without a word (study.md recorded it as given), or its
    # finetune refused it after the data (and the pretraining) were made
    ({"finetune_overrides": ["head.kind=light"]}, "finetune_overrides: head.kind is set in each cell by the study's "
                                                  "heads; drop it from finetune_overrides"),
    ({"finetune_overrides": ["head={kind: light}"]}, "finetune_overrides: head.kind is set in each cell by the"),
    ({"finetune_overrides": ["strategy.freeze=none"]}, "finetune_overrides: strategy.freeze is set in each cell by "
                                                       "the study's strategies (lora: strategy.freeze=lora)"),
    ({"finetune_overrides": ["strategy.k=3"], "strategies": ["freeze_all", "first_k"]},
     "finetune_overrides: strategy.k is set in each cell by the study's strategies (first_k: strategy.k=2); drop it"),
    ({"finetune_overrides": ["strategy.llrd=0.5"], "strategies": ["full_llrd"]},
     "finetune_overrides: strategy.llrd is set in each cell by the study's strategies (full_llrd: strategy.llrd=0.75)"),
    ({"finetune_overrides": ["train.num_labeled=1"]}, "finetune_overrides: train.num_labeled is set in each cell by "
                                                      "the study's num_labeled; drop it from finetune_overrides"),
    ({"finetune_overrides": ["train.repeats=2"]}, "finetune_overrides: train.repeats is set in each cell by the "
                                                  "study's repeats"),
    ({"finetune_overrides": ["model.depth=3"], "inits": ["scratch"]},
     "finetune_overrides: model.depth: the scratch cells take the pretraining model's"),
])
def test_a_value_no_study_can_use_is_refused_before_anything_is_made(changes, message):
    """Each of these built every phantom set (or ran the whole study) before failing or reporting wrong
    numbers; `check` runs before anything is written."""
    with pytest.raises(ConfigError) as e:
        S.check(S.StudyConfig(**{"num_labeled": [1], **changes}))
    assert str(e.value).startswith(message), str(e.value)


def test_what_the_checks_allow():
    # pretraining's ranges matter only when it runs; a finetuning site.spacing set to the study's is its spacing
    S.check(S.StudyConfig(inits=["scratch"], pretrain_overrides=["train.steps=0"], num_labeled=[1]))
    S.check(S.StudyConfig(spacing=(2.0, 2.0, 2.0), finetune_overrides=["site.spacing=[2,2,2]"], num_labeled=[1]))
    S.check(S.StudyConfig(labelled=4, num_labeled=[4], val=1, test=1, unlabelled=1, shape=(16, 16, 16)))
    # a strategy key no listed strategy sets, and one reads, is the study's to choose (lora sets only the freeze)
    S.check(S.StudyConfig(strategies=["lora"], finetune_overrides=["strategy.lora_rank=4"], num_labeled=[1]))
    with pytest.raises(ConfigError, match=r"strategy.k: read only with strategy.freeze=first_k, and strategy.freeze "
                                          r"is none"):  # full_llrd never reads strategy.k
        S.check(S.StudyConfig(strategies=["full_llrd"], finetune_overrides=["strategy.k=3"], num_labeled=[1]))


def test_a_file_where_a_folder_goes_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    S.check_folder(tmp_path / "new" / "deeper", "--out")
    S.check_folder(tmp_path, "--out")
    for path in (tmp_path / "afile", tmp_path / "afile" / "below"):
        with pytest.raises(ConfigError, match=f"^{tmp_path / 'afile'}: exists and is not a folder "
                                              r"\(--workdir names a folder\)$"):
            S.check_folder(path, "--workdir")


def test_logged_commands_and_stage_output_name_no_folder(tmp_path, monkeypatch):
    """A folder is shown as WORKDIR or OUT in every form a stage may print it (as given, absolute,
    resolved through a link), as whole path components only."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DOE_JANE" / "wd").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "DOE_JANE")
    places = {"WORKDIR": Path("link/wd"), "OUT": Path("link/wd/out")}
    text = (f"{sys.executable} -m lnfm finetune --data {tmp_path}/DOE_JANE/wd/data --init link/wd/pretrain "
            f"--workdir {tmp_path}/link/wd/runs/a 'link/wd/out/study.md' link/wdx link/wd.bak x/link/wd")
    assert S.hide_paths(text, places) == ("python -m lnfm finetune --data WORKDIR/data --init WORKDIR/pretrain "
                                          "--workdir WORKDIR/runs/a 'OUT/study.md' link/wdx link/wd.bak x/WORKDIR")
    # a stage's output is written through it, and a failed stage still stops the study
    log_file = tmp_path / "stage.log"
    code = f"print('read only={tmp_path}/DOE_JANE/wd/pretrain'); raise SystemExit(3)"
    with pytest.raises(S.StageFailed, match=r"failed \(exit 3\): read only=WORKDIR/pretrain$"):
        S._run([sys.executable, "-c", code], dict(os.environ), log_file, places)
    assert log_file.read_text() == "read only=WORKDIR/pretrain\n"


def test_the_report_s_command_names_no_folder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(S, "run", lambda cfg, workdir, out, command: seen.append((workdir, out, command)) or 0)
    S.main(["--quick", "--workdir", "/data/DOE_JANE/wd", "--out", "DOE_JANE/out", "repeats=2"])
    assert seen[-1] == ("/data/DOE_JANE/wd", "DOE_JANE/out",
                        "python finetune/study.py --quick --workdir WORKDIR --out OUT repeats=2")
    # a config file is the workdir's resolved copy (the overrides are in it, and given again change nothing)
    (tmp_path / "DOE_JANE.yaml").write_text("base: quick\nrepeats: 3\n")
    S.main(["--config", str(tmp_path / "DOE_JANE.yaml"), "--workdir", "wd", "--out", "out", "heads=[light]"])
    assert seen[-1][2] == ("python finetune/study.py --config WORKDIR/config.yaml --workdir WORKDIR --out OUT "
                           "'heads=[light]'")
    S.main(["--config", "full", "--workdir", "wd", "--out", "out"])
    assert seen[-1][2] == "python finetune/study.py --config full --workdir WORKDIR --out OUT"


def test_scratch_cells_use_the_pretrained_architecture():
    over = S.scratch_model_overrides(S.StudyConfig(pretrain_config="vit_tiny"))
    assert "model.patch_size=[8, 8, 8]" in over and 'model.size="tiny"' in over
    # less the keys finetuning never reads and refuses as overrides (every cell failed at its config)
    assert not [o for o in over if o.startswith(("model.mask_ratio=", "model.norm_pix=", "model.decoder_"))]
    swin = S.StudyConfig(pretrain_config="swin_b", inits=["scratch"], num_labeled=[1])
    assert not [o for o in S.scratch_model_overrides(swin) if o.startswith("model.patch_size=")]
    S.check(swin)  # every cell's finetuning config loads


def test_aggregate_table_and_plots(tmp_path):
    rows = []
    data = {("scratch", 1): [0.2, 0.4, 0.3], ("pretrained", 1): [0.5, 0.6, 0.7],
            ("scratch", 4): [0.5, 0.5, 0.5], ("pretrained", 4): [0.6, 0.7, 0.8]}
    for (init, n), d in data.items():
        cell = {"init": init, "strategy": "freeze_all", "head": "light", "num_labeled": n}
        rows += S.rows_of(cell, _summary(d, [x / 2 for x in d]))
    assert len(rows) == 12 and rows[0]["trainable_params"] == 1000
    agg = {(a["init"], a["num_labeled"]): a for a in S.aggregate(rows)}
    for key, d in data.items():
        assert agg[key]["dice_mean"] == pytest.approx(np.mean(d))
        # 95% CI over 3 repeats: mean +- t(0.975, 2) * sd / sqrt(3), t = 4.302653 (printed tables).
        half = 4.302653 * np.std(d, ddof=1) / np.sqrt(3)
        assert agg[key]["dice_ci_lo"] == pytest.approx(np.mean(d) - half, abs=1e-5)
        assert agg[key]["dice_ci_hi"] == pytest.approx(np.mean(d) + half, abs=1e-5)
        assert agg[key]["node_sensitivity_mean"] == pytest.approx(np.mean(d) / 2)
        assert agg[key]["repeats"] == 3
    md = S.markdown(list(agg.values()), S.StudyConfig(), "python finetune/study.py --quick", rows)
    # Paired by repeat: differences 0.3, 0.2, 0.4 at 1 case (t = 5.196 on 2 df, p = 0.0351); a constant
    # 0.1, 0.2, 0.3 at 4 cases (sd 0.1 -> t = 3.464, p = 0.0742).
    assert "| freeze_all | light | 1 | +0.300 [+0.052, +0.548] | 3 | 0.035 | 0.250 |" in md
    assert "| freeze_all | light | 4 | +0.200 [-0.048, +0.448] | 3 | 0.074 | 0.250 |" in md
    atomic_write_csv(tmp_path / "study.csv", rows)
    with open(tmp_path / "study.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    S.plot(list(agg.values()), "dice", "Dice", tmp_path / "dice.png")
    assert (tmp_path / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_study_resumed_with_other_settings_is_refused(tmp_path, monkeypatch):
    """Cells with a summary.json, the data and the pretraining are reused on a rerun: with another
    repeat count (or finetuning overrides, phantom counts, ...) the table would report results made
    under the old settings as the new ones."""
    from lnfm.workdir import WorkdirError, open_workdir

    cfg = S.StudyConfig(repeats=2, num_labeled=[1])
    open_workdir(tmp_path / "wd", cfg, tensorboard=False).close()
    (tmp_path / "wd" / "runs").mkdir()
    recorded = (tmp_path / "wd" / "config.yaml").read_text()

    class Built(Exception):
        pass

    def build(*a):
        raise Built

    monkeypatch.setattr(S, "build_benchmark", build)
    for changed in (S.StudyConfig(repeats=5, num_labeled=[1]),
                    S.StudyConfig(repeats=2, num_labeled=[1], finetune_overrides=["train.steps=50"])):
        with pytest.raises(WorkdirError, match="the run to resume has"):
            S.run(changed, tmp_path / "wd", tmp_path / "out", "cmd")
    assert (tmp_path / "wd" / "config.yaml").read_text() == recorded
    with pytest.raises(Built):  # more cells with the same settings: resumed
        S.run(S.StudyConfig(repeats=2, num_labeled=[1, 2]), tmp_path / "wd", tmp_path / "out", "cmd")
    # the failed stage ended the study's log.txt: no later run's lines reach it
    assert not [h for h in logging.getLogger("lnfm").handlers if str(tmp_path) in getattr(h, "baseFilename", "")]


def test_a_rerun_replaces_only_the_study_s_own_outputs_and_workdir(tmp_path, monkeypatch):
    """--out: a study.md or study.csv of the user's, or one the study wrote and the user edited, was replaced
    without a word; --workdir: another job's config.yaml was replaced, so that run could no longer be resumed,
    finetuned from or exported. Both are refused in one line before the study runs; its own outputs are
    replaced. The stages are stubbed: one cell, three repeats."""
    from lnfm.workdir import WorkdirError

    monkeypatch.setattr(S, "build_benchmark", lambda cfg, workdir, env: (None, None))
    monkeypatch.setattr(S, "run_cell", lambda cfg, c, store, pre, workdir, env: _summary([0.2, 0.3, 0.4],
                                                                                         [0.5, 0.5, 0.5]))
    cfg = S.StudyConfig(inits=["scratch"], strategies=["freeze_all"], heads=["light"], num_labeled=[1], repeats=3)
    wd, out = tmp_path / "wd", tmp_path / "out"
    assert S.run(cfg, wd, out, "python finetune/study.py") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*S.OUT_FILES, S.OUT_RECORD])
    assert S.run(cfg, wd, out, "python finetune/study.py") == 0  # its own files: replaced
    (out / "study.md").write_text((out / "study.md").read_text() + "\nmy reading of the table\n")
    edited = (out / "study.md").read_bytes()
    with pytest.raises(ConfigError, match=rf"^{out / 'study.md'}: exists and is not a file lnfm study wrote"):
        S.run(cfg, wd, out, "python finetune/study.py")
    assert (out / "study.md").read_bytes() == edited
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "study.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=rf"^{mine / 'study.csv'}: exists and is not a file lnfm study wrote"):
        S.run(cfg, tmp_path / "wd2", mine, "python finetune/study.py")
    assert (mine / "study.csv").read_text() == "a,b\n1,2\n" and not (tmp_path / "wd2").exists()
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    record = "data:\n  split: train\nmodel:\n  arch: vit\ntrain:\n  steps: 4\n"  # another job's config.yaml
    (pretrain / "config.yaml").write_text(record)
    with pytest.raises(WorkdirError, match=rf"^{pretrain / 'config.yaml'}: a config.yaml this job did not write"):
        S.run(cfg, pretrain, tmp_path / "out3", "python finetune/study.py")
    assert (pretrain / "config.yaml").read_text() == record and not (tmp_path / "out3").exists()


def test_a_second_study_writing_the_same_out_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    """Two studies (two workdirs) with one --out mixed study.csv and study.md and shared a plot's temporary name."""
    from lnfm.workdir import WorkdirError

    cfg = S.StudyConfig(inits=["scratch"], strategies=["freeze_all"], heads=["light"], num_labeled=[1], repeats=3)
    monkeypatch.setattr(S, "build_benchmark", lambda cfg, workdir, env: (None, None))
    seen = []

    def cell(cfg_, c, store, pre, workdir, env):
        if not seen:  # while the first study runs its cell
            with pytest.raises(WorkdirError, match="in use by another lnfm job") as e:
                S.run(cfg, tmp_path / "wd2", tmp_path / "out", "cmd")
            seen.append(str(e.value))
        return _summary([0.2, 0.3, 0.4], [0.5, 0.5, 0.5])

    monkeypatch.setattr(S, "run_cell", cell)
    assert S.run(cfg, tmp_path / "wd", tmp_path / "out", "cmd") == 0
    assert seen and "\n" not in seen[0] and not (tmp_path / "wd2").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*S.OUT_FILES, S.OUT_RECORD])


def test_a_second_study_with_another_workdir_keeps_the_first_s_report(tmp_path, monkeypatch):
    """A second study (another --workdir) with the first's --out replaced its report without a word; --out's
    record names the study that wrote it by the random id its workdir keeps (no path), and only that study
    replaces it. A record lnfm wrote before the ids (none named) was taken over by any study: only a workdir
    started before them, as the study that wrote it was, replaces it now; another is refused the same way."""
    import json

    from tree_helpers import tree_digest

    monkeypatch.setattr(S, "build_benchmark", lambda cfg, workdir, env: (None, None))
    monkeypatch.setattr(S, "run_cell", lambda cfg, c, store, pre, workdir, env: _summary([0.2, 0.3, 0.4],
                                                                                         [0.5, 0.5, 0.5]))
    cfg = S.StudyConfig(inits=["scratch"], strategies=["freeze_all"], heads=["light"], num_labeled=[1], repeats=3)
    out = tmp_path / "out"
    assert S.run(cfg, tmp_path / "wd", out, "cmd") == 0
    before = tree_digest(out)
    with pytest.raises(ConfigError, match=rf"^--out {out}: holds the report of another study \(study.csv, "
                                          r".*study.md, from another --workdir or one made anew\); move those files"):
        S.run(cfg, tmp_path / "wd2", out, "cmd")
    assert tree_digest(out) == before and not (tmp_path / "wd2").exists()
    first = (tmp_path / "wd" / S.STUDY_ID).read_text().strip()
    record = json.loads((out / S.OUT_RECORD).read_text())
    assert record["study"] == first and len(first) == 16 and str(tmp_path) not in json.dumps(record)
    assert S.run(cfg, tmp_path / "wd", out, "cmd") == 0  # the study that wrote it replaces it
    assert (tmp_path / "wd" / S.STUDY_ID).read_text().strip() == first
    (out / S.OUT_RECORD).write_text(json.dumps({"files": record["files"]}))  # as lnfm wrote it before the ids
    before = tree_digest(out)
    for workdir in (tmp_path / "wd3", tmp_path / "wd"):  # a new study's, and one started since the ids
        with pytest.raises(ConfigError, match=rf"^--out {out}: holds the report of a study an earlier lnfm ran "
                                              r"\(study.csv, .*study.md, its record names no study\), which only"):
            S.run(cfg, workdir, out, "cmd")
    assert tree_digest(out) == before and not (tmp_path / "wd3").exists()
    (tmp_path / "wd" / S.STUDY_ID).unlink()  # its workdir as an lnfm before the ids left it: started, no id
    (tmp_path / "wd" / "runs").mkdir()
    assert S.run(cfg, tmp_path / "wd", out, "cmd") == 0
    assert json.loads((out / S.OUT_RECORD).read_text())["study"] == (tmp_path / "wd" / S.STUDY_ID).read_text().strip()


def test_a_study_whose_workdir_is_moved_ends_in_one_line_remade_nowhere(tmp_path, monkeypatch):
    """A cell's mkdir remade a moved workdir at its old path (a traceback reading the cell's summary after)."""
    from lnfm.errors import FolderMoved

    wd = tmp_path / "wd"

    def build(cfg, workdir, env):
        os.rename(wd, tmp_path / "moved")
        return tmp_path / "store", None

    monkeypatch.setattr(S, "build_benchmark", build)
    monkeypatch.setattr(S, "_run", lambda *a: pytest.fail("a stage ran"))
    cfg = S.StudyConfig(inits=["scratch"], strategies=["freeze_all"], heads=["light"], num_labeled=[1], repeats=3)
    with pytest.raises(FolderMoved, match=rf"^{wd}: moved, renamed or removed while the job wrote a cell's folder"):
        S.run(cfg, wd, tmp_path / "out", "cmd")
    assert not wd.exists() and (tmp_path / "moved" / "config.yaml").is_file()


def test_an_out_inside_an_export_or_a_run_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """study.md, the CSVs, the plots and the record written into an export broke its checksums."""
    from tree_helpers import tree_digest

    export, workdir = tmp_path / "export", tmp_path / "ft"
    export.mkdir()
    (export / "model.json").write_text("{}")
    (export / "checksums.sha256").write_text("")
    (workdir / "best").mkdir(parents=True)
    (workdir / "config.yaml").write_text("site: {name: pelvis}\n")
    monkeypatch.setattr(S, "_study", lambda *a: pytest.fail("the study ran"))
    cfg = S.StudyConfig(inits=["scratch"], strategies=["freeze_all"], heads=["light"], num_labeled=[1], repeats=3)
    before = tree_digest(tmp_path)
    for out, reason in ((export, "is the model export"), (export / "study", f"lies inside the model export {export}"),
                        (workdir / "study", f"lies inside the finetuning workdir {workdir}")):
        with pytest.raises(ConfigError, match=f"^--out {out}: {reason}, which the study does not own") as e:
            S.run(cfg, tmp_path / "swd", out, "cmd")
        assert "\n" not in str(e.value)
        assert tree_digest(tmp_path) == before, out
        # the workdir likewise: its data, pretraining and cells went into the export or the run
        with pytest.raises(ConfigError, match=f"^--workdir {out}: {reason}, which the study does not own"):
            S.run(cfg, out, tmp_path / "sout", "cmd")
        assert tree_digest(tmp_path) == before, out


def test_a_finished_run_in_a_cell_folder_is_counted_only_when_it_is_the_cell_s(tmp_path):
    import json

    from lnfm.config import dump_yaml
    from lnfm.jobs.finetune import load_finetune_config
    from lnfm.workdir import WorkdirError

    cfg = S.StudyConfig(inits=["scratch"], strategies=["full_llrd"], heads=["fine"], num_labeled=[1], repeats=1)
    c = S.cells(cfg)[0]
    store, out = tmp_path / "wd" / "data" / "labelled", S.cell_dir(tmp_path / "wd", S.cells(cfg)[0])
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(_summary([0.7], [0.5])))
    mine = load_finetune_config(cfg.site, S.finetune_args(cfg, "full_llrd", "fine") + S.scratch_model_overrides(cfg),
                                data=[str(store)], num_labeled=1, repeats=1, quick=cfg.quick)
    (out / "config.yaml").write_text(dump_yaml(mine))
    assert S.run_cell(cfg, c, store, None, tmp_path / "wd", {})["repeats"][0]["dice"] == 0.7
    other = load_finetune_config(cfg.site, S.finetune_args(cfg, "first_k", "fine") + S.scratch_model_overrides(cfg),
                                 data=[str(tmp_path / "st")], quick=cfg.quick)  # another finetune's, all cases
    (out / "config.yaml").write_text(dump_yaml(other))
    with pytest.raises(WorkdirError, match="not made by this study's cell") as e:
        S.run_cell(cfg, c, store, None, tmp_path / "wd", {})
    assert "\n" not in str(e.value)
