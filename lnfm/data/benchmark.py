"""Phantom benchmark data with a held-out test split that no model has seen.

Disjoint phantom sets of one site, each from its own dataset seed:

- an unlabelled pool (training generator variant) for self-supervised pretraining,
  prepared without labels;
- optionally a target pool: unlabelled phantoms of the held-out variant (a clinic's own
  unlabelled scans), in a store of its own, never holding a test phantom;
- a labelled pool (training variant): few-shot training cases plus validation cases;
- held-out test cases from `synth.heldout_config` (other spacings, orientations,
  noise, HU calibration, real node masks and distractors).

The labelled store holds the labelled pool (splits train / val) and the held-out
cases (split test), so a finetuning run tests on exactly these. Every step is
skipped when its output exists, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lnfm.data import store as st
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.synth import SynthConfig, heldout_config, write_dataset
from lnfm.workdir import atomic_write_text

# Dataset seeds of the three sets: different seeds, so no phantom occurs twice.
SEEDS = {"unlabelled": 101, "labelled": 202, "test": 303, "target": 404}


@dataclasses.dataclass
class BenchmarkSpec:
    site: str = "pelvis"  # phantom site (and finetuning site preset)
    unlabelled: int = 24  # phantoms in the pretraining pool
    labelled: int = 10  # labelled phantoms the few-shot subsets are drawn from
    val: int = 2  # labelled validation phantoms
    test: int = 8  # held-out test phantoms
    target: int = 0  # unlabelled held-out-variant phantoms (the target pool; 0: none)
    shape: tuple[int, int, int] = (96, 96, 48)  # phantom voxel grid
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # prepared store spacing (mm)


@dataclasses.dataclass
class TestCase:
    case_id: str
    image: Path  # raw scan in its native geometry
    label: Path  # raw reference mask on the same grid


@dataclasses.dataclass
class Benchmark:
    unlabelled_store: Path
    labelled_store: Path
    pool: list[str]  # labelled training case ids
    val: list[str]
    test: list[TestCase]
    val_cases: list[TestCase] = dataclasses.field(default_factory=list)  # the val ids' raw scans and masks
    target_store: Path | None = None  # the target pool's store, when the spec asks for one


def _phantoms(out: Path, cfg: SynthConfig) -> None:
    if not (out / "dataset.json").is_file():
        write_dataset(cfg, out)


def phantom_rows(folder: Path, prefix: str, split: str, labels: bool) -> list[tuple[str, str, str, str]]:
    """(case id, image, label or "", split) of every phantom `lnfm synth` wrote to `folder`."""
    cases = json.loads((folder / "dataset.json").read_text())["cases"]
    return [(f"{prefix}{c['case']}", str(folder / "imagesTr" / f"{c['case']}_0000.nii.gz"),
             str(folder / "labelsTr" / f"{c['case']}.nii.gz") if labels else "", split) for c in cases]


def prepare_csv(rows: list[tuple[str, str, str, str]], site: dict[str, str] | None = None,
                folder: Path | None = None) -> str:
    """prepare's CSV input for (case id, image, label, split) rows; `site` maps case ids to a site
    ('phantom' otherwise). Files inside `folder` (the CSV's own) are named relative to it, as prepare
    reads a CSV's relative paths: the folder can be moved or copied whole."""
    site = site or {}

    def name(path: str) -> str:
        if not path or folder is None:
            return path
        p, base = Path(path).absolute(), Path(folder).absolute()
        return p.relative_to(base).as_posix() if p.is_relative_to(base) else path

    return "case_id,image,label,site,split\n" + "".join(f"{c},{name(i)},{name(lb)},{site.get(c, 'phantom')},{sp}\n"
                                                          for c, i, lb, sp in rows)


def _store(csv_path: Path, rows: list, out: Path, spacing) -> None:
    if (out / "manifest.jsonl").is_file():
        return
    atomic_write_text(csv_path, prepare_csv(rows, folder=csv_path.parent))
    result = prepare_dataset(str(csv_path), str(out), PrepareConfig(spacing=tuple(spacing), workers=1),
                             show_progress=False)
    if not result.ok:
        raise RuntimeError(f"{out}: {result.failed} phantom(s) failed to convert: {result.failures[0]}")


def build(spec: BenchmarkSpec, workdir: str | Path) -> Benchmark:
    """Write (or reuse) the phantom sets and their stores under `workdir`."""
    workdir = Path(workdir).resolve()
    base = SynthConfig(site=spec.site, shape=tuple(spec.shape), gallery=False)
    unl, lab, test = workdir / "phantoms_unlabelled", workdir / "phantoms_labelled", workdir / "phantoms_heldout"
    _phantoms(unl, dataclasses.replace(base, num_cases=spec.unlabelled, seed=SEEDS["unlabelled"]))
    _phantoms(lab, dataclasses.replace(base, num_cases=spec.labelled + spec.val, seed=SEEDS["labelled"]))
    _phantoms(test, heldout_config(base, num_cases=spec.test, seed=SEEDS["test"]))
    lab_rows = phantom_rows(lab, "l_", "train", True)
    for i in range(spec.val):  # the last cases validate
        lab_rows[-1 - i] = (*lab_rows[-1 - i][:3], "val")
    test_rows = phantom_rows(test, "t_", "test", True)
    _store(workdir / "unlabelled.csv", phantom_rows(unl, "u_", "train", False), workdir / "store_unlabelled",
           spec.spacing)
    _store(workdir / "labelled.csv", lab_rows + test_rows, workdir / "store_labelled", spec.spacing)
    target_store = None
    if spec.target:
        tgt = workdir / "phantoms_target"
        _phantoms(tgt, heldout_config(base, num_cases=spec.target, seed=SEEDS["target"]))
        target_store = workdir / "store_target"
        _store(workdir / "target.csv", phantom_rows(tgt, "v_", "train", False), target_store, spec.spacing)
    ids = {r["case_id"] for r in st.read_manifest(str(workdir / "store_labelled"))}
    missing = [r[0] for r in lab_rows + test_rows if r[0] not in ids]
    if missing:
        raise RuntimeError(f"{workdir / 'store_labelled'}: case {missing[0]} is missing from the store")
    return Benchmark(workdir / "store_unlabelled", workdir / "store_labelled",
                     pool=sorted(r[0] for r in lab_rows if r[3] == "train"),
                     val=sorted(r[0] for r in lab_rows if r[3] == "val"),
                     test=[TestCase(c, Path(i), Path(lb)) for c, i, lb, _ in test_rows],
                     val_cases=[TestCase(c, Path(i), Path(lb)) for c, i, lb, sp in lab_rows if sp == "val"],
                     target_store=target_store)
