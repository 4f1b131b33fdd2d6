"""Decoder heads and sliding-window overlaps, on held-out phantoms (docs/finetuning.md).

    python bench/head_overlap.py [--site pelvis] [--heads fine,unetr,unetr:feature_size=8] [--overlaps 0.5,0.25] \
        [--seeds 3] [--window 64,64,48] [--spacing 1.5,1.5,1.5] [--workdir DIR]

`bench/accuracy.py`'s cpu preset (its phantoms, its MAE pretraining, `finetune --quick`'s
recipe with 4 labelled cases and `recipe_ab.BASE_STEPS` = 600 steps), with `head.kind` set per
arm (`KIND:OPTION=VALUE;...` also sets `head.options`). Each finetuned model is exported and
scored through `lnfm.jobs.predict` at every overlap on dev phantoms of the held-out generator
variant (dataset seeds 505 and 606, never the benchmark's test seed). `--site` makes every
phantom set from that site's anatomy and prepares the stores at its preset's spacing (the
default, pelvis, is the cpu preset as it is). `--window` trains and predicts with that patch
instead of the recipe's 32³ (arms named HEAD@X,Y,Z), to see how the overlap's effect changes with
the window's size. `--spacing` prepares the stores (and so trains and predicts) on another grid than the
site preset's, to see what a coarser grid costs. Prints mean Dice per seed and the paired
differences over (seed, volume) pairs; finished arms are cached in the workdir's
heads_ab.jsonl, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

import accuracy as A
from inference import head_overrides
import recipe_ab
from lnfm.data import benchmark as B
from lnfm.data.prepare import preset_spacing
from lnfm.eval.stats import fmt_ci, fmt_p, paired
from lnfm.jobs.heldout import evaluate

def dev_cases(work: Path, shape, site: str) -> list[B.TestCase]:
    return recipe_ab.dev_cases(work, shape, "heldout", folder_prefix="phantoms_dev", site=site)


def window_overrides(window: str | None) -> list[str]:
    """site.patch and the ViT's grid (its sincos table takes any size) for a `--window` X,Y,Z."""
    if not window:
        return []
    size = "[" + window + "]"
    return [f"site.patch={size}", f"model.img_size={size}"]


def run_arm(head: str, seed: int, preset: A.Preset, bench: B.Benchmark, pre: Path, dev, overlaps, work: Path,
            window: str | None = None, spacing: str | None = None) -> dict:
    grid = [f"site.spacing=[{spacing}]"] if spacing else []  # the stores' grid, which predict then resamples to
    cfg = A.finetune_config(preset, bench, str(pre), 4, seed,
                            extra=tuple(head_overrides(head) + window_overrides(window) + grid))
    head = f"{head}@{window}" if window else head
    folder = head.replace(":", "_").replace(";", "_").replace("=", "").replace("@", "_w").replace(",", "x")
    summary, fn, meta = A.finetune_and_export(cfg, work / "runs" / f"{folder}_s{seed}")
    row = {"head": head, "seed": seed, "train_s": summary["train_time_s"]}
    for ov in overlaps:
        cases, infer = evaluate(fn, meta, dev, ov)
        row[f"dice_{ov}"], row[f"infer_{ov}"] = [c["dice"] for c in cases], infer
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default="pelvis", help="phantom anatomy and finetuning site preset")
    ap.add_argument("--heads", default="fine,unetr")
    ap.add_argument("--overlaps", default="0.5,0.25")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--window", default=None, help="X,Y,Z: train and predict with this patch instead of 32³")
    ap.add_argument("--spacing", default=None, help="X,Y,Z mm: prepare, train and predict on this grid instead of "
                                                    "the site preset's (use its own --workdir)")
    ap.add_argument("--workdir", default=None, help="default: runs/head_overlap (pelvis), runs/head_overlap_SITE")
    args = ap.parse_args()
    heads, overlaps = args.heads.split(","), [float(o) for o in args.overlaps.split(",")]
    work = Path(args.workdir or "runs/head_overlap" + ("" if args.site == "pelvis" else f"_{args.site}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = recipe_ab.base_preset()  # pelvis; its stores are at the pelvis preset's spacing already
    spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else preset_spacing(args.site)
    preset = dataclasses.replace(base, data=dataclasses.replace(base.data, site=args.site, spacing=spacing))
    bench = B.build(preset.data, work)
    dev = dev_cases(work, preset.data.shape, preset.data.site)
    pre = A.pretrain(preset, bench, work)
    cache = work / "heads_ab.jsonl"
    lines = cache.read_text().splitlines() if cache.is_file() else []
    rows = {(r["head"], r["seed"]): r for r in map(json.loads, lines)}
    trained = heads
    heads = [f"{h}@{args.window}" if args.window else h for h in heads]
    for seed, (head, kind) in itertools.product(range(args.seeds), zip(heads, trained)):
        if (head, seed) not in rows or any(f"dice_{ov}" not in rows[(head, seed)] for ov in overlaps):
            rows[(head, seed)] = run_arm(kind, seed, preset, bench, pre, dev, overlaps, work, args.window, args.spacing)
            with cache.open("a") as f:
                f.write(json.dumps(rows[(head, seed)]) + "\n")
    seeds = range(args.seeds)
    for head, ov in itertools.product(heads, overlaps):
        dice = [round(float(np.mean(rows[(head, s)][f"dice_{ov}"])), 3) for s in seeds]
        train_s = [round(rows[(head, s)]["train_s"]) for s in seeds]
        print(f"{head} overlap {ov}: Dice per seed", dice, "training s", train_s)

    def compare(label, a, b):
        d = paired(np.concatenate([a(s) for s in seeds]), np.concatenate([b(s) for s in seeds]))
        print(f"{label}: {fmt_ci(d['diff'], d['ci_lo'], d['ci_hi'])} Dice over {d['n']} (seed, volume) pairs, "
              f"p = {fmt_p(d['p_ttest'])}")

    for h1, h2 in itertools.combinations(heads, 2):
        compare(f"{h1} - {h2} at overlap {overlaps[0]}", lambda s: rows[(h1, s)][f"dice_{overlaps[0]}"],
                lambda s: rows[(h2, s)][f"dice_{overlaps[0]}"])
    for head, (o1, o2) in itertools.product(heads, itertools.combinations(overlaps, 2)):
        compare(f"{head}: overlap {o1} - {o2}", lambda s: rows[(head, s)][f"dice_{o1}"],
                lambda s: rows[(head, s)][f"dice_{o2}"])


if __name__ == "__main__":
    main()
