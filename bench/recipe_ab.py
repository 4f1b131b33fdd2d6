"""Finetuning recipes side by side on dev phantoms of the held-out generator variant.

    python bench/recipe_ab.py --arm base= --arm noise="loader.noise_std=0.08" [--seeds 3] \
        [--dev heldout,heldout_train_noise,train] [--peer unet] [--workdir DIR]

`bench/accuracy.py`'s cpu preset (its phantoms, its MAE pretraining, `finetune --quick`'s
recipe with 4 labelled cases) at BASE_STEPS = 600 steps, the recipe every documented comparison was
measured against, with each arm's overrides appended (`train.steps=2800` for the CPU recipe's length). Every
finetuned model is exported and scored through `lnfm.jobs.predict` on dev phantoms (dataset
seeds 505 and 606, never the benchmark's test seed) of one or more dev sets:
- `heldout`: the held-out generator variant, as the benchmark's test phantoms;
- `heldout_train_noise`: the same phantoms' anatomy with the training variant's noise range,
  which isolates the noise shift;
- `train`: the training generator variant (in-domain);
- `test`: the benchmark's own test phantoms (dataset seed 303, as `bench/accuracy.py` scores them), for a
  replication of a dev finding on cases that no dev decision used;
- `heldout-FACTOR`: the held-out variant with one factor set back to the training variant's,
  which measures what that shift costs: `orient` (stored orientations), `spacing` (voxel
  sizes), `calib` (scanner HU calibration), `distract` (vessel-like distractors), `masks` (the
  real-mask pool and share).
`--peer NAME` adds a peer of `bench/accuracy.py` (e.g. the MONAI UNet) trained per seed on the
same loader and labelled cases for the first arm's training time, its size prior tuned on the
same validation scans, and scored on the same dev sets: the equal-time comparison on each dev
set, in-domain included, which the benchmark's test set (held-out variant only) cannot show.
Prints mean Dice per arm, seed and dev set, and the paired differences of each arm against
the first over (seed, volume) pairs. Finished arms are cached in the workdir's
recipe_ab.jsonl, keyed by arm name and overrides, so a rerun resumes; an arm cached under another
CPU recipe (`finetune --quick`'s overrides, recorded with it) stops the run instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
from pathlib import Path

import numpy as np

import accuracy as A
from lnfm.data import benchmark as B
from lnfm.data import synth as S
from lnfm.data.synth import SynthConfig, heldout_config, write_dataset
from lnfm.eval.stats import fmt_ci, fmt_p, paired
from lnfm.jobs.export_meta import read_meta
from lnfm.jobs.heldout import evaluate, train_peer_model

DEV_SEEDS = (505, 606)
_TRAIN, _HELD = S.VARIANTS["train"], S.VARIANTS["heldout"]
# Per factor: the Variant fields and SynthConfig fields set back to the training variant's.
FACTORS = {
    "orient": ({"orientations": _TRAIN.orientations}, {}),
    "spacing": ({"slice_choices": _TRAIN.slice_choices},
                {"spacing_inplane": SynthConfig().spacing_inplane, "slice_thickness": SynthConfig().slice_thickness}),
    "calib": ({"hu_scale": _TRAIN.hu_scale, "hu_offset": _TRAIN.hu_offset}, {}),
    "distract": ({"distractors": _TRAIN.distractors, "oblique_distractors": _TRAIN.oblique_distractors}, {}),
    "masks": ({"mask_pool": _TRAIN.mask_pool}, {"real_shape_fraction": SynthConfig().real_shape_fraction}),
}


BASE_STEPS = 600  # the base arm's length in every comparison in docs/results and docs/finetuning.md


def base_preset() -> A.Preset:
    """The cpu preset at BASE_STEPS, so the documented commands still reproduce their figures; no target
    pool (an arm names its own paste stores)."""
    cpu = A.PRESETS["cpu"]
    return dataclasses.replace(cpu, steps=BASE_STEPS, data=dataclasses.replace(cpu.data, target=0))


def dev_config(kind: str, base: SynthConfig, seed: int) -> SynthConfig:
    if kind == "heldout":
        return heldout_config(base, num_cases=8, seed=seed)
    if kind == "heldout_train_noise":
        return heldout_config(base, num_cases=8, seed=seed, noise_hu=SynthConfig().noise_hu)
    if kind == "train":
        return SynthConfig(**{**base.__dict__, "num_cases": 8, "seed": seed})
    factor = kind.removeprefix("heldout-")
    if factor in FACTORS:
        variant_fields, cfg_fields = FACTORS[factor]
        S.VARIANTS[kind] = dataclasses.replace(_HELD, **variant_fields)  # a bench-only variant
        return dataclasses.replace(heldout_config(base, num_cases=8, seed=seed, **cfg_fields), variant=kind)
    raise SystemExit(f"unknown dev set '{kind}' (heldout, heldout_train_noise, train, "
                     f"{', '.join('heldout-' + f for f in FACTORS)})")


def dev_cases(work: Path, shape, kind: str, folder_prefix: str | None = None, site: str = "pelvis") -> list[B.TestCase]:
    """Dev phantoms of `site` and set `kind` for seeds DEV_SEEDS, written once under `work`."""
    base = SynthConfig(site=site, shape=tuple(shape), gallery=False)
    cases = []
    for s in DEV_SEEDS:
        folder = work / f"{folder_prefix or 'phantoms_' + kind}{s}"
        if not (folder / "dataset.json").is_file():
            write_dataset(dev_config(kind, base, s), folder)
        cases += [B.TestCase(c, Path(i), Path(lb)) for c, i, lb, _ in B.phantom_rows(folder, f"d{s}_", "test", True)]
    return cases


def run_arm(name: str, overrides: list[str], seed: int, preset: A.Preset, bench: B.Benchmark, pre: Path,
            devs: dict[str, list[B.TestCase]], work: Path) -> dict:
    cfg = A.finetune_config(preset, bench, str(pre), 4, seed, extra=tuple(overrides))
    summary, fn, meta = A.finetune_and_export(cfg, work / "runs" / f"{name}_s{seed}")
    row = {"arm": name, "overrides": overrides, "recipe": A.recipe(preset), "seed": seed,
           "train_s": summary["train_time_s"],
           "val_dice": summary.get("best_val_dice")}
    return score_on(row, fn, meta, devs, preset.overlap)


def score_on(row: dict, fn, meta, devs: dict[str, list[B.TestCase]], overlap: float) -> dict:
    """`row` with each dev set's per-volume Dice and node sensitivity."""
    for kind, cases in devs.items():
        scored, _ = evaluate(fn, meta, cases, overlap)
        row[f"dice_{kind}"] = [c["dice"] for c in scored]
        row[f"sens_{kind}"] = [c.get("node_sensitivity") for c in scored]
    return row


def run_peer(name: str, label: str, seed: int, first: dict, preset: A.Preset, bench: B.Benchmark,
             devs: dict[str, list[B.TestCase]], work: Path) -> dict:
    """Peer `name` trained for the first arm's time on its labelled cases, scored on every dev set;
    cached as arm `label`."""
    run_dir = work / "runs" / f"{first['arm']}_s{seed}"
    summary = json.loads((run_dir / "summary.json").read_text())
    fn, meta, record = train_peer_model(
        name, meta=read_meta(A.export_dir(run_dir)), store=bench.labelled_store,
        train_ids=summary["train_ids"], loader=A.peer_loader(preset, bench, 4, seed)[0],
        overlap=preset.overlap, seed=seed, seconds=summary["train_time_s"], val=bench.val_cases)
    row = {"arm": label, "overrides": [f"peer, {first['arm']}'s time"], "recipe": A.recipe(preset), "seed": seed,
           "train_s": record["train_time_s"], "steps": record["steps"], "val_dice": None}
    return score_on(row, fn, meta, devs, preset.overlap)


def cached_row(rows: dict, key: tuple, preset: A.Preset, cache: Path) -> dict | None:
    """The cached row of (arm, seed), or None; one cached under another CPU recipe stops the run."""
    r = rows.get(key)
    if r is not None and r.get("recipe") != A.recipe(preset):
        raise SystemExit(f"{cache}: '{key[0]}' ran under another finetuning recipe ({r.get('recipe')}); "
                         f"use a new --workdir")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", required=True,
                    help='NAME=OVERRIDES: an arm and its space-separated finetuning overrides (NAME= for none)')
    ap.add_argument("--dev", default="heldout",
                    help="comma-separated dev sets (heldout, heldout_train_noise, train, test, heldout-FACTOR)")
    ap.add_argument("--peer", default=None, help="a peer (unet, dynunet) trained for the first arm's time")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workdir", default="runs/recipe_ab")
    args = ap.parse_args()
    arms = {}
    for spec in args.arm:
        name, _, over = spec.partition("=")
        arms[name] = shlex.split(over)
    kinds = args.dev.split(",")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    preset = base_preset()
    bench = B.build(preset.data, work)
    devs = {k: bench.test if k == "test" else dev_cases(work, preset.data.shape, k) for k in kinds}
    pre = A.pretrain(preset, bench, work)
    cache = work / "recipe_ab.jsonl"
    lines = cache.read_text().splitlines() if cache.is_file() else []
    rows = {(r["arm"], r["seed"]): r for r in map(json.loads, lines)}
    seeds = range(args.seeds)
    for seed, (name, over) in itertools.product(seeds, arms.items()):
        r = cached_row(rows, (name, seed), preset, cache)
        if r is None or r["overrides"] != over or any(f"dice_{k}" not in r for k in kinds):
            if r is not None and r["overrides"] != over:
                raise SystemExit(f"arm '{name}' ran with other overrides ({r['overrides']}): rename it")
            rows[(name, seed)] = run_arm(name, over, seed, preset, bench, pre, devs, work)
            with cache.open("a") as f:
                f.write(json.dumps(rows[(name, seed)]) + "\n")
    names = list(arms)
    if args.peer:
        first = names[0]
        peer = f"{args.peer} ({first}'s time)"
        for seed in seeds:
            r = cached_row(rows, (peer, seed), preset, cache)
            if r is None or any(f"dice_{k}" not in r for k in kinds):
                rows[(peer, seed)] = run_peer(args.peer, peer, seed, rows[(first, seed)], preset, bench, devs, work)
                with cache.open("a") as f:
                    f.write(json.dumps(rows[(peer, seed)]) + "\n")
        names.append(peer)
    for name, kind in itertools.product(names, kinds):
        dice = [round(float(np.mean(rows[(name, s)][f"dice_{kind}"])), 3) for s in seeds]
        val = [rows[(name, s)]["val_dice"] for s in seeds]  # None for a peer
        train_s = [round(rows[(name, s)]["train_s"]) for s in seeds]
        print(f"{name} on {kind}: Dice per seed {dice}, mean {np.mean(dice):.3f}; val {val}; training s {train_s}")
    for name, kind in itertools.product(names[1:], kinds):
        d = paired(np.concatenate([rows[(name, s)][f"dice_{kind}"] for s in seeds]),
                   np.concatenate([rows[(names[0], s)][f"dice_{kind}"] for s in seeds]))
        print(f"{name} - {names[0]} on {kind}: {fmt_ci(d['diff'], d['ci_lo'], d['ci_hi'])} Dice over {d['n']} "
              f"(seed, volume) pairs, p = {fmt_p(d['p_ttest'])}")


if __name__ == "__main__":
    main()
