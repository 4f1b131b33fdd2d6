"""The transfer study: does self-supervised pretraining help few-shot lymph-node segmentation?

One command builds the phantom benchmark of `bench/accuracy.py` (`lnfm.data.benchmark`:
an unlabelled pretraining pool, a labelled few-shot pool, and held-out test phantoms
from the held-out generator variant that neither pretraining nor finetuning sees),
pretrains on the unlabelled pool, then finetunes every cell of the grid init x
strategy x head x labelled cases, each with R repeats, and writes a CSV, plots and a
markdown table with the accuracy benchmark's statistics (`lnfm.eval.stats`: mean and
95% CI over repeats, paired pretrained - scratch differences with p-values). Each cell is one
`finetune/finetune.py` process (its own workdir, resumable: a cell with a
summary.json is not run again); the JAX compilation cache is shared so cells of
the same shape compile once. Every value is checked before anything is written. The report,
log.txt and each stage's log show the study's folders as WORKDIR and OUT: a folder's name
(often a patient's) stays out of what the study writes, the stages' config.yaml and
checkpoint metadata aside (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lnfm.config import (ConfigError, check_unique_overrides, load_config, override_keys, parse_args_once, preset_path,
                         read_yaml, to_dict)
from lnfm.data import synth
from lnfm.data.benchmark import BenchmarkSpec
from lnfm.data.benchmark import build as build_data
from lnfm.data.scan_checks import check_target_spacing
from lnfm.eval.stats import fmt_ci, fmt_p, mean_ci, paired
from lnfm.errors import LnfmError
from lnfm.jobs.finetune import load_finetune_config
from lnfm.jobs.pretrain import PretrainConfig, check_pretrain_config, load_pretrain_config
from lnfm.jobs.finetune_config import FinetuneConfig, model_overrides
from lnfm.runs import FinetuneRun, model_folder_around
from lnfm.workdir import (WorkdirError, atomic_write_csv, atomic_write_text, check_config_is_this_jobs,
                          check_job_folder, check_resume, differences, file_sha256, job_folder, lock_folder,
                          open_workdir, progress, recorded_digests, remove_stale_temps, temp_file)

log = logging.getLogger("lnfm.study")
REPO = Path(__file__).resolve().parents[2]

# Strategy name -> finetuning overrides (docs/finetuning.md explains each).
STRATEGIES: dict[str, list[str]] = {
    "freeze_all": ["strategy.freeze=all"],
    "first_k": ["strategy.freeze=first_k", "strategy.k=2"],
    "full_llrd": ["strategy.freeze=none", "strategy.llrd=0.75"],
    "lora": ["strategy.freeze=lora"],
}
HEADS = ("unetr", "light", "fine", "linear")
INITS = ("scratch", "pretrained")
METRIC_KEYS = ("dice", "node_sensitivity", "hd95", "nsd", "fp_per_volume")


class StageFailed(LnfmError):
    """A stage of the study (a child `python -m lnfm <job>`) exited non-zero; its log names the cause."""


@dataclasses.dataclass
class StudyConfig:
    site: str = "pelvis"  # site preset of every finetuning run (phantoms of this site)
    unlabelled: int = 40  # phantoms of the pretraining pool (labels unused)
    labelled: int = 16  # labelled phantoms the few-shot subsets are drawn from
    val: int = 2  # labelled validation phantoms
    test: int = 8  # held-out test phantoms (held-out generator variant)
    shape: tuple[int, int, int] = (96, 96, 48)  # phantom grid (voxels)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # prepared spacing (mm)
    pretrain_config: str = "vit_tiny"  # pretraining preset
    pretrain_overrides: list[str] = dataclasses.field(default_factory=list)  # e.g. train.steps=2000
    inits: list[str] = dataclasses.field(default_factory=lambda: ["scratch", "pretrained"])  # encoder init
    strategies: list[str] = dataclasses.field(default_factory=lambda: list(STRATEGIES))  # names in STRATEGIES
    heads: list[str] = dataclasses.field(default_factory=lambda: ["unetr", "light"])  # segmentation heads
    num_labeled: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16])  # labelled cases
    repeats: int = 5  # seeds per cell (subset, head init and sampling); statistics are over these
    finetune_overrides: list[str] = dataclasses.field(default_factory=list)  # applied to every finetuning run
    quick: bool = False  # pass --quick to finetuning (32^3 patches, a few hundred steps)


def _check_grid(cfg: StudyConfig) -> None:
    """Every grid list names known values, each once: a value listed twice runs one cell twice and its
    results would count as twice the repeats; an empty list leaves no cell to run."""
    for key, one, values, choices in (("inits", "init", cfg.inits, INITS),
                                      ("strategies", "strategy", cfg.strategies, tuple(STRATEGIES)),
                                      ("heads", "head", cfg.heads, HEADS),
                                      ("num_labeled", "number of labelled cases", cfg.num_labeled, None)):
        if not values:
            wanted = f"one of {', '.join(choices)}" if choices else f"one {one}"
            raise ConfigError(f"{key}: the list is empty; give at least {wanted}")
        for v in values:
            if choices and v not in choices:
                raise ConfigError(f"{key}: unknown {one} '{v}' (choices: {', '.join(choices)})")
            if values.count(v) > 1:
                raise ConfigError(f"{key}: {v} is listed {values.count(v)} times; list each value once "
                                  f"(repeats sets the runs per cell)")
    for n in cfg.num_labeled:
        if n < 1:
            raise ConfigError(f"num_labeled: {n} must be at least 1 (labelled training cases)")
    if cfg.repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {cfg.repeats}")


def _check_data(cfg: StudyConfig) -> None:
    """The phantom counts, grid and spacing: what `lnfm.data.benchmark.build` would otherwise synthesise and
    prepare before failing, or turn into fewer cases than the table reports."""
    if cfg.site not in synth.SITES:
        raise ConfigError(f"site: unknown site '{cfg.site}' (choices: {', '.join(synth.SITES)})")
    for key, low, what in (("unlabelled", 1, "phantoms of the pretraining pool, built whatever the inits"),
                           ("labelled", 1, "phantoms the few-shot subsets are drawn from"),
                           # none: finetuning would hold out some of the labelled pool to validate on
                           ("val", 1, "validation phantoms; with none, finetuning would validate on part of "
                                      "the labelled pool"),
                           ("test", 1, "held-out test phantoms every cell is scored on")):
        if getattr(cfg, key) < low:
            raise ConfigError(f"{key} must be at least {low} ({what}), got {getattr(cfg, key)}")
    # build() makes labelled + val phantoms and marks the last val of them val: the pool is `labelled`
    if max(cfg.num_labeled) > cfg.labelled:
        raise ConfigError(f"num_labeled reaches {max(cfg.num_labeled)} but the labelled pool has {cfg.labelled} "
                          f"phantoms (labelled=...)")
    try:  # synth's own rule for a grid (its --shape)
        synth._triple(",".join(str(int(v)) for v in cfg.shape))
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ConfigError(f"shape: {list(cfg.shape)} is not a phantom grid synth makes ({e})") from None
    check_target_spacing(cfg.spacing, "spacing")


def _check_jobs(cfg: StudyConfig) -> None:
    """The pretraining and finetuning configs every stage will load, loaded now: a bad preset or override
    would otherwise fail after the data (and the pretraining) were made."""
    try:
        preset_path("pretrain", cfg.pretrain_config)
    except ConfigError as e:
        raise ConfigError(f"pretrain_config: {e}") from None
    # The stages run the finetune / pretrain CLIs, which refuse a key given twice: refused here, before the data
    for name, cls in (("pretrain_overrides", PretrainConfig), ("finetune_overrides", FinetuneConfig)):
        try:
            check_unique_overrides(getattr(cfg, name), cls)  # the class: a dict field given whole is one key
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    grid = cell_keys(cfg)
    for key in sorted(override_keys(cfg.finetune_overrides)):
        if key in grid:  # the cell would replace it without a word, or its finetune refuse it after the data
            raise ConfigError(f"finetune_overrides: {key} is set in each cell by the study's {grid[key]}; drop it "
                              f"from finetune_overrides")
        if key.startswith("model.") and "scratch" in cfg.inits:
            raise ConfigError(f"finetune_overrides: {key}: the scratch cells take the pretraining model's "
                              f"(pretrain_config / pretrain_overrides); set it there")
    where = "pretrain_config / pretrain_overrides" if cfg.pretrain_overrides else "pretrain_config"
    try:
        pre = load_pretrain_config(cfg.pretrain_config, cfg.pretrain_overrides)
        if "pretrained" in cfg.inits:  # pretraining's config-only checks (its data's wait for the store)
            check_pretrain_config(pre)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    model = scratch_model_overrides(cfg)
    for strategy in cfg.strategies:
        for head in cfg.heads:
            try:  # a scratch cell's config (a pretrained cell's model comes from the pretraining run)
                ft = load_finetune_config(cfg.site, finetune_args(cfg, strategy, head) + model, quick=cfg.quick,
                                          repeats=cfg.repeats)
            except ConfigError as e:
                raise ConfigError(f"finetune_overrides (strategy {strategy}, head {head}): {e}") from None
            # finetuning reads the store at site.spacing and never resamples: every cell would refuse it
            if tuple(float(v) for v in ft.site.spacing) != tuple(float(v) for v in cfg.spacing):
                raise ConfigError(f"spacing {list(cfg.spacing)} differs from the site.spacing "
                                  f"{list(ft.site.spacing)} finetuning uses (site {cfg.site}): every cell would "
                                  f"refuse the data; make them equal (site.spacing in finetune_overrides)")


def cell_keys(cfg: StudyConfig) -> dict[str, str]:
    """The finetuning keys each cell sets itself (key -> the study's option that sets it): its head, strategy,
    labelled count (--num-labeled) and repeats (--repeats)."""
    keys = {"head.kind": "heads", "train.num_labeled": "num_labeled", "train.repeats": "repeats"}
    for name in cfg.strategies:
        keys |= {key: f"strategies ({name}: {text})" for text in STRATEGIES[name] for key in override_keys([text])}
    return keys


def check(cfg: StudyConfig) -> None:
    """Every value of the study, before anything is written."""
    _check_grid(cfg)
    _check_data(cfg)
    _check_jobs(cfg)


def check_folder(path: Path, option: str) -> None:
    """`path` is a folder or can be made one: a file there, or above it, would fail at mkdir."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise ConfigError(f"{p}: exists and is not a folder ({option} names a folder)")
            return


def hide_paths(text: str, places: dict[str, Path]) -> str:
    """`text` with each of `places`' paths (as given, absolute and resolved) replaced by its key (WORKDIR,
    OUT), matched as whole path components; the Python interpreter is shown as `python`.
    No folder name (often a patient's) reaches log.txt or a stage's log, and each line still says which
    folder it means."""
    forms = [(str(sys.executable), "python")]
    for name, path in places.items():
        forms += [(f, name) for f in {str(path), str(path.absolute()), str(path.resolve())} if f != "."]
    for form, name in sorted(forms, key=lambda f: -len(f[0])):  # longest first: OUT inside WORKDIR stays OUT
        text = re.sub(rf"(?<![\w.-]){re.escape(form)}(?![\w.-])", lambda _: name, text)
    return text


def _run(cmd: list[str], env: dict, logfile: Path, places: dict[str, Path]) -> None:
    """Run a stage; its output goes to `logfile` with the study's paths hidden (`hide_paths`)."""
    log.info("$ %s", hide_paths(shlex.join(cmd), places))
    check_job_folder(logfile, logfile.name)  # the open would fail in (or a mkdir remake) a moved workdir
    with open(logfile, "a") as f, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True, errors="replace") as proc:
        try:
            for line in proc.stdout:
                f.write(hide_paths(line, places))
                f.flush()
            proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the stage stops with the study (as subprocess.run does)
            proc.kill()
            raise
    if proc.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-1:] or [""]
        raise StageFailed(f"{logfile}: {shlex.join(cmd[1:4])}... failed (exit {proc.returncode}): {tail[0]}")


def build_benchmark(cfg: StudyConfig, workdir: Path, env: dict) -> tuple[Path, Path]:
    """Phantom sets and stores (lnfm.data.benchmark) -> encoder pretrained on the unlabelled pool only;
    returns (labelled store, pretraining workdir). Each step is skipped when already done."""
    spec = BenchmarkSpec(site=cfg.site, unlabelled=cfg.unlabelled, labelled=cfg.labelled, val=cfg.val,
                         test=cfg.test, shape=tuple(cfg.shape), spacing=tuple(cfg.spacing))
    check_job_folder(workdir / "data", "the benchmark data")  # its mkdir would remake a moved workdir
    data = build_data(spec, workdir / "data")
    for name in ("unlabelled.csv", "labelled.csv"):  # prepare's inputs, naming the phantoms by absolute path:
        (workdir / "data" / name).unlink(missing_ok=True)  # spent once the stores exist (build skips them)
    pre = workdir / "pretrain"
    if "pretrained" in cfg.inits and not (pre / "done.json").is_file():
        _run([sys.executable, "-m", "lnfm", "pretrain", "--config", cfg.pretrain_config, "--data",
              str(data.unlabelled_store), "--workdir", str(pre), *cfg.pretrain_overrides], env,
             workdir / "build.log", {"WORKDIR": workdir})
        atomic_write_text(pre / "done.json", "{}")
    return data.labelled_store, pre


def cells(cfg: StudyConfig) -> list[dict]:
    return [{"init": i, "strategy": s, "head": h, "num_labeled": n}
            for i in cfg.inits for s in cfg.strategies for h in cfg.heads for n in cfg.num_labeled]


def cell_dir(workdir: Path, c: dict) -> Path:
    return workdir / "runs" / f"{c['init']}_{c['strategy']}_{c['head']}_n{c['num_labeled']}"


def scratch_model_overrides(cfg: StudyConfig) -> list[str]:
    """Scratch cells use the pretrained model's architecture, so only the init differs."""
    return model_overrides(load_config(PretrainConfig, cfg.pretrain_config, cfg.pretrain_overrides,
                                       kind="pretrain").model)


def finetune_args(cfg: StudyConfig, strategy: str, head: str) -> list[str]:
    """A cell's finetuning overrides: the study's, then its strategy's and head's."""
    return list(cfg.finetune_overrides) + STRATEGIES[strategy] + [f"head.kind={head}"]


def run_cell(cfg: StudyConfig, c: dict, store: Path, pre: Path, workdir: Path, env: dict) -> dict:
    out = cell_dir(workdir, c)
    summary = FinetuneRun(out).summary
    init = str(pre) if c["init"] == "pretrained" else "scratch"
    if summary.is_file():  # counted only when it is this cell's run, not one another finetune left there
        check_cell_run(cfg, c, store, init, out)
    else:
        cmd = [sys.executable, "-m", "lnfm", "finetune", "--site", cfg.site, "--data", str(store), "--init", init,
               "--workdir", str(out), "--num-labeled", str(c["num_labeled"]), "--repeats", str(cfg.repeats)]
        if cfg.quick:
            cmd.append("--quick")
        cmd += finetune_args(cfg, c["strategy"], c["head"])
        if init == "scratch":
            cmd += scratch_model_overrides(cfg)
        check_job_folder(out.parent, "a cell's folder")  # the mkdir would remake a moved workdir at its old path
        out.parent.mkdir(parents=True, exist_ok=True)  # the stage's log beside its workdir: finetune refuses a
        _run(cmd, env, out.with_name(out.name + ".log"), {"WORKDIR": workdir})  # workdir holding files of others
    return json.loads(summary.read_text())


def _cell_values(config: dict) -> dict:
    """What makes a finetuning run a given cell's: its data, init, strategy, head and labelled subsets."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    paths = config.get("data") if isinstance(config.get("data"), list) else [config.get("data")]
    init = config.get("init")
    return {"data": [os.path.abspath(str(d)) for d in paths],
            "init": init if init in (None, "scratch") else os.path.abspath(str(init)),
            "strategy": config.get("strategy"), "head": config.get("head"),
            "train": {k: train.get(k) for k in ("num_labeled", "repeats", "seed")}}


def check_cell_run(cfg: StudyConfig, c: dict, store: Path, init: str, out: Path) -> None:
    """Refuse, in one line, a finished run in the cell's folder whose config.yaml is not the cell's (another
    finetune started there with another store, strategy or labelled count): its results would be reported
    as the cell's."""
    path = out / "config.yaml"
    try:
        recorded = read_yaml(path)
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        raise WorkdirError(f"{path}: the run in this cell's folder has no readable config.yaml, so it cannot be "
                           f"told to be the cell's; move the folder away (the study then runs the cell again)")
    model = scratch_model_overrides(cfg) if init == "scratch" else []
    want = load_finetune_config(cfg.site, finetune_args(cfg, c["strategy"], c["head"]) + model, init=init,
                                data=[str(store)], num_labeled=c["num_labeled"], repeats=cfg.repeats,
                                quick=cfg.quick)
    diffs = differences(_cell_values(recorded), _cell_values(json.loads(json.dumps(to_dict(want), default=list))), "")
    if diffs:
        more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
        raise WorkdirError(f"{path}: the run in this cell's folder was not made by this study's cell: it has "
                           f"{diffs[0].replace(' (new: ', ' (the cell: ')}{more}; move the folder away (the study "
                           f"then runs the cell again) or choose another --workdir")


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


def _numbers(values: list) -> list[float]:
    return [float(x) for x in values if x is not None and x != "" and math.isfinite(float(x))]


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["strategy"], r["head"], int(r["num_labeled"])), []).append(r)
    out = []
    for (init, strat, head, n), rs in groups.items():
        row = {"init": init, "strategy": strat, "head": head, "num_labeled": n, "repeats": len(rs)}
        for k in ("dice", "node_sensitivity", "hd95", "train_time_s"):
            row[f"{k}_mean"], row[f"{k}_ci_lo"], row[f"{k}_ci_hi"], _ = mean_ci(_numbers([r[k] for r in rs]))
        row["trainable_params"] = rs[0]["trainable_params"]
        out.append(row)
    return out


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
            err = [[0.0 if math.isnan(p[f"{metric}_ci_lo"]) else p[f"{metric}_mean"] - p[f"{metric}_ci_lo"]
                    for p in pts],
                   [0.0 if math.isnan(p[f"{metric}_ci_hi"]) else p[f"{metric}_ci_hi"] - p[f"{metric}_mean"]
                    for p in pts]]
            ax.errorbar([p["num_labeled"] for p in pts], [p[f"{metric}_mean"] for p in pts],
                        yerr=err, marker="o" if init == "pretrained" else "s",
                        linestyle="-" if init == "pretrained" else "--", capsize=3, label=f"{init} / {strat}",
                        color=f"C{strategies.index(strat)}")  # one colour per strategy, style per init
        ax.set_xscale("log", base=2)
        ns = sorted({a["num_labeled"] for a in agg})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("labelled training cases")
        ax.set_title(f"head: {head}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{label} (held-out test, mean and 95% CI over repeats)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with temp_file(path.with_name(path.stem), ".png") as tmp:
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)


def _fmt(a: dict, key: str) -> str:
    return fmt_ci(a[f"{key}_mean"], a[f"{key}_ci_lo"], a[f"{key}_ci_hi"], digits=1 if key == "hd95" else 3)


def markdown(agg: list[dict], cfg: StudyConfig, command: str, rows: list[dict] | None = None) -> str:
    lines = ["# Transfer study results", "",
             f"Site `{cfg.site}`: {cfg.unlabelled} unlabelled phantoms for pretraining, few-shot subsets of "
             f"{cfg.labelled} labelled ones, {cfg.val} for validation, and {cfg.test} held-out test phantoms from "
             f"the held-out generator variant ({'x'.join(map(str, cfg.shape))} voxels, prepared at "
             f"{cfg.spacing[0]} mm); {cfg.repeats} repeats per cell. Values: mean [95% CI] over repeats.", "",
             "Command:", "", "```bash", command, "```", "",
             "| init | strategy | head | labelled | Dice | node sensitivity | HD95 (mm) | trainable params | "
             "train time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for a in sorted(agg, key=lambda a: (a["head"], a["strategy"], a["init"], a["num_labeled"])):
        lines.append(f"| {a['init']} | {a['strategy']} | {a['head']} | {a['num_labeled']} | {_fmt(a, 'dice')} | "
                     f"{_fmt(a, 'node_sensitivity')} | {_fmt(a, 'hd95')} | {a['trainable_params']} | "
                     f"{a['train_time_s_mean']:.0f} |")
    lines += ["", "## Pretrained minus scratch (held-out Dice, paired by repeat: same labelled subset and seed)", "",
              "| strategy | head | labelled | delta Dice [95% CI] | pairs | p (paired t) | p (Wilcoxon) |",
              "|---|---|---|---|---|---|---|"]
    index = {(a["init"], a["strategy"], a["head"], a["num_labeled"]): a for a in agg}
    for (init, strat, head, n), a in sorted(index.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][3])):
        if init != "pretrained" or ("scratch", strat, head, n) not in index:
            continue
        if rows is None:
            other = index[("scratch", strat, head, n)]
            lines.append(f"| {strat} | {head} | {n} | {a['dice_mean'] - other['dice_mean']:+.3f} | | | |")
            continue
        by = {i: {int(r["repeat"]): r["dice"] for r in rows
                  if (r["init"], r["strategy"], r["head"], int(r["num_labeled"])) == (i, strat, head, n)}
              for i in ("pretrained", "scratch")}
        reps = sorted(set(by["pretrained"]) & set(by["scratch"]))
        p = paired([by["pretrained"][r] for r in reps], [by["scratch"][r] for r in reps])
        ci = "" if math.isnan(p["ci_lo"]) else f" [{p['ci_lo']:+.3f}, {p['ci_hi']:+.3f}]"
        lines.append(f"| {strat} | {head} | {n} | {p['diff']:+.3f}{ci} | {p['n']} | {fmt_p(p['p_ttest'])} | "
                     f"{fmt_p(p['p_wilcoxon'])} |")
    return "\n".join(lines) + "\n"


# What the benchmark data, the pretraining and every cell's summary.json depend on: a study resumed with
# other values would reuse results made under the old ones (adding inits, strategies, heads or
# num_labeled only adds cells).
RESUME_KEYS = ("site", "unlabelled", "labelled", "val", "test", "shape", "spacing", "pretrain_config",
               "pretrain_overrides", "repeats", "finetune_overrides", "quick")


# What the study writes into --out; OUT_RECORD keeps the sha256 of each as written, so that a rerun replaces
# only these files as the study left them, never a user's file of the same name (or one they edited), and the
# id of the study (STUDY_ID in its workdir, random: no path) that wrote them, so that another study's are kept.
OUT_FILES = ("study.csv", "study_summary.csv", "dice_vs_labelled.png", "sensitivity_vs_labelled.png", "study.md")
OUT_RECORD = ".lnfm-study.json"
STUDY_ID = "study_id.txt"


OUT_LOCK = ".lnfm-study-out.lock"  # not the workdir's lock file: --out may be the workdir itself


def study_id(workdir: Path) -> str | None:
    """The id the study in `workdir` records in its --out (None before its first start)."""
    try:
        text = (workdir / STUDY_ID).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if re.fullmatch(r"[0-9a-f]{16}", text) else None


def out_study(out: Path) -> str | None:
    """The id of the study whose report --out holds (None: no record, or one lnfm before the ids wrote)."""
    try:
        found = json.loads((out / OUT_RECORD).read_text(encoding="utf-8")).get("study")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def check_out_files(out: Path, study: str, before_ids: bool) -> None:
    """Refuse an existing file of --out that the study would write and did not (or that changed since), and
    the report of another study (another --workdir): `study` is this one's id. A record an lnfm before the ids
    wrote names no study: it is this study's only when its workdir too was started before them (`before_ids`:
    started, with no STUDY_ID), as the study that wrote such a report was; any other took it over unsaid."""
    present = [name for name in OUT_FILES if os.path.lexists(out / name)]
    recorded = recorded_digests(out / OUT_RECORD)
    owner = out_study(out)
    if present and owner not in (None, study):
        raise ConfigError(f"--out {out}: holds the report of another study ({', '.join(present)}, from another "
                          f"--workdir or one made anew); move those files away or choose another --out")
    if present and owner is None and recorded and not before_ids:
        raise ConfigError(f"--out {out}: holds the report of a study an earlier lnfm ran ({', '.join(present)}, its "
                          f"record names no study), which only that study's --workdir replaces; move those files away "
                          f"or choose another --out")
    for name in OUT_FILES:
        path = out / name
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file()
                                      or recorded.get(name) != file_sha256(path)):
            raise ConfigError(f"{path}: exists and is not a file lnfm study wrote there (or was changed since); "
                              f"move it away or choose another --out")


def _record_output(out: Path, name: str, study: str) -> None:
    """Add `name`, just written by `study`, to --out's record."""
    recorded = recorded_digests(out / OUT_RECORD) if out_study(out) in (None, study) else {}
    if (out / name).is_file():
        recorded[name] = file_sha256(out / name)
    atomic_write_text(out / OUT_RECORD, json.dumps({"study": study, "files": dict(sorted(recorded.items()))},
                                                   indent=1))


def run(cfg: StudyConfig, workdir: str | Path, out: str | Path, command: str) -> int:
    """The study; `command` is what study.md records (with WORKDIR and OUT for the folders, see `main`)."""
    check(cfg)
    workdir, out = Path(workdir), Path(out)
    check_folder(workdir, "--workdir")
    check_folder(out, "--out")
    for option, path in (("--workdir", workdir), ("--out", out)):
        owner = model_folder_around(path)
        if owner is not None:  # before the lock file: a file there breaks an export's checksums or mixes into a run
            raise ConfigError(f"{option} {path}: {owner}, which the study does not own; choose a folder outside it")
    # a second study in the same workdir, or writing the same --out, is refused, not mixed into this one; a
    # folder moved while the study runs ends it in one line, remade nowhere (`job_folder`)
    with lock_folder(workdir), lock_folder(out, OUT_LOCK), job_folder(workdir), job_folder(out):
        remove_stale_temps(out)  # a killed study's half-written plot
        started = (workdir / "data").exists() or (workdir / "runs").exists()
        check_resume(workdir, cfg, RESUME_KEYS, has_run=started)
        check_config_is_this_jobs(workdir, cfg)
        before_ids = started and study_id(workdir) is None  # a study an lnfm before the ids started
        study = study_id(workdir) or secrets.token_hex(8)
        check_out_files(out, study, before_ids)
        out.mkdir(parents=True, exist_ok=True)
        return _study(cfg, workdir, out, command, study, before_ids)


def _study(cfg: StudyConfig, workdir: Path, out: Path, command: str, study: str, before_ids: bool) -> int:
    with open_workdir(workdir, cfg, tensorboard=False) as writer:  # its log handler ends on a failed stage too
        if study_id(workdir) is None:  # the first start: what --out's record names this study by
            atomic_write_text(workdir / STUDY_ID, study + "\n")
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
        check_out_files(out, study, before_ids)  # again: a file may have appeared there in the study's hour
        writes = {"study.csv": lambda p: atomic_write_csv(p, rows),
                  "study_summary.csv": lambda p: atomic_write_csv(p, agg),
                  "dice_vs_labelled.png": lambda p: plot(agg, "dice", "Dice", p),
                  "sensitivity_vs_labelled.png": lambda p: plot(agg, "node_sensitivity", "node sensitivity", p),
                  "study.md": lambda p: atomic_write_text(p, markdown(agg, cfg, command, rows))}
        for name in OUT_FILES:
            writes[name](out / name)
            _record_output(out, name, study)
    log.info("study finished in %.0f s: study.md, study.csv and the plots are in --out", time.time() - t0)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lnfm study",
                                 description="Few-shot transfer study on phantoms: scratch vs pretrained.")
    ap.add_argument("--config", default=None, help="study preset (quick, full) or a YAML file")
    ap.add_argument("--quick", action="store_true",
                    help="same as --config quick: the grid sized for a 2-core CPU (about an hour)")
    ap.add_argument("--workdir", required=True, help="benchmark data, pretraining and one folder per cell")
    ap.add_argument("--out", required=True, help="where study.csv, the PNG plots and study.md go")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. repeats=5 heads=[light]")
    args = parse_args_once(ap, argv)
    if args.quick and args.config is not None:  # one would be ignored: --quick is --config quick
        raise ConfigError(f"--quick and --config {args.config}: --quick is --config quick; give one of them")
    name = "quick" if args.quick else ("full" if args.config is None else args.config)  # "" is refused
    cfg = load_config(StudyConfig, name, args.overrides, kind="study")
    # study.md names no folder (they often hold a patient's name): the folders are WORKDIR and OUT, and a
    # config file is the resolved copy the workdir keeps (the overrides are already in it)
    path_given = Path(name).suffix in (".yaml", ".yml") or Path(name).exists()  # as preset_path tells them
    source = ["--quick"] if args.quick else ["--config", "WORKDIR/config.yaml" if path_given else name]
    command = "python finetune/study.py " + shlex.join(source + ["--workdir", "WORKDIR", "--out", "OUT"]
                                                       + list(args.overrides))
    return run(cfg, args.workdir, args.out, command)


if __name__ == "__main__":
    sys.exit(main())
