"""Compile time of building a segmenter on XLA:CPU: conv and patch-embedding kernels drawn in
their 5-D shape against drawn as (fan_in, cout) matrices and reshaped (docs/benchmarks.md).

    python bench/init_compile.py [--sites pelvis,mediastinum] [--rounds 2]

Finetuning builds its model under `jax.jit` (`lnfm.models.sharding.create_sharded_model`), so
every parameter's random draw is compiled before the first step. For each site preset's segmenter
(and the `--quick` CPU preset's), each form runs in a fresh process (no compilation cache) and
times `jit(init).lower().compile()`; the forms alternate over the rounds. Both forms give the same
values bit for bit (tests/models/test_layers.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import jax
from flax import nnx
from lnfm.jobs.finetune import load_finetune_config
from lnfm.models import layers
from lnfm.models.heads import blocks
from lnfm.models.segmenter import segmenter_from_config
site, quick, form = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
if form == "5d":
    # the library's draw in the kernel's own shape, for the heads' convolutions and the patch embedding
    layers.fan_in_uniform = lambda scale: nnx.initializers.variance_scaling(scale, "fan_in", "uniform")
    blocks._conv_init = layers.fan_in_uniform(2.0)
cfg = load_finetune_config(site, quick=quick)
build = lambda: segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0))
params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param)))
t = time.perf_counter()
jax.jit(lambda: nnx.state(build())).lower().compile()
print(json.dumps({"compile_s": time.perf_counter() - t, "head": cfg.head.kind, "params": int(params)}))
"""


def measure(site: str, quick: bool, form: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, site, "1" if quick else "0", form], capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="pelvis,head_neck,axilla,mediastinum,abdomen")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    presets = [("pelvis", True)] + [(s, False) for s in args.sites.split(",") if s]
    print("| preset | head | parameters | 5-D draw s | flat draw s | ratio |")
    print("|---|---|---|---|---|---|")
    for site, quick in presets:
        times = {"5d": [], "flat": []}
        for _ in range(args.rounds):
            for form in times:
                row = measure(site, quick, form)
                times[form].append(row["compile_s"])
        old, new = statistics.median(times["5d"]), statistics.median(times["flat"])
        name = f"{site} --quick" if quick else site
        print(f"| {name} | {row['head']} | {row['params'] / 1e6:.2f} M | {old:.1f} | {new:.1f} | {old / new:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
