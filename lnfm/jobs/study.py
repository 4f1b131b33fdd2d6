"""The transfer study: does self-supervised pretraining help few-shot lymph-node segmentation?

One command builds a phantom benchmark (generate -> prepare -> pretrain), then
finetunes every cell of the grid init x strategy x head x labelled cases, each
with R repeats, and writes a CSV, plots and a markdown table. Each cell is one
`finetune/finetune.py` process (its own workdir, resumable: a cell with a
summary.json is not run again); the JAX compilation cache is shared so cells of
the same shape compile once.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lnfm.config import ConfigError, load_config, to_dict
from lnfm.workdir import atomic_write_text, open_workdir, progress

log = logging.getLogger("lnfm.study")
REPO = Path(__file__).resolve().parents[2]

# Strategy name -> finetuning overrides (docs/finetuning.md explains each).
STRATEGIES: dict[str, list[str]] = {
    "freeze_all": ["strategy.freeze=all"],
    "first_k": ["strategy.freeze=first_k", "strategy.k=2"],
    "full_llrd": ["strategy.freeze=none", "strategy.llrd=0.75"],
    "lora": ["strategy.freeze=lora"],
}
HEADS = ("unetr", "light", "linear")
METRIC_KEYS = ("dice", "node_sensitivity", "hd95", "nsd", "fp_per_volume")


@dataclasses.dataclass
class StudyConfig:
    site: str = "pelvis"  # site preset of every finetuning run (phantoms of this site)
    cases: int = 40  # phantoms in the benchmark: few-shot pool + validation + held-out test
    shape: tuple[int, int, int] = (96, 96, 48)  # phantom grid (voxels)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # prepared spacing (mm)
    seed: int = 0  # phantom seed
    pretrain_config: str = "vit_tiny"  # pretraining preset
    pretrain_overrides: list[str] = dataclasses.field(default_factory=list)  # e.g. train.steps=2000
    inits: list[str] = dataclasses.field(default_factory=lambda: ["scratch", "pretrained"])  # encoder init
    strategies: list[str] = dataclasses.field(default_factory=lambda: list(STRATEGIES))  # names in STRATEGIES
    heads: list[str] = dataclasses.field(default_factory=lambda: ["unetr", "light"])  # segmentation heads
    num_labeled: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16])  # labelled cases
    repeats: int = 3  # seeds per cell (subset, head init and sampling)
    finetune_overrides: list[str] = dataclasses.field(default_factory=list)  # applied to every finetuning run
    quick: bool = False  # pass --quick to finetuning (32^3 patches, a few hundred steps)


def check(cfg: StudyConfig) -> None:
    for s in cfg.strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"unknown strategy '{s}' (choices: {', '.join(STRATEGIES)})")
    for h in cfg.heads:
        if h not in HEADS:
            raise ConfigError(f"unknown head '{h}' (choices: {', '.join(HEADS)})")
    for i in cfg.inits:
        if i not in ("scratch", "pretrained"):
            raise ConfigError(f"unknown init '{i}' (choices: scratch, pretrained)")
    if cfg.repeats < 1 or not cfg.num_labeled or min(cfg.num_labeled) < 1:
        raise ConfigError("repeats and every num_labeled must be at least 1")


def _run(cmd: list[str], env: dict, logfile: Path) -> None:
    log.info("$ %s", shlex.join(cmd))
    with open(logfile, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{shlex.join(cmd[:3])}... failed (exit {proc.returncode}): {tail[0]} (log: {logfile})")


def build_benchmark(cfg: StudyConfig, workdir: Path, env: dict) -> tuple[Path, Path]:
    """Phantoms -> store -> pretrained encoder; each step is skipped when already done."""
    py = sys.executable
    phantoms, store, pre = workdir / "phantoms", workdir / "store", workdir / "pretrain"
    if not (phantoms / "dataset.json").is_file():
        _run([py, "data_prep/synth.py", "--site", cfg.site, "--num-cases", str(cfg.cases), "--seed", str(cfg.seed),
              "--shape", ",".join(map(str, cfg.shape)), "--out", str(phantoms), "--no-gallery"], env,
             workdir / "build.log")
    _run([py, "data_prep/prepare.py", "--input", str(phantoms), "--output", str(store),
          "--spacing", ",".join(map(str, cfg.spacing)), "--workers", "2"], env, workdir / "build.log")
    if "pretrained" in cfg.inits and not (pre / "done.json").is_file():
        _run([py, "pretrain/pretrain.py", "--config", cfg.pretrain_config, "--data", str(store),
              "--workdir", str(pre), *cfg.pretrain_overrides], env, workdir / "build.log")
        atomic_write_text(pre / "done.json", "{}")
    return store, pre


def cells(cfg: StudyConfig) -> list[dict]:
    return [{"init": i, "strategy": s, "head": h, "num_labeled": n}
            for i in cfg.inits for s in cfg.strategies for h in cfg.heads for n in cfg.num_labeled]


def cell_dir(workdir: Path, c: dict) -> Path:
    return workdir / "runs" / f"{c['init']}_{c['strategy']}_{c['head']}_n{c['num_labeled']}"


def scratch_model_overrides(cfg: StudyConfig) -> list[str]:
    """Scratch cells use the pretrained model's architecture, so only the init differs."""
    from lnfm.jobs.pretrain import PretrainConfig

    model = to_dict(load_config(PretrainConfig, cfg.pretrain_config, cfg.pretrain_overrides, kind="pretrain").model)
    return [f"model.{k}={json.dumps(v)}" for k, v in model.items()]


def run_cell(cfg: StudyConfig, c: dict, store: Path, pre: Path, workdir: Path, env: dict) -> dict:
    out = cell_dir(workdir, c)
    if not (out / "summary.json").is_file():
        init = str(pre) if c["init"] == "pretrained" else "scratch"
        cmd = [sys.executable, "finetune/finetune.py", "--site", cfg.site, "--data", str(store), "--init", init,
               "--workdir", str(out), "--num-labeled", str(c["num_labeled"]), "--repeats", str(cfg.repeats)]
        if cfg.quick:
            cmd.append("--quick")
        cmd += list(cfg.finetune_overrides) + STRATEGIES[c["strategy"]] + [f"head.kind={c['head']}"]
        if init == "scratch":
            cmd += scratch_model_overrides(cfg)
        out.mkdir(parents=True, exist_ok=True)
        _run(cmd, env, out / "stdout.log")
    return json.loads((out / "summary.json").read_text())


def rows_of(c: dict, summary: dict) -> list[dict]:
    """One CSV row per repeat of a cell."""
    repeats = summary.get("repeats") or [summary]
    rows = []
    for r, rep in enumerate(repeats):
        row = {**c, "repeat": rep.get("repeat", r)}
        for k in METRIC_KEYS:
            row[k] = rep.get(k)
        row["trainable_params"] = rep.get("trainable_params", summary.get("trainable_params"))
        row["total_params"] = rep.get("total_params", summary.get("total_params"))
        row["train_time_s"] = rep.get("train_time_s")
        rows.append(row)
    return rows


def _stats(values: list) -> tuple[float, float, int]:
    v = [float(x) for x in values if x is not None and x != "" and math.isfinite(float(x))]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else (float("nan"), float("nan"), 0)


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["strategy"], r["head"], int(r["num_labeled"])), []).append(r)
    out = []
    for (init, strat, head, n), rs in groups.items():
        row = {"init": init, "strategy": strat, "head": head, "num_labeled": n, "repeats": len(rs)}
        for k in ("dice", "node_sensitivity", "hd95", "train_time_s"):
            row[f"{k}_mean"], row[f"{k}_std"], _ = _stats([r[k] for r in rs])
        row["trainable_params"] = rs[0]["trainable_params"]
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(agg: list[dict], metric: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({a["head"] for a in agg})
    fig, axes = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 4.2), squeeze=False, sharey=True)
    for ax, head in zip(axes[0], heads):
        lines = sorted({(a["init"], a["strategy"]) for a in agg if a["head"] == head})
        strategies = sorted({s for _, s in lines})
        for init, strat in lines:
            pts = sorted((a for a in agg if (a["head"], a["init"], a["strategy"]) == (head, init, strat)),
                         key=lambda a: a["num_labeled"])
            ax.errorbar([p["num_labeled"] for p in pts], [p[f"{metric}_mean"] for p in pts],
                        yerr=[p[f"{metric}_std"] for p in pts], marker="o" if init == "pretrained" else "s",
                        linestyle="-" if init == "pretrained" else "--", capsize=3, label=f"{init} / {strat}",
                        color=f"C{strategies.index(strat)}")  # one colour per strategy, style per init
        ax.set_xscale("log", base=2)
        ns = sorted({a["num_labeled"] for a in agg})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("labelled training cases")
        ax.set_title(f"head: {head}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{label} (test, mean +- std over repeats)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(m: float, s: float) -> str:
    return "n/a" if math.isnan(m) else f"{m:.3f} +- {s:.3f}"


def markdown(agg: list[dict], cfg: StudyConfig, command: str) -> str:
    lines = ["# Transfer study results", "",
             f"Site `{cfg.site}`, {cfg.cases} phantoms ({'x'.join(map(str, cfg.shape))} voxels, "
             f"{cfg.spacing[0]} mm), {cfg.repeats} repeats per cell; held-out test split.", "",
             "Command:", "", "```bash", command, "```", "",
             "| init | strategy | head | labelled | Dice | node sensitivity | HD95 (mm) | trainable params | "
             "train time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for a in sorted(agg, key=lambda a: (a["head"], a["strategy"], a["init"], a["num_labeled"])):
        lines.append(f"| {a['init']} | {a['strategy']} | {a['head']} | {a['num_labeled']} | "
                     f"{_fmt(a['dice_mean'], a['dice_std'])} | "
                     f"{_fmt(a['node_sensitivity_mean'], a['node_sensitivity_std'])} | "
                     f"{_fmt(a['hd95_mean'], a['hd95_std'])} | {a['trainable_params']} | "
                     f"{a['train_time_s_mean']:.0f} |")
    lines += ["", "## Pretrained minus scratch (test Dice, mean over repeats)", "",
              "| strategy | head | labelled | delta Dice |", "|---|---|---|---|"]
    index = {(a["init"], a["strategy"], a["head"], a["num_labeled"]): a for a in agg}
    for (init, strat, head, n), a in sorted(index.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][3])):
        other = index.get(("scratch", strat, head, n))
        if init == "pretrained" and other is not None:
            lines.append(f"| {strat} | {head} | {n} | {a['dice_mean'] - other['dice_mean']:+.3f} |")
    return "\n".join(lines) + "\n"


def run(cfg: StudyConfig, workdir: str | Path, out: str | Path, command: str) -> int:
    check(cfg)
    workdir, out = Path(workdir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = open_workdir(workdir, cfg, tensorboard=False)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache")))
    t0 = time.time()
    store, pre = build_benchmark(cfg, workdir, env)
    rows: list[dict] = []
    todo = cells(cfg)
    with progress(total=len(todo), desc="study cells") as bar:
        for i, c in enumerate(todo):
            summary = run_cell(cfg, c, store, pre, workdir, env)
            rows += rows_of(c, summary)
            writer.write(i, **{k: summary.get(k) for k in ("dice", "node_sensitivity")}, **c)
            bar.update(1)
    agg = aggregate(rows)
    write_csv(out / "study.csv", rows)
    write_csv(out / "study_summary.csv", agg)
    plot(agg, "dice", "Dice", out / "dice_vs_labelled.png")
    plot(agg, "node_sensitivity", "node sensitivity", out / "sensitivity_vs_labelled.png")
    atomic_write_text(out / "study.md", markdown(agg, cfg, command))
    writer.close()
    log.info("study finished in %.0f s: %s", time.time() - t0, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Few-shot transfer study on phantoms: scratch vs pretrained.")
    ap.add_argument("--config", default=None, help="study preset (quick, full) or a YAML file")
    ap.add_argument("--quick", action="store_true", help="same as --config quick: minutes on a laptop CPU")
    ap.add_argument("--workdir", required=True, help="benchmark data, pretraining and one folder per cell")
    ap.add_argument("--out", required=True, help="where study.csv, the PNG plots and study.md go")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. repeats=5 heads=[light]")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else (args.config or "full")
    try:
        cfg = load_config(StudyConfig, name, args.overrides, kind="study")
        command = "python finetune/study.py " + shlex.join(
            (["--quick"] if args.quick else ["--config", name]) + ["--workdir", args.workdir, "--out", args.out]
            + list(args.overrides))
        return run(cfg, args.workdir, args.out, command)
    except (ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
