"""Run-folder layout: detection of pretraining runs, finetuning runs (one or several repeats)
and export folders, from any sub-folder a user is likely to name."""

from pathlib import Path

import pytest
import yaml

from lnfm.runs import ExportFolder, FinetuneRun, PretrainRun, RepeatRun, read_json


def _mk(root: Path, *parts: str, config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for p in parts:
        (root / p).mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_pretrain_run_is_detected_from_its_root_or_checkpoints(tmp_path):
    pre = _mk(tmp_path / "pre", "checkpoints", config={"model": {"arch": "vit"}, "data": {}})
    for path in (pre, pre / "checkpoints"):
        run = PretrainRun.detect(path)
        assert run == PretrainRun(pre) and run.checkpoints == pre / "checkpoints"
        assert FinetuneRun.detect(path) is None and ExportFolder.detect(path) is None
    assert PretrainRun.detect(tmp_path) is None and PretrainRun.detect(tmp_path / "missing") is None


def test_finetune_run_with_one_or_several_repeats(tmp_path):
    one = _mk(tmp_path / "one", "best", "checkpoints", config={"site": {"name": "pelvis"}})
    for path in (one, one / "best", one / "checkpoints"):
        run = FinetuneRun.detect(path)
        assert run == FinetuneRun(one)
        assert PretrainRun.detect(path) is None  # a finetuning run also has checkpoints/
    assert run.first().best == one / "best" and run.repeat(0, 1).best_record() is None  # no step committed
    many = _mk(tmp_path / "many", "repeat_0/best", "repeat_1/best", config={"site": {}})
    run = FinetuneRun.detect(many)
    assert run == FinetuneRun(many) and run.named is None
    assert run.first().root == many / "repeat_0" and run.repeat(1, 2).checkpoints == many / "repeat_1/checkpoints"
    assert run.summary == many / "summary.json"
    assert run.repeat(1, 2).test_mask("c1") == many / "repeat_1/test_masks/c1.nii.gz"
    # A finetuning run killed before its first validation has no best/ yet: neither kind.
    early = _mk(tmp_path / "early", "checkpoints", config={"site": {}})
    assert FinetuneRun.detect(early) is None and PretrainRun.detect(early) is None


def test_a_repeat_named_by_its_folder_is_the_one_its_run_stands_for(tmp_path):
    many = _mk(tmp_path / "many", "repeat_0/best", "repeat_1/best/3", "repeat_1/checkpoints", "repeat_2/best",
               "repeat_10/best", "repeat_01/best", config={"site": {}})
    (many / "repeat_1" / "config.yaml").write_text("site: {}\n")  # each repeat keeps its own config, as the job does
    for path in (many / "repeat_1", many / "repeat_1" / "best", many / "repeat_1" / "checkpoints"):
        run = FinetuneRun.detect(path)
        assert run == FinetuneRun(many, named=1), path
        assert run.first().root == many / "repeat_1" and run.first().best_step() == many / "repeat_1/best/3"
    assert FinetuneRun.detect(many / "repeat_10").first().root == many / "repeat_10"
    # repeat_01 is no folder the job writes: not repeat 1 (nor any repeat)
    assert FinetuneRun.detect(many / "repeat_01") is None
    assert FinetuneRun(many).repeat_dirs() == [many / f"repeat_{r}" for r in (0, 1, 2, 10)]
    assert FinetuneRun(_mk(tmp_path / "one", "best", config={"site": {}})).repeat_dirs() == []
    # A named repeat that kept its self-training teacher stands for the teacher's model.
    from lnfm.runs import write_json

    write_json(RepeatRun(many / "repeat_2").selected, {"model": "teacher"})
    assert FinetuneRun.detect(many / "repeat_2").first().root == many / "repeat_2" / "teacher"


def test_export_folder_and_json_records(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    assert ExportFolder.detect(exp) is None
    (exp / "model.json").write_text("{}")
    assert ExportFolder.detect(exp).checksums == exp / "checksums.sha256"
    assert read_json(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_checkpoint_dirs_say_where_a_started_run_keeps_its_state(tmp_path):
    many = _mk(tmp_path / "many", "repeat_0/best", "repeat_1/checkpoints", "repeat_x", config={"site": {}})
    # each repeat with its self-training teacher's folders: a run stopped while the teacher trained has started
    assert FinetuneRun(many).checkpoint_dirs() == [
        many / r / d for r in ("", "repeat_0", "repeat_1") for d in ("checkpoints", "best", "teacher/checkpoints",
                                                                      "teacher/best")]  # repeat_x is no repeat
    assert PretrainRun(tmp_path / "p").checkpoint_dirs() == [tmp_path / "p/checkpoints"]


def test_write_json_is_atomic_and_reads_back(tmp_path, monkeypatch):
    import numpy as np

    from lnfm.runs import write_json

    path = PretrainRun(tmp_path).summary
    write_json(path, {"step": 3, "loss": np.float32(0.5), "spacing_mm": (1.5, 1.5, 2.0)})
    assert read_json(path) == {"step": 3, "loss": 0.5, "spacing_mm": [1.5, 1.5, 2.0]}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"step": 4})
    monkeypatch.undo()
    assert read_json(path)["step"] == 3 and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_the_best_record_is_the_one_committed_with_the_newest_best_step(tmp_path):
    rep = RepeatRun(_mk(tmp_path / "ft", "best/2", "best/4", "best/4.orbax-checkpoint-tmp", "best/corrupt_9"))
    (rep.best / "2" / "best.json").write_text('{"step": 2, "val_dice": 0.3}')
    (rep.best / "4" / "best.json").write_text('{"step": 4, "val_dice": 0.6}')
    assert rep.best_step() == rep.best / "4" and rep.best_record() == {"step": 4, "val_dice": 0.6}
    # A run from an older lnfm kept best.json beside best/: used only when it names the committed step.
    (rep.best / "4" / "best.json").unlink()
    (rep.root / "best.json").write_text('{"step": 2, "val_dice": 0.3}')
    assert rep.best_record() is None
    (rep.root / "best.json").write_text('{"step": 4, "val_dice": 0.6}')
    assert rep.best_record() == {"step": 4, "val_dice": 0.6}


def test_a_self_trained_repeat_stands_for_the_model_validation_kept(tmp_path):
    from lnfm.runs import write_json

    wd = _mk(tmp_path / "st", "best", "teacher/best", config={"site": {}})
    run = FinetuneRun(wd)
    assert run.first().root == wd  # no selection recorded: the repeat's own (student's) model
    write_json(RepeatRun(wd).selected, {"model": "teacher"})
    assert run.first().root == wd / "teacher" and run.first().best == wd / "teacher" / "best"
    write_json(RepeatRun(wd).selected, {"model": "student"})
    assert run.first().root == wd


def test_model_folder_around_finds_an_export_or_a_run_workdir_above_a_path(tmp_path):
    from lnfm.runs import model_folder_around

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text("{}")
    (export / "checksums.sha256").write_text("")
    finetune, pretrain = tmp_path / "ft", tmp_path / "pt"
    (finetune / "best").mkdir(parents=True)
    (finetune / "config.yaml").write_text("site: {name: pelvis}\n")
    (pretrain / "checkpoints").mkdir(parents=True)
    (pretrain / "config.yaml").write_text("model: {}\n")
    (tmp_path / "link").symlink_to(export)
    assert model_folder_around(export) == "is the model export"
    assert model_folder_around(export / "a" / "x.md") == f"lies inside the model export {export}"
    assert model_folder_around(tmp_path / "link" / "x.md") == f"lies inside the model export {tmp_path / 'link'}"
    assert model_folder_around(finetune / "best" / "x") == f"lies inside the finetuning workdir {finetune}"
    assert model_folder_around(pretrain / "x.md") == f"lies inside the pretraining workdir {pretrain}"
    assert model_folder_around(pretrain) == "is the pretraining workdir"
    assert model_folder_around(tmp_path / "elsewhere" / "x.md") is None
