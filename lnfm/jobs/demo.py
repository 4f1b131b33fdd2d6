"""`make demo`: the main job end to end on built-in data, on a laptop CPU.

phantoms -> prepare -> MAE pretraining -> finetune --site pelvis -> evaluate ->
export -> predict. Each stage runs the same `python -m lnfm <job>` command a user
would type (printed before it runs), so the demo doubles as a walkthrough and works
from an installed package as well as from a checkout. The real CTs under
../shared/data, when present, join the unlabelled pretraining data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lnfm.data.shared import shared_data_dir
from lnfm.runs import FinetuneRun

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lnfm demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="folder for every demo output")
    ap.add_argument("--cases", type=int, default=16, help="pelvis phantoms to generate")
    ap.add_argument("--steps", type=int, default=300, help="pretraining and finetuning steps each")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    every = max(1, args.steps // 3)
    t0 = time.time()

    phantoms = out / "phantoms_pelvis"
    _run([py, "-m", "lnfm", "synth", "--site", "pelvis", "--num-cases", str(args.cases), "--seed", "0",
          "--shape", "96,96,48", "--out", str(phantoms)], env)

    # Real unlabelled CT from ../shared/data joins pretraining when present (CSV input, no labels).
    store = out / "store_pelvis"
    _run([py, "-m", "lnfm", "prepare", "--input", str(phantoms), "--output", str(store),
          "--spacing", "1.5,1.5,1.5", "--workers", "2"], env)
    stores = [str(store)]
    real = _shared_ct()
    if real:
        csv = out / "real_ct.csv"
        csv.write_text("case_id,image,label,site\n" + "".join(
            f"real{i},{p},,unknown\n" for i, p in enumerate(real)))
        real_store = out / "store_real"
        _run([py, "-m", "lnfm", "prepare", "--input", str(csv), "--output", str(real_store),
              "--spacing", "1.5,1.5,1.5", "--workers", "2"], env)
        stores.append(str(real_store))

    pre = out / "pretrain"
    _run([py, "-m", "lnfm", "pretrain", "--config", "vit_tiny", "--data", ",".join(stores),
          "--workdir", str(pre), f"train.steps={args.steps}", f"checkpoint.every={every}"], env)

    # --quick shrinks patches to 32^3 for the CPU; the site's own head (light) and
    # strategy (first_k) are kept, so the demo finetunes as `--site pelvis` does.
    ft = out / "finetune_pelvis"
    _run([py, "-m", "lnfm", "finetune", "--site", "pelvis", "--data", str(store), "--init", str(pre),
          "--workdir", str(ft), "--quick", "head.kind=light", "strategy.freeze=first_k", "strategy.k=2",
          f"train.steps={args.steps}", f"train.eval_every={every}", f"checkpoint.every={every}"], env)

    export = out / "export_pelvis"
    _run([py, "-m", "lnfm", "export", "--checkpoint", str(ft), "--out", str(export), "--format", "orbax",
          "--force"], env)

    records = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines() if line.strip()]
    test_case = next(r for r in records if r["split"] == "test")["case_id"]
    scan = phantoms / "imagesTr" / f"{test_case}_0000.nii.gz"
    pred = out / "predict"
    _run([py, "-m", "lnfm", "predict", "--model", str(export), "--input", str(scan),
          "--output", str(pred / f"{test_case}_mask.nii.gz"), "--report", str(pred / f"{test_case}_nodes.csv"),
          "--overlay", str(pred / f"{test_case}_preview.png")], env)

    summary = json.loads(FinetuneRun(ft).summary.read_text())
    print("\n== LNFM demo summary ==")
    print(f"phantoms: {phantoms}")
    print(f"store: {', '.join(stores)}")
    print(f"pretraining workdir: {pre}")
    keys = ["dice", "hd95", "assd", "nsd", "node_sensitivity", "fp_per_volume"]
    print("finetune (pelvis, test cases): " + ", ".join(
        f"{k}={summary[k]:.3f}" if isinstance(summary.get(k), (int, float)) else f"{k}={summary.get(k)}" for k in keys))
    print(f"export: {export}")
    print(f"prediction for {test_case}: {pred}")
    print(f"total time: {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
