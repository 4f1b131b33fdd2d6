"""Lymph-node segmentation accuracy of LNFM against the peers a user would pick instead.

    python bench/accuracy.py --preset cpu            # hours on 2 CPU cores (--arms, --peers, --seeds: a subset)
    python bench/accuracy.py --preset gpu            # the full grid, for an accelerator
    python bench/accuracy.py --smoke --out DIR       # seconds-scale run of every arm (the test suite)

Data (`lnfm.data.benchmark`): an unlabelled pool for self-supervised pretraining, a
labelled pool the few-shot subsets come from, and held-out test phantoms from the
held-out generator variant (other spacing, orientation, noise, HU calibration, real
node masks and distractors); no model, and no pretraining, sees a test volume.

Arms, per seed (its own labelled subset and initialisation) and labelled-case count:
- `lnfm_pretrained`: MAE pretraining on the unlabelled pool, then the finetuning job
  with the site's default head and strategy (`lnfm.jobs.finetune.run`; the cpu preset with
  `finetune --quick`'s CPU recipe, as `make demo` runs it), exported and run
  through `lnfm.jobs.predict`;
- `lnfm_scratch`: the same finetuning from a random encoder of the same architecture,
  every layer trained (`strategy.freeze=none`);
- `lnfm_selftrain`: `lnfm_pretrained` with self-training on the unlabelled pool
  (`finetune --unlabelled`: the pretrained model above, as teacher, pseudo-labels the pool,
  and a student trains on the labelled subset plus the pseudo-labelled scans);
- `lnfm_paste`: `lnfm_pretrained` with node paste into the unlabelled pool (`finetune --paste-into`:
  a share of the patches are pool scans with a labelled node pasted into their fat);
- `lnfm_paste_target`: node paste into the unlabelled pool plus the target pool, unlabelled
  phantoms of the held-out variant (never a test phantom), at `loader.paste_p` 0.3: a clinic
  pasting its few labelled nodes into its own unlabelled scans. The plain peers use no unlabelled
  scan, so this arm is reported apart from `lnfm_paste` (a `_paste` peer pastes into the first pool only);
- peers (`lnfm.segmentation.peers`): MONAI UNet, DynUNet with nnU-Net's 3d_fullres topology,
  SwinUNETR, each trained on the same loader's patches twice: with LNFM's patch budget
  (same steps x batch x patch) and with the training wall time of LNFM's longest arm
  (`lnfm_selftrain`: teacher, pseudo-labelling and student). `--peers unet_paste` (any peer
  with `_paste`) trains that peer on `lnfm_paste`'s loader: its labelled nodes are also pasted
  into the unlabelled pool, with the ignored voxels left out of its loss.

Every arm is scored the same way: `lnfm.jobs.predict.predict_volume` (the preprocessing,
sliding window and post-processing LNFM's export records) turns each raw held-out
scan into a mask on the scan's own grid, and `lnfm.eval.evaluate_case` compares it
with the reference mask there (node sensitivity at IoU >= 0.5). Statistics are over
seeds (`lnfm.eval.stats`). Finished arms are cached in the workdir, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

from lnfm.models import onednn
from lnfm.config import to_dict
from lnfm.data import benchmark as B
from lnfm.eval.metrics import summarize
from lnfm.eval.stats import fmt_ci, fmt_p, mean_ci, paired
from lnfm.jobs import finetune as F
from lnfm.jobs import pretrain as P
from lnfm.jobs.export import export_model
from lnfm.jobs.export_meta import read_meta
from lnfm.jobs.finetune_config import model_overrides
from lnfm.jobs.heldout import evaluate, paste_hosts, train_and_score_peer
from lnfm.jobs.predict import load_predictor
from lnfm.segmentation.fewshot import select_subset
from lnfm.segmentation.peers import PEERS
from lnfm.workdir import WorkdirError, atomic_write_csv, atomic_write_text, check_resume

log = logging.getLogger("lnfm.bench.accuracy")
REPO = Path(__file__).resolve().parents[1]
LNFM_ARMS = ("lnfm_pretrained", "lnfm_scratch", "lnfm_selftrain", "lnfm_paste", "lnfm_paste_target")
BUDGETS = ("patches", "time")
# A peer NAME_paste trains on the loader of `lnfm_paste` (its nodes also pasted into the unlabelled pool):
# whether node paste helps any network, or LNFM only.
PEER_ARMS = (*PEERS, *(f"{p}_paste" for p in PEERS))
METRICS = ("dice", "node_sensitivity", "fp_per_volume", "hd95", "sens_lt5", "sens_5to10", "sens_ge10")
LABELS = {"dice": "Dice", "node_sensitivity": "node sens. (IoU>=0.5)", "fp_per_volume": "FP / volume",
          "hd95": "HD95 (mm)", "sens_lt5": "sens. <5 mm", "sens_5to10": "sens. 5-10 mm", "sens_ge10": "sens. >=10 mm"}


@dataclasses.dataclass
class Preset:
    data: B.BenchmarkSpec
    seeds: int  # seeds 0..seeds-1
    num_labeled: list[int]
    steps: int  # LNFM finetuning steps (and the peers' patch budget)
    patch: int | None  # training patch edge; None keeps the site preset's
    pretrain_config: str
    pretrain_steps: int
    peers: tuple[str, ...] = ("unet", "dynunet", "swinunetr")
    time_cap_s: float | None = None  # cap of the equal-time budget (the smoke run only: it checks the code path)
    overlap: float = 0.5  # sliding-window overlap of every arm's evaluation (and of LNFM's own validation)
    quick: bool = False  # LNFM finetunes with `finetune --quick`'s CPU recipe (patch, LR, warm-up, head)
    lnfm_arms: tuple[str, ...] = LNFM_ARMS
    budgets: tuple[str, ...] = BUDGETS  # the peers' training budgets


PRESETS = {
    # 5 seeds x 4 labelled cases at `finetune --quick`'s 2800 steps (the goal's 10-minute point): each LNFM
    # arm 10-12 minutes per seed on 2 idle cores, each equal-time peer as long; `--arms lnfm_pretrained
    # --peers unet` is the peer comparison alone (about 25 minutes per seed). SwinUNETR (seconds per CPU
    # step) and the labelled-count grid are the gpu preset's.
    "cpu": Preset(B.BenchmarkSpec(unlabelled=24, labelled=8, val=2, test=8, target=24, shape=(96, 96, 48)), seeds=5,
                  num_labeled=[4], steps=2800, patch=32, pretrain_config="vit_tiny", pretrain_steps=600,
                  peers=("unet", "dynunet"), overlap=0.25, quick=True),
    "gpu": Preset(B.BenchmarkSpec(unlabelled=40, labelled=16, val=4, test=16, target=40, shape=(160, 160, 96)),
                  seeds=5,
                  num_labeled=[1, 2, 4, 8, 16], steps=2000, patch=None, pretrain_config="vit_b",
                  pretrain_steps=20000),
    "smoke": Preset(B.BenchmarkSpec(unlabelled=2, labelled=2, val=1, test=1, target=1, shape=(48, 48, 32)), seeds=1,
                    num_labeled=[1], steps=2, patch=32, pretrain_config="vit_tiny", pretrain_steps=2, time_cap_s=1.0,
                    overlap=0.25, quick=True,
                    # a 2-step teacher may find no node to pseudo-label: the job's own tests cover self-training
                    lnfm_arms=("lnfm_pretrained", "lnfm_scratch", "lnfm_paste", "lnfm_paste_target")),
}


# ----------------------------------------------------------------------------- LNFM arms


def pretrain(preset: Preset, bench: B.Benchmark, workdir: Path) -> Path:
    out = workdir / "pretrain"
    if not (out / "done.json").is_file():
        cfg = P.load_pretrain_config(preset.pretrain_config, _pretrain_overrides(preset))
        t0 = time.time()
        if P.run(cfg, [str(bench.unlabelled_store)], out) != 0:
            raise RuntimeError(f"{out}: pretraining failed")
        atomic_write_text(out / "done.json", json.dumps({"seconds": time.time() - t0}))
    return out


def _pretrain_overrides(preset: Preset) -> list[str]:
    return [f"train.steps={preset.pretrain_steps}", f"checkpoint.every={max(preset.pretrain_steps, 1)}",
            "train.image_every=0"]


def finetune_config(preset: Preset, bench: B.Benchmark, init: str, n: int, seed: int, extra: tuple[str, ...] = ()):
    """The site's default head and strategy; the scratch arm gets the pretrained architecture.
    `extra` overrides go last (bench/head_overlap.py sets head.kind)."""

    site = preset.data.site
    over = [f"train.seed={seed}", f"train.steps={preset.steps}", "train.eval_every=0",
            f"checkpoint.every={preset.steps}", f"train.log_every={max(1, preset.steps // 10)}",
            f"inference.overlap={preset.overlap}"]
    if preset.patch is not None:
        over.append(f"site.patch=[{preset.patch},{preset.patch},{preset.patch}]")
    if init == "scratch":  # a random encoder is trained whole: freezing random layers helps no one
        over.append("strategy.freeze=none")
        over += model_overrides(P.load_pretrain_config(preset.pretrain_config, _pretrain_overrides(preset)).model)
    over += list(extra)
    return F.load_finetune_config(site, over, init=init, data=[str(bench.labelled_store)], num_labeled=n,
                                  repeats=1, quick=preset.quick)


def recipe(preset: Preset) -> list[str]:
    """The finetuning overrides every LNFM arm of `preset` starts from (`finetune --quick`'s CPU recipe, or
    none): recorded with cached results, which a changed recipe makes stale."""
    return list(F.QUICK) if preset.quick else []


def export_dir(run_dir: Path) -> Path:
    """Where an arm's finetuning run `run_dir` is exported: RUN_export beside it."""
    return run_dir.with_name(run_dir.name + "_export")


def finetune_and_export(cfg, run_dir: Path) -> tuple[dict, object, object]:
    """Finetune `cfg` into `run_dir` (kept when it finished before), export it next to it as
    RUN_export; (its summary, the export's probability function, its metadata)."""
    if (run_dir / "summary.json").is_file():  # a finished run is reused only for the same config, every section
        try:
            check_resume(run_dir, cfg, tuple(to_dict(cfg)), has_run=True)
        except WorkdirError as e:
            raise SystemExit(str(e)) from None
    elif F.run(cfg, run_dir) != 0:
        raise RuntimeError(f"{run_dir}: finetuning failed")
    export = export_dir(run_dir)
    export_model(run_dir, export, "orbax", force=True)
    fn, meta = load_predictor(export)
    return json.loads((run_dir / "summary.json").read_text()), fn, meta


def run_lnfm(arm: str, preset: Preset, bench: B.Benchmark, pre: Path, n: int, seed: int, workdir: Path) -> dict:
    init = "scratch" if arm == "lnfm_scratch" else str(pre)
    pool = json.dumps([str(bench.unlabelled_store)])
    both = json.dumps([str(bench.unlabelled_store), str(bench.target_store)])
    # paste_p 0.3 with both pools: the setting measured on dev phantoms (docs/finetuning.md, "Node paste")
    extra = {"lnfm_selftrain": (f"unlabelled={pool}",), "lnfm_paste": (f"paste_into={pool}",),
             "lnfm_paste_target": (f"paste_into={both}", "loader.paste_p=0.3")}.get(arm, ())
    cfg = finetune_config(preset, bench, init, n, seed, extra)
    summary, fn, meta = finetune_and_export(cfg, workdir / "runs" / f"{arm}_n{n}_s{seed}")
    cases, infer = evaluate(fn, meta, bench.test, preset.overlap)
    return {"train_ids": summary["train_ids"], "train_time_s": summary["train_time_s"], "steps": preset.steps,
            "params": summary["trainable_params"], "infer_s_per_volume": infer, "cases": cases}


# ----------------------------------------------------------------------------- peers


def peer_loader(preset: Preset, bench: B.Benchmark, n: int, seed: int):
    """The loader settings and finetuning config LNFM trains with, for a peer on the same patches."""
    cfg = finetune_config(preset, bench, "scratch", n, seed)
    return dataclasses.replace(cfg.loader, batch_size=cfg.train.global_batch), cfg


def run_peer(name: str, budget: str, preset: Preset, bench: B.Benchmark, n: int, seed: int, workdir: Path,
             lnfm_time: float, lnfm_arm: str) -> dict:
    """A peer trained on LNFM's patches and scored through the same predict contract: that of this seed's
    `lnfm_arm` export (every LNFM arm shares one; the arm must have run)."""
    loader, cfg = peer_loader(preset, bench, n, seed)
    meta = read_meta(export_dir(workdir / "runs" / f"{lnfm_arm}_n{n}_s{seed}"))
    spend = {"steps": cfg.train.steps} if budget == "patches" else {"seconds": lnfm_time}
    hosts = paste_hosts(bench.unlabelled_store) if name.endswith("_paste") else []
    return train_and_score_peer(name.removesuffix("_paste"), meta=meta, store=bench.labelled_store,
                                train_ids=select_subset(bench.pool, n, seed), loader=loader, test=bench.test,
                                val=bench.val_cases, overlap=preset.overlap, seed=seed, paste_into=hosts, **spend)


# ----------------------------------------------------------------------------- report


def seed_row(arm: str, budget: str, n: int, seed: int, result: dict) -> dict:
    agg = summarize([{k: v for k, v in c.items() if k != "case_id"} for c in result["cases"]])
    row = {"arm": arm, "budget": budget, "num_labeled": n, "seed": seed, "test_volumes": len(result["cases"])}
    row.update({k: agg.get(k) for k in METRICS})
    row["hd95_n_inf"] = agg.get("hd95_n_inf", 0)
    row.update({k: result[k] for k in ("train_time_s", "steps", "params", "infer_s_per_volume")})
    return row


def _arm_label(arm: str, budget: str) -> str:
    return arm if arm in LNFM_ARMS else f"{arm} ({budget})"


def _series(rows: list[dict]) -> list[tuple[str, str]]:
    seen = []
    for r in rows:
        if (r["arm"], r["budget"]) not in seen:
            seen.append((r["arm"], r["budget"]))
    return seen


def _values(rows, arm, budget, n, key) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rows if (r["arm"], r["budget"], r["num_labeled"]) == (arm, budget, n)}


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{platform.node() or 'host'}: {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


def markdown(rows: list[dict], preset_name: str, preset: Preset, header: dict, complete: bool) -> str:
    d = preset.data
    lines = ["# LN segmentation accuracy: LNFM vs the peers, on held-out phantoms", "",
             f"- date: {header['date']}", f"- machine: {header['machine']}", f"- commit: {header['commit']}",
             # the command that started the run (a workdir from before it was recorded: unknown)
             f"- command: `{header.get('command', 'not recorded')}`",
             *(f"- resumed {r['date']} at commit {r['commit']}: `{r['command']}` (arms not finished before run then)"
               for r in header.get("resumed", [])),
             f"- preset `{preset_name}`: site {d.site}; {d.unlabelled} unlabelled, {d.labelled} labelled + {d.val} "
             f"validation phantoms (training variant); {d.test} held-out test phantoms (held-out variant); "
             f"{d.target} unlabelled target-pool phantoms (held-out variant, `lnfm_paste_target` only); "
             f"{preset.seeds} seeds; {preset.steps} finetuning steps; patch "
             f"{preset.patch or 'site preset'}; pretraining {preset.pretrain_config} x {preset.pretrain_steps} steps",
             "" if complete else "- **incomplete run**: only the seeds and arms listed below finished", "",
             "Values: mean over seeds [95% CI, Student t]; each seed's value is the mean over the held-out test "
             "volumes, scored on each scan's own grid. Budget `patches`: the same number of training patches as "
             "LNFM; `time`: the same training wall time as LNFM's longest arm (of those run). HD95 averages finite "
             "values (`inf` when a volume has no predicted node).", ""]
    series = _series(rows)
    for n in sorted({r["num_labeled"] for r in rows}):
        lines += [f"## {n} labelled case(s)", "",
                  "| arm | seeds | " + " | ".join(LABELS[k] for k in METRICS) + " | train s | steps | infer s/vol |",
                  "|---" * (len(METRICS) + 5) + "|"]
        for arm, budget in series:
            sub = [r for r in rows if (r["arm"], r["budget"], r["num_labeled"]) == (arm, budget, n)]
            if not sub:
                continue
            cells = [fmt_ci(*mean_ci([r[k] for r in sub])[:3], digits=1 if k == "hd95" else 3) for k in METRICS]
            t = np.mean([r["train_time_s"] for r in sub])
            lines.append(f"| {_arm_label(arm, budget)} | {len(sub)} | " + " | ".join(cells) +
                         f" | {t:.0f} | {np.mean([r['steps'] for r in sub]):.0f} | "
                         f"{np.mean([r['infer_s_per_volume'] for r in sub]):.2f} |")
        lines += ["", f"### Paired differences over seeds, {n} labelled case(s)", "",
                  "| comparison | metric | mean difference [95% CI] | pairs | p (paired t) | p (Wilcoxon) |",
                  "|---|---|---|---|---|---|"]
        comparisons = [(("lnfm_pretrained", "both"), ("lnfm_scratch", "both")),
                       (("lnfm_selftrain", "both"), ("lnfm_pretrained", "both")),
                       (("lnfm_paste", "both"), ("lnfm_pretrained", "both")),
                       (("lnfm_paste_target", "both"), ("lnfm_paste", "both"))]
        comparisons += [((lnfm, "both"), (arm, budget)) for lnfm in LNFM_ARMS for arm, budget in series
                        if arm not in LNFM_ARMS]
        comparisons += [((arm, budget), (arm.removesuffix("_paste"), budget)) for arm, budget in series
                        if arm.endswith("_paste") and arm not in LNFM_ARMS]
        for a, b in comparisons:
            for key in ("dice", "node_sensitivity"):
                va, vb = _values(rows, *a, n, key), _values(rows, *b, n, key)
                seeds = sorted(set(va) & set(vb))
                if not seeds:
                    continue
                p = paired([va[s] for s in seeds], [vb[s] for s in seeds])
                lines.append(f"| {_arm_label(*a)} - {_arm_label(*b)} | {LABELS[key]} | "
                             f"{fmt_ci(p['diff'], p['ci_lo'], p['ci_hi'])} | {p['n']} | {fmt_p(p['p_ttest'])} | "
                             f"{fmt_p(p['p_wilcoxon'])} |")
        lines.append("")
    lines += ["Files: `accuracy.csv` (one row per arm, budget, labelled count and seed), `accuracy_cases.csv` "
              "(one row per test volume), `accuracy_dice_vs_labelled.png`, `accuracy_dice_vs_time.png`.", ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, budget) in enumerate(series):
        ns = sorted({r["num_labeled"] for r in rows if (r["arm"], r["budget"]) == (arm, budget)})
        stats = [mean_ci([r["dice"] for r in rows if (r["arm"], r["budget"], r["num_labeled"]) == (arm, budget, n)])
                 for n in ns]
        m = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1], s[2] - s[0]] if not math.isnan(s[1]) else [0, 0] for s in stats]).T
        ax.errorbar(ns, m, yerr=err, marker="o", capsize=3, color=f"C{i}", label=_arm_label(arm, budget),
                    linestyle="-" if arm in LNFM_ARMS or budget == "time" else "--")
    ns = sorted({r["num_labeled"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("held-out Dice (mean over seeds, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "accuracy_dice_vs_labelled.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, budget) in enumerate(series):
        sub = [r for r in rows if (r["arm"], r["budget"]) == (arm, budget)]
        ax.scatter([r["train_time_s"] for r in sub], [r["dice"] for r in sub], color=f"C{i}", s=18,
                   marker="o" if arm in LNFM_ARMS else ("s" if budget == "time" else "^"),
                   label=_arm_label(arm, budget))
    ax.set_xscale("log")
    ax.set_xlabel("training wall time per run (s)")
    ax.set_ylabel("held-out Dice (one point per seed and labelled count)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "accuracy_dice_vs_time.png")


def report(results: dict, out: Path, preset_name: str, preset: Preset, header: dict,
           complete: bool) -> None:
    rows, case_rows = [], []
    order = [*LNFM_ARMS, *PEER_ARMS]
    for (arm, budget, n, seed), res in sorted(results.items(), key=lambda kv: (
            order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0][1], kv[0][2], kv[0][3])):
        rows.append(seed_row(arm, budget, n, seed, res))
        case_rows += [{"arm": arm, "budget": budget, "num_labeled": n, "seed": seed, **c} for c in res["cases"]]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "accuracy.csv", rows)
    atomic_write_csv(out / "accuracy_cases.csv", case_rows)
    plots(rows, out)
    atomic_write_text(out / "accuracy.md", markdown(rows, preset_name, preset, header, complete))


# ----------------------------------------------------------------------------- driver


def run(preset_name: str, preset: Preset, workdir: Path, out: Path, command: str, report_only: bool = False) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    workdir.mkdir(parents=True, exist_ok=True)
    # Seeds and arms of one shape compile the same programs: compile each once.
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                                  str(workdir / "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    header = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "commit": commit(), "recipe": recipe(preset), "command": command}
    t_start = time.time()
    this_run = {k: header[k] for k in ("date", "commit")} | {"command": command}
    # True once header.json describes this invocation: a new run's header, or a resumption line added
    # when a resumed run computes its first arm.
    described = not (workdir / "header.json").is_file()
    if described:
        atomic_write_text(workdir / "header.json", json.dumps(header))
    else:  # the run's own date, machine and commit, also when resumed
        header = json.loads((workdir / "header.json").read_text())
        if not report_only and header.get("recipe") != recipe(preset):  # cached arms would mix two recipes
            raise SystemExit(f"{workdir}: its runs used another finetuning recipe ({header.get('recipe')}, now "
                             f"{recipe(preset)}); use a new --workdir")
    if report_only:  # whatever finished, e.g. of a run that was stopped
        keys = [tuple(int(x) if x.isdigit() else x for x in p.stem.rsplit("_", 3)) for p in
                sorted((workdir / "results").glob("*.json"))]
        results = {k: json.loads((workdir / "results" / ("_".join(map(str, k)) + ".json")).read_text())
                   for k in keys}
        report(results, out, preset_name, preset, header, complete=False)
        return 0
    bench = B.build(preset.data, workdir / "data")
    log.info("data ready (%.0f s): %d pool, %d val, %d held-out test", time.time() - t_start, len(bench.pool),
             len(bench.val), len(bench.test))
    pre = pretrain(preset, bench, workdir)
    results: dict = {}
    cache = workdir / "results"
    cache.mkdir(exist_ok=True)

    def cached(key: tuple, fn) -> dict:
        nonlocal described
        path = cache / ("_".join(map(str, key)) + ".json")
        if not path.is_file():
            if not described:  # a resumed or extended run: the report says when, at which commit, by which command
                header["resumed"] = header.get("resumed", []) + [this_run]
                atomic_write_text(workdir / "header.json", json.dumps(header))
                described = True
            t0 = time.time()
            res = fn()
            atomic_write_text(path, json.dumps(res, indent=1, default=float))
            log.info("%s done in %.0f s (Dice %.3f)", key, time.time() - t0,
                     np.mean([c["dice"] for c in res["cases"]]))
        results[key] = json.loads(path.read_text())
        return results[key]

    for n in preset.num_labeled:  # every seed of one count first: an interrupted run still has statistics
        for seed in range(preset.seeds):
            for arm in preset.lnfm_arms:
                cached((arm, "both", n, seed), lambda: run_lnfm(arm, preset, bench, pre, n, seed, workdir))
            lnfm_time = max(results[(arm, "both", n, seed)]["train_time_s"] for arm in preset.lnfm_arms)
            if preset.time_cap_s is not None:
                lnfm_time = min(lnfm_time, preset.time_cap_s)
            for name in preset.peers:
                for budget in preset.budgets:
                    cached((name, budget, n, seed),
                           lambda: run_peer(name, budget, preset, bench, n, seed, workdir, lnfm_time,
                                            preset.lnfm_arms[0]))
            report(results, out, preset_name, preset, header, complete=False)
    report(results, out, preset_name, preset, header, complete=True)
    log.info("accuracy benchmark finished in %.0f s: %s", time.time() - t_start, out / "accuracy.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    # LNFM and the PyTorch peers share this process: LNFM's oneDNN convolutions would leave OpenMP teams that slow
    # PyTorch's steps 2x (lnfm.models.onednn), so LNFM runs XLA's own forms here, as before they existed
    onednn.keep_off()
    ap = argparse.ArgumentParser(description="LN segmentation accuracy: LNFM vs MONAI peers on held-out phantoms.")
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny run of every arm (the test suite); needs --out")
    ap.add_argument("--workdir", default=None, help="data, runs and cached results (default runs/accuracy_PRESET)")
    ap.add_argument("--out", default=None, help="report folder (default docs/results)")
    ap.add_argument("--seeds", type=int, default=None, help="override the preset's number of seeds")
    ap.add_argument("--num-labeled", default=None,
                    help="comma-separated labelled-case counts overriding the preset's (e.g. 1,2,4 for a curve)")
    ap.add_argument("--report-only", action="store_true", help="write the report of the finished arms and stop")
    ap.add_argument("--arms", default=None,
                    help=f"comma-separated subset of the LNFM arms to run ({','.join(LNFM_ARMS)}); the peers' "
                         f"time budget is the longest of those run")
    ap.add_argument("--budgets", default=None,
                    help=f"comma-separated subset of the peers' budgets ({','.join(BUDGETS)})")
    ap.add_argument("--peers", default=None,
                    help="comma-separated subset of the peers to run (e.g. to run them in parallel processes "
                         "that share the workdir; the LNFM arms are shared)")
    args = ap.parse_args(argv)
    name = "smoke" if args.smoke else args.preset
    if args.smoke and not args.out:
        ap.error("--smoke writes a throw-away report: pass --out")
    preset = PRESETS[name]
    if args.seeds is not None:
        preset = dataclasses.replace(preset, seeds=args.seeds)

    def subset(flag: str, value: str, choices: tuple[str, ...], allow_none: bool = False) -> tuple[str, ...]:
        chosen = tuple(v for v in value.split(",") if v)
        if (not chosen and not allow_none) or set(chosen) - set(choices):
            ap.error(f"{flag}: choose from {', '.join(choices)}")
        return chosen

    if args.peers is not None:  # an empty list runs the LNFM arms alone
        preset = dataclasses.replace(preset, peers=subset("--peers", args.peers, PEER_ARMS, allow_none=True))

    if args.arms is not None:
        preset = dataclasses.replace(preset, lnfm_arms=subset("--arms", args.arms, LNFM_ARMS))
    if args.budgets is not None:
        preset = dataclasses.replace(preset, budgets=subset("--budgets", args.budgets, BUDGETS))
    if args.num_labeled is not None:
        preset = dataclasses.replace(preset, num_labeled=[int(n) for n in args.num_labeled.split(",")])
    workdir = Path(args.workdir or REPO / "runs" / f"accuracy_{name}")
    out = Path(args.out or REPO / "docs" / "results")
    command = "python bench/accuracy.py " + shlex.join(
        (["--smoke"] if args.smoke else ["--preset", args.preset]) +
        (["--seeds", str(args.seeds)] if args.seeds is not None else []) +
        (["--num-labeled", args.num_labeled] if args.num_labeled is not None else []) +
        (["--arms", args.arms] if args.arms is not None else []) +
        (["--budgets", args.budgets] if args.budgets is not None else []) +
        (["--peers", args.peers] if args.peers is not None else []))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    return run(name, preset, workdir, out, command, args.report_only)


if __name__ == "__main__":
    sys.exit(main())
