"""`make demo`: the main job end to end on built-in data, on a laptop CPU.

phantoms -> prepare -> MAE pretraining -> finetune --site pelvis -> evaluate ->
export -> predict, then the same task for a MONAI U-Net. Each stage runs the same
`python -m lnfm <job>` command a user would type (printed before it runs), so the
demo doubles as a walkthrough and works from an installed package as well as from a
checkout. The real CTs under ../shared/data, when present, join the unlabelled
pretraining data.

The test cases come from the held-out phantom generator (`lnfm synth --heldout`), which
neither pretraining nor finetuning sees. The last step trains a MONAI U-Net (the dev
extra) on the same labelled cases for the same wall time and prints both models'
scores on those held-out scans, through the same predict pipeline and metrics. With node
paste it also trains the U-Net on LNFM's pasted patches: paste is not LNFM's alone (the
U-Net finds more nodes with it too), so that U-Net is the fair peer of LNFM with paste
(docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lnfm.config import ConfigError, from_dict, parse_args_once, read_yaml
from lnfm.data.benchmark import TestCase, phantom_rows, prepare_csv
from lnfm.data.shared import shared_data_dir
from lnfm.eval.metrics import summarize
from lnfm.jobs import heldout
from lnfm.jobs.finetune_config import FinetuneConfig
from lnfm.jobs.predict import load_predictor
from lnfm.models import onednn
from lnfm.runs import FinetuneRun
from lnfm.safety import check_apart
from lnfm.workdir import atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], env: dict | None = None) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: stage failed (exit {proc.returncode}): {shlex.join(cmd)}")
    print(f"  ({time.time() - t0:.0f}s)", flush=True)


def _shared_ct() -> list[Path]:
    shared = shared_data_dir()
    if shared is None:
        return []
    root = shared / "ct" / "totalsegmentator"
    names = ["example_ct.nii.gz", "chest_vessels/ct_cropped.nii.gz"]
    return [root / n for n in names if (root / n).is_file()]


def demo_rows(phantoms: Path, heldout: Path, labelled: int) -> tuple[list, list, list]:
    """prepare's rows (case id, image, label, split) of the unlabelled pool, the labelled store and
    its test split. Pretraining sees the training phantoms without labels, never a held-out one. The
    labelled store holds the first `labelled` phantoms (training), the last two (validation) and the
    held-out phantoms (test); the phantoms between are unlabelled only, the hosts node paste draws
    (it skips the labelled store's training scans, and refuses a validation scan in the pool's
    training split, so the validation phantoms are in the pool's val split); pretraining reads every
    split."""
    rows = phantom_rows(phantoms, "p_", "train", labels=True)
    rows[-2:] = [(*r[:3], "val") for r in rows[-2:]]
    pool = [(case, image, "", split) for case, image, _, split in rows]
    return pool, rows[:labelled] + rows[-2:], phantom_rows(heldout, "h_", "test", labels=True)


# The settings of the demo run a folder holds: a rerun with the same ones reuses and finishes its stages.
MARK_FILE = ".lnfm-demo.json"
SETTINGS = ("cases", "labelled", "test", "pretrain_steps", "steps", "no_paste")  # what the stages' outputs depend on
# What the demo writes into --out: a folder holding only these, its first stage's phantoms among them, is a
# demo's from before MARK_FILE was kept.
DEMO_ENTRIES = {"phantoms_pelvis", "phantoms_heldout", "unlabelled.csv", "labelled.csv", "store_pelvis",
                "store_unlabelled", "pretrain", "finetune_pelvis", "export_pelvis", "predict", ".lnfm.lock"}


def claim_out(out: Path, settings: dict) -> None:
    """Record the demo's `settings` in `out`, or refuse (ConfigError, before any stage runs) a folder holding a
    demo run with other ones: its stages would each refuse the change in turn (synth's line names a --force
    the demo does not take), and a stage that took it would score a mix of two runs."""
    mark = out / MARK_FILE
    for p in (out, *out.parents):  # the nearest existing one must be a folder (mkdir makes the rest)
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{p}: exists and is not a folder (--out names the demo's folder)")
            break
    entries = {p.name for p in out.iterdir()} - {".lnfm.lock"} if out.is_dir() else set()
    earlier_demo = entries <= DEMO_ENTRIES and (out / "phantoms_pelvis").is_dir()  # its first stage's output
    if entries and not mark.is_file() and not earlier_demo:
        raise ConfigError(f"{out}: holds files and no demo run (no {MARK_FILE}): the demo would write its CSVs, "
                          f"phantoms and stores among them; choose a new or empty --out")
    if mark.is_file() and not mark.is_symlink():
        try:
            recorded = json.loads(mark.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            recorded = None
        if isinstance(recorded, dict) and recorded != settings:
            diff = "; ".join(f"--{k.replace('_', '-')}: {json.dumps(recorded.get(k))} there, {json.dumps(settings[k])} "
                             f"now" for k in settings if recorded.get(k) != settings[k])
            raise ConfigError(f"{out}: holds a demo run with other settings ({diff}): rerun with those, choose another "
                              f"--out, or remove the folder to start over")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mark, json.dumps(settings, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lnfm demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="folder for every demo output")
    ap.add_argument("--cases", type=int, default=16, help="training-variant pelvis phantoms (the unlabelled pool)")
    ap.add_argument("--labelled", type=int, default=4, help="labelled cases finetuning (and the U-Net) train on")
    ap.add_argument("--test", type=int, default=4, help="held-out phantoms both models are scored on")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600,
                    help="finetuning steps (the CPU recipe's 2800 would keep the demo past 15 minutes)")
    ap.add_argument("--no-peer", action="store_true", help="skip the MONAI U-Net trained for the same time")
    ap.add_argument("--no-paste", action="store_true",
                    help="finetune on the labelled cases alone, without pasting their nodes into the unlabelled scans")
    args = parse_args_once(ap, argv)
    for flag in ("labelled", "test", "pretrain_steps", "steps"):  # checked here, not by a stage after others ran
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.cases < args.labelled + 3:
        ap.error(f"--cases must leave 2 validation cases and an unlabelled one beside --labelled ({args.labelled})")

    check_apart({"--out": args.out}, {})  # a link to nothing: one line, not a demo run into wherever it points
    out = Path(args.out).resolve()
    claim_out(out, {k: getattr(args, k) for k in SETTINGS})  # before mkdir: a file or a user's folder is refused
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    every = max(1, args.steps // 3)
    t0 = time.time()

    # Training-variant phantoms, and held-out ones from the generator variant that training never
    # draws from (other spacing, orientation, noise, HU calibration, node shapes).
    phantoms, heldout = out / "phantoms_pelvis", out / "phantoms_heldout"
    _run([py, "-m", "lnfm", "synth", "--site", "pelvis", "--num-cases", str(args.cases), "--seed", "0",
          "--shape", "96,96,48", "--out", str(phantoms)], env)
    _run([py, "-m", "lnfm", "synth", "--site", "pelvis", "--heldout", "--num-cases", str(args.test), "--seed",
          "303", "--shape", "96,96,48", "--out", str(heldout)], env)

    pool, labelled, test = demo_rows(phantoms, heldout, args.labelled)
    real = [(f"real{i}", str(p), "", "train") for i, p in enumerate(_shared_ct())]
    (out / "unlabelled.csv").write_text(prepare_csv(pool + real, {r[0]: "unknown" for r in real}, folder=out))
    (out / "labelled.csv").write_text(prepare_csv(labelled + test, folder=out))
    store, unlabelled = out / "store_pelvis", out / "store_unlabelled"
    for csv, dest in ((out / "unlabelled.csv", unlabelled), (out / "labelled.csv", store)):
        _run([py, "-m", "lnfm", "prepare", "--input", str(csv), "--output", str(dest), "--spacing", "1.5,1.5,1.5",
              "--workers", "2"], env)

    pre = out / "pretrain"
    _run([py, "-m", "lnfm", "pretrain", "--config", "vit_tiny", "--data", str(unlabelled), "--workdir", str(pre),
          f"train.steps={args.pretrain_steps}", f"checkpoint.every={max(1, args.pretrain_steps // 3)}"], env)

    # --quick: 32^3 patches for the CPU with the site's own head and strategy, as `--site pelvis` does.
    # --paste-into: the labelled nodes are also pasted into the fat of the unlabelled scans (docs/finetuning.md).
    ft = out / "finetune_pelvis"
    paste = [] if args.no_paste else ["--paste-into", str(unlabelled)]
    _run([py, "-m", "lnfm", "finetune", "--site", "pelvis", "--data", str(store), "--init", str(pre),
          "--workdir", str(ft), "--quick", "--num-labeled", str(args.labelled), *paste, f"train.steps={args.steps}",
          f"train.eval_every={every}", f"checkpoint.every={every}"], env)

    export = out / "export_pelvis"
    _run([py, "-m", "lnfm", "export", "--checkpoint", str(ft), "--out", str(export), "--format", "orbax",
          "--force"], env)

    case_id, scan, _, _ = test[0]
    pred = out / "predict"
    _run([py, "-m", "lnfm", "predict", "--model", str(export), "--input", scan,
          "--output", str(pred / f"{case_id}_mask.nii.gz"), "--report", str(pred / f"{case_id}_nodes.csv"),
          "--overlay", str(pred / f"{case_id}_preview.png"), "--force"], env)  # a rerun replaces the demo's own

    summary = json.loads(FinetuneRun(ft).summary.read_text())
    print("\n== LNFM demo summary ==")
    print(f"phantoms: {phantoms} (training variant), {heldout} (held-out variant)")
    print(f"stores: {unlabelled} (pretraining), {store} (finetuning; test split = the held-out phantoms)")
    print(f"pretraining workdir: {pre}")
    keys = ["dice", "hd95", "assd", "nsd", "node_sensitivity", "fp_per_volume"]
    # Scored on the store's 1.5 mm grid; the comparison below scores the export's predictions on the raw scans.
    print(f"finetune (pelvis, {args.labelled} labelled, {summary['train_time_s']:.0f} s of training; held-out test "
          "cases on the store's grid): " + ", ".join(f"{k}={summary[k]:.3f}" if isinstance(summary.get(k), (int, float))
                                else f"{k}={summary.get(k)}" for k in keys))
    print(f"export: {export}")
    print(f"prediction for {case_id}: {pred}")
    if not args.no_peer:
        compare_with_unet(export, ft, store, summary, [TestCase(c, Path(i), Path(lb)) for c, i, lb, _ in test],
                          [TestCase(c, Path(i), Path(lb)) for c, i, lb, sp in labelled if sp == "val"],
                          None if args.no_paste else unlabelled)
    print(f"total time: {time.time() - t0:.0f}s")
    return 0


def compare_with_unet(export: Path, run: Path, store: Path, summary: dict, test: list[TestCase],
                      val: list[TestCase], paste_store: Path | None = None) -> None:
    """LNFM's Dice next to a MONAI U-Net's: same labelled cases, same loader, same training wall
    time, same held-out scans, same scoring (`lnfm.jobs.heldout`); each model's node size prior
    is tuned on the same validation cases. With `paste_store` (LNFM pasted its nodes into it) a
    second U-Net trains on those pasted patches too."""

    print("\n== LNFM vs MONAI U-Nets trained for the same time on the same labelled cases (raw held-out scans, "
          "as predict reads them) ==")
    if heldout.peers is None:
        print("U-Net: skipped (torch and MONAI are the dev extra: pip install 'lnfm[dev]')")
        return
    onednn.keep_off()  # the U-Nets train in this process: LNFM's oneDNN teams would slow PyTorch (lnfm.models.onednn)
    fn, meta = load_predictor(export)
    overlap = float(meta.inference.overlap)
    cfg = from_dict(FinetuneConfig, read_yaml(FinetuneRun(run).config))
    loader = dataclasses.replace(cfg.loader, batch_size=cfg.train.global_batch)
    lnfm_cases, lnfm_infer = heldout.evaluate(fn, meta, test, overlap)
    hosts = {"U-Net": []}
    if paste_store is not None:
        hosts["U-Net + paste"] = heldout.paste_hosts(paste_store, summary["train_ids"])
    rows = [("LNFM", lnfm_cases, summary["train_time_s"], cfg.train.steps, lnfm_infer)]
    for name, paste_into in hosts.items():
        unet = heldout.train_and_score_peer("unet", meta=meta, store=store, train_ids=summary["train_ids"],
                                            loader=loader, test=test, overlap=overlap, seed=cfg.train.seed,
                                            seconds=summary["train_time_s"], val=val, paste_into=paste_into)
        rows.append((name, unet["cases"], unet["train_time_s"], unet["steps"], unet["infer_s_per_volume"]))
    for name, cases, train_s, steps, infer in rows:
        agg = summarize([{k: v for k, v in c.items() if k != "case_id"} for c in cases])
        print(f"{name:13s} Dice {agg['dice']:.3f}, node sensitivity {agg['node_sensitivity']:.3f}, "
              f"FP/volume {agg['fp_per_volume']:.1f}  (train {train_s:.0f} s, {steps} steps, predict {infer:.1f} "
              f"s/volume, {len(cases)} held-out volumes)")


if __name__ == "__main__":
    sys.exit(main())
