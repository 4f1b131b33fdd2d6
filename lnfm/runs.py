"""The layout of run folders: the only code that knows where a job puts what.

    PRETRAIN_DIR/  config.yaml  preprocessing.json  data.json  checkpoints/  summary.json  metrics.jsonl ...
    FINETUNE_DIR/  config.yaml  preprocessing.json  splits.json  summary.json
                   [repeat_<r>/] config.yaml  checkpoints/  best/<step>/best.json  test_masks/
                                 [teacher/ (a repeat's files)  pseudo_labels/ (a store)  selected.json]
                                 (self-training; the repeat's model is the teacher's when selected.json says so)
    EXPORT_DIR/    model.json  checksums.sha256  (format files)

A finetuning run with one repeat keeps that repeat's files in its own root; with
R > 1 repeats, repeat r lives in repeat_<r>/. Every type has `detect(path)`,
which also accepts the sub-folders a user is likely to name (checkpoints/,
best/, repeat_<r>/) and returns None for anything else; a finetuning run found
through repeat_<r>/ keeps r (`FinetuneRun.named`), so the model it stands for is
that repeat's, not repeat 0's. preprocessing.json holds
the contract a run trained with (`lnfm.data.contract`); this module only places it.
summary.json is written once a run has finished (`write_json`, atomic). best.json
({'step', 'val_dice'}) lives inside the best model's committed step folder: the model and
its record are one commit, so a kill can never leave them disagreeing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from lnfm.config import ConfigError, read_yaml
from lnfm.workdir import atomic_write_text

CONFIG = "config.yaml"
PREPROCESSING = "preprocessing.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_JSON = "best.json"
SUMMARY = "summary.json"
SPLITS = "splits.json"  # a finetuning run's case ids per split, recorded at its first start
TEST_MASKS = "test_masks"
POSTPROCESS = "postprocess.json"  # the post-processing the test masks were made with (tuned on validation)
TEACHER = "teacher"
PSEUDO_LABELS = "pseudo_labels"
SELECTED = "selected.json"  # self-training: {"model": "teacher" | "student", ...}, the one validation preferred
MODEL_JSON = "model.json"
CHECKSUMS = "checksums.sha256"
_REPEAT = re.compile(r"^repeat_(0|[1-9]\d*)$")  # as the job names them: repeat_01 is not repeat 1


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is absent; a corrupt one is an error naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _json_default(x: Any) -> Any:
    """numpy scalars as numbers; anything else JSON cannot hold as its text."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def write_json(path: Path, data: dict) -> None:
    """A JSON record (summary.json), written atomically: readers see the old file or the new one."""
    atomic_write_text(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _is_finetune_config(path: Path) -> bool:
    """A finetuning config has a `site` section; a pretraining one has none."""
    try:
        return "site" in read_yaml(path)
    except (ConfigError, OSError):
        return False


def _entry(name: str) -> property:
    """ROOT/`name` of a folder type (declared once per type, from the names above)."""
    return property(lambda self: self.root / name, doc=f"ROOT/{name}")


@dataclasses.dataclass(frozen=True)
class PretrainRun:
    root: Path
    config = _entry(CONFIG)
    checkpoints = _entry(CHECKPOINTS)
    preprocessing = _entry(PREPROCESSING)
    summary = _entry(SUMMARY)

    def checkpoint_dirs(self) -> list[Path]:
        """The folders whose checkpoints mean the run has started (and is resumed)."""
        return [self.checkpoints]

    @classmethod
    def detect(cls, path: str | Path) -> PretrainRun | None:
        """A pretraining workdir (config.yaml + checkpoints/), named itself or by its checkpoints/."""
        path = Path(path)
        if path.name == CHECKPOINTS and (path.parent / CONFIG).is_file():
            path = path.parent
        if (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir() and not _is_finetune_config(path / CONFIG):
            return cls(path)
        return None


@dataclasses.dataclass(frozen=True)
class RepeatRun:
    """One finetuning repeat: its checkpoints, its best model and the best model's test masks."""

    root: Path
    config = _entry(CONFIG)
    checkpoints = _entry(CHECKPOINTS)
    best = _entry(BEST)
    test_masks = _entry(TEST_MASKS)
    postprocess = _entry(POSTPROCESS)
    pseudo_labels = _entry(PSEUDO_LABELS)  # self-training: the teacher's masks of the unlabelled scans

    selected = _entry(SELECTED)

    @property
    def teacher(self) -> RepeatRun:
        """Self-training's teacher, a repeat of its own; this repeat's own files are the student's."""
        return RepeatRun(self.root / TEACHER)

    def model(self) -> RepeatRun:
        """The run whose best model stands for this repeat: itself, or its self-training teacher
        when validation preferred the teacher to the student (selected.json)."""
        record = read_json(self.selected)
        return self.teacher if record is not None and record.get("model") == TEACHER else self

    def test_mask(self, case_id: str) -> Path:
        return self.test_masks / f"{case_id}.nii.gz"

    def best_step(self) -> Path | None:
        """The committed step folder of the best model (the newest one while a new best replaces
        the previous), or None before one is saved."""
        steps = [p for p in self.best.iterdir() if p.name.isdigit() and p.is_dir()] if self.best.is_dir() else []
        return max(steps, key=lambda p: int(p.name)) if steps else None

    def best_record(self) -> dict | None:
        """{'step', 'val_dice'} committed with the best model, or None before one is saved."""
        step = self.best_step()
        if step is None:
            return None
        record = read_json(step / BEST_JSON)
        if record is None:  # a run saved by an older lnfm kept it beside best/: valid if it names this step
            legacy = read_json(self.root / BEST_JSON)
            record = legacy if legacy is not None and legacy.get("step") == int(step.name) else None
        return record


@dataclasses.dataclass(frozen=True)
class FinetuneRun:
    root: Path
    named: int | None = None  # the r of the repeat_<r>/ that `detect` was given (or a folder in it)
    config = _entry(CONFIG)
    preprocessing = _entry(PREPROCESSING)
    splits = _entry(SPLITS)
    summary = _entry(SUMMARY)

    def repeat(self, r: int, repeats: int) -> RepeatRun:
        """Repeat r of a run with `repeats` repeats (a single repeat lives in the root)."""
        return RepeatRun(self.root if repeats == 1 else self.root / f"repeat_{r}")

    def repeat_dirs(self) -> list[Path]:
        """The repeat_<r>/ folders of a run with several repeats, by r (none for a single repeat)."""
        found = [p for p in self.root.glob("repeat_*") if _REPEAT.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(_REPEAT.match(p.name).group(1)))

    def first(self) -> RepeatRun:
        """The run whose best model an export or `load_finetuned` takes: the repeat `detect` was named
        by, else the single repeat or repeat 0 (`RepeatRun.model`: its self-training teacher when
        that was kept)."""
        if self.named is not None:
            return RepeatRun(self.root / f"repeat_{self.named}").model()
        single = RepeatRun(self.root)
        return (single if single.best.is_dir() else RepeatRun(self.root / "repeat_0")).model()

    def checkpoint_dirs(self) -> list[Path]:
        """The folders whose checkpoints mean the run has started: every repeat's checkpoints/ and best/."""
        repeats = [RepeatRun(self.root)] + [RepeatRun(p) for p in sorted(self.root.glob("repeat_*"))
                                            if _REPEAT.match(p.name)]
        return [d for r in repeats for run in (r, r.teacher) for d in (run.checkpoints, run.best)]

    @classmethod
    def detect(cls, path: str | Path) -> FinetuneRun | None:
        """A finetuning workdir (config.yaml + best/ in it or in repeat_0/), named itself or by one of
        its best/, checkpoints/ or repeat_<r>/ folders (or repeat_<r>/best/ ...: `named` = r)."""
        path = Path(path)
        named = None
        if path.name in (BEST, CHECKPOINTS) and (path.parent / CONFIG).is_file():
            path = path.parent
        repeat = _REPEAT.match(path.name)
        if repeat and (path.parent / CONFIG).is_file():
            path, named = path.parent, int(repeat.group(1))
        if (path / CONFIG).is_file() and ((path / BEST).is_dir() or (path / "repeat_0" / BEST).is_dir()):
            return cls(path, named)
        return None


@dataclasses.dataclass(frozen=True)
class ExportFolder:
    root: Path
    model_json = _entry(MODEL_JSON)
    checksums = _entry(CHECKSUMS)

    @classmethod
    def detect(cls, path: str | Path) -> ExportFolder | None:
        path = Path(path)
        return cls(path) if (path / MODEL_JSON).is_file() else None


def model_folder_of(path: str | Path) -> tuple[str, Path, Path] | None:
    """(kind, its root, the path as walked) where `path` is or lies inside a model export ('export') or a
    pretraining or finetuning run's workdir ('pretrain', 'finetune'); None when it is in neither. Links on
    the way are followed (a link to an export is one)."""
    given = Path(path).expanduser().absolute()
    for start in dict.fromkeys((given, given.resolve())):
        for p in (start, *start.parents):
            finetune, pretrain = FinetuneRun.detect(p), PretrainRun.detect(p)
            if ExportFolder.detect(p) is not None:
                return "export", p, start
            if finetune is not None and finetune.root == p:
                return "finetune", p, start
            if pretrain is not None and pretrain.root == p:
                return "pretrain", p, start
    return None


def model_folder_around(path: str | Path) -> str | None:
    """How `path` (an output about to be written) is or lies inside a model export or a pretraining or
    finetuning run's workdir, e.g. 'lies inside the model export EXPORT'; None when it is in neither. A file
    written into an export breaks its checksums.sha256 (`export --verify`, predict); one written into a
    workdir mixes into a run that owns it."""
    found = model_folder_of(path)
    if found is None:
        return None
    kind, root, start = found
    what = {"export": "the model export", "finetune": "the finetuning workdir", "pretrain": "the pretraining workdir"}
    return f"is {what[kind]}" if root == start else f"lies inside {what[kind]} {root}"
