"""One prepared accelerator benchmark: every GPU figure LNFM claims, in one run of a few minutes.

Install on a fresh CUDA 12 machine (one H100/H200), from the repository root:

    python3 -m venv .venv && .venv/bin/pip install -q -e '.[cuda12]' torch monai
    .venv/bin/python bench/gpu.py --out gpu.json

It prints one markdown table and writes the same rows as JSON. Sections (each timed
after warm-up steps, compile excluded from the step figures and reported apart):

0. Attention: cuDNN's fused kernel against XLA's on the ViT-B shape (max difference).
1. ViT-B/16 MAE pretraining step at 128^3, bf16 compute, fp32 parameters: step time,
   volumes/s, tokens/s, MFU, and the scale planner's expected step time beside it.
2. The same model in PyTorch (MONAI `MaskedAutoEncoderViT`, bf16 autocast, AdamW), and
   under `torch.compile` when it compiles within its budget: LNFM's ratio.
3. Swin-B SimMIM pretraining step at 128^3.
4. The Grain loader's patches/s on a prepared phantom store against what the ViT-B
   step consumes, with a verdict (data-bound unless the loader has 2x headroom).
5. `lnfm predict` wall time on a 512x512x300 CT (0.8 x 0.8 x 1.5 mm), as a user runs it:
   a fresh process, reading, preprocessing, sliding window, post-processing, writing.

`--dry-run` runs every section at toy size on the CPU; the test suite does that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling bench scripts
from loader import synthetic_ct  # noqa: E402
from train_step import time_lnfm, time_monai  # noqa: E402

from lnfm.data.loader import LoaderConfig, make_loader  # noqa: E402
from lnfm.jobs.pretrain import load_pretrain_config  # noqa: E402
from lnfm.train.mfu import expected_step_time, mfu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs at: the real benchmark or the CPU dry run."""

    vit: list[str]
    swin: list[str]
    batch: int
    steps: int
    warmup: int
    phantoms: int
    phantom_shape: str
    loader_patches: int
    loader_workers: int
    ct_shape: tuple[int, int, int]
    torch_compile: bool
    finetune: tuple[str, ...] = ()  # overrides of the pelvis preset for the model predict runs


FULL = Sizes(vit=["model.size=b", "model.img_size=[128,128,128]", "model.patch_size=[16,16,16]",
                  "model.dtype=bfloat16"],
             swin=["model.img_size=[128,128,128]", "model.dtype=bfloat16"],
             batch=8, steps=10, warmup=3, phantoms=8, phantom_shape="192,192,160", loader_patches=200,
             loader_workers=min(8, os.cpu_count() or 1), ct_shape=(512, 512, 300), torch_compile=True)
DRY = Sizes(vit=["model.size=tiny", "model.img_size=[32,32,32]", "model.patch_size=[8,8,8]",
                 "model.dtype=float32"],
            swin=["model.img_size=[32,32,32]", "model.size=tiny", "model.window_size=[2,2,2]",
                  "model.dtype=float32"],
            batch=2, steps=1, warmup=1, phantoms=3, phantom_shape="48,48,24", loader_patches=4, loader_workers=0,
            ct_shape=(64, 64, 30), torch_compile=False,
            finetune=("site.patch=[32,32,32]", "model.img_size=[32,32,32]", "model.patch_size=[8,8,8]"))


def bench_attention() -> dict:
    """cuDNN fused attention against XLA's on the ViT-B shape (2 x 512 tokens, 12 heads of 64), bf16.

    The model picks cuDNN on a GPU (`lnfm.models.layers.attention_implementation`); this
    checks that both paths give the same output where both run. On a CPU only XLA runs,
    and it is checked against a float64 numpy softmax instead.
    """
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 512, 12, 64)), jnp.bfloat16) for _ in range(3))
    xla = np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="xla"), np.float64)
    if jax.default_backend() == "gpu":
        other, name = np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), np.float64), "cudnn"
    else:
        qf, kf, vf = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
        s = qf @ kf.transpose(0, 1, 3, 2) / 8.0
        w = np.exp(s - s.max(-1, keepdims=True))
        other, name = ((w / w.sum(-1, keepdims=True)) @ vf).transpose(0, 2, 1, 3), "numpy float64"
    return {"section": f"attention: xla vs {name} (bf16)", "max_abs_diff": float(np.abs(xla - other).max())}


def _device() -> str:
    dev = jax.devices()[0]
    return f"{jax.device_count()}x {dev.device_kind}"


def _step_row(name: str, cfg, batch: int, step_s: float, flops: float | None, extra: dict | None = None) -> dict:
    patch = cfg.model.patch_size if cfg.model.arch == "vit" else cfg.model.swin_patch_size
    tokens = batch * int(np.prod([s // p for s, p in zip(cfg.model.img_size, patch)]))
    kind = jax.devices()[0].device_kind
    predicted = expected_step_time(flops, kind, jax.device_count())
    return {"section": name, "step_s": step_s, "volumes_per_s": batch / step_s, "tokens_per_s": tokens / step_s,
            "mfu": mfu(flops, step_s, kind, jax.device_count()), "planner_step_s": predicted, **(extra or {})}


def bench_vit(sz: Sizes) -> tuple[dict, object]:
    cfg = load_pretrain_config("vit_b", [*sz.vit, f"train.global_batch={sz.batch}"])
    step_s, flops = time_lnfm(cfg, sz.batch, sz.steps, sz.warmup)
    return _step_row("ViT MAE (LNFM, JAX)", cfg, sz.batch, step_s, flops), cfg


def bench_monai(cfg, sz: Sizes, lnfm_step_s: float) -> list[dict]:
    rows = []
    eager = time_monai(cfg, sz.batch, sz.steps, sz.warmup)
    rows.append({"section": "ViT MAE (MONAI, PyTorch autocast)", "step_s": eager, "volumes_per_s": sz.batch / eager,
                 "lnfm_speedup": eager / lnfm_step_s})
    if sz.torch_compile:
        try:
            compiled = time_monai(cfg, sz.batch, sz.steps, sz.warmup, compile=True)
            rows.append({"section": "ViT MAE (MONAI, torch.compile)", "step_s": compiled,
                         "volumes_per_s": sz.batch / compiled, "lnfm_speedup": compiled / lnfm_step_s})
        except Exception as err:  # a compiler failure is a result to report, not a reason to lose the run
            rows.append({"section": "ViT MAE (MONAI, torch.compile)", "error": f"{type(err).__name__}: {err}"[:200]})
    return rows


def bench_swin(sz: Sizes) -> dict:
    cfg = load_pretrain_config("swin_b", [*sz.swin, f"train.global_batch={sz.batch}"])
    step_s, flops = time_lnfm(cfg, sz.batch, sz.steps, sz.warmup)
    return _step_row("Swin SimMIM (LNFM, JAX)", cfg, sz.batch, step_s, flops)


def _run(cmd: list[str], cwd: Path) -> float:
    """Wall seconds of a subprocess; its output is shown only when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def make_store(sz: Sizes, work: Path) -> Path:
    py = sys.executable
    _run([py, str(REPO / "data_prep/synth.py"), "--site", "pelvis", "--num-cases", str(sz.phantoms), "--seed", "0",
          "--shape", sz.phantom_shape, "--no-gallery", "--out", str(work / "phantoms")], work)
    _run([py, str(REPO / "data_prep/prepare.py"), "--input", str(work / "phantoms"), "--output", str(work / "store"),
          "--spacing", "1.5,1.5,1.5"], work)
    return work / "store"


def bench_loader(store: Path, vit_cfg, sz: Sizes, step_s: float) -> dict:
    patch = tuple(vit_cfg.model.img_size)
    cfg = LoaderConfig(patch_size=patch, batch_size=1, workers=sz.loader_workers)
    it = iter(make_loader([str(store)], cfg, shard_index=0, shard_count=1))
    next(it)  # worker start-up and first chunk reads are not throughput
    t0 = time.perf_counter()
    for _ in range(sz.loader_patches):
        next(it)
    rate = sz.loader_patches / (time.perf_counter() - t0)
    need = sz.batch / step_s
    verdict = "not data-bound" if rate >= 2 * need else "DATA-BOUND (loader < 2x the step's consumption)"
    return {"section": f"loader ({sz.loader_workers} workers, {patch[0]}^3 patches)", "patches_per_s": rate,
            "step_consumes_per_s": need, "headroom": rate / need, "verdict": verdict}


def bench_predict(store: Path, sz: Sizes, work: Path) -> dict:
    py = sys.executable
    ft, export = work / "finetune", work / "export"
    _run([py, str(REPO / "finetune/finetune.py"), "--site", "pelvis", "--data", str(store), "--workdir", str(ft),
          "--init", "scratch", "--num-labeled", "2", "train.steps=2", "train.eval_every=0", "train.log_every=1",
          *sz.finetune], work)
    _run([py, "-m", "lnfm", "export", "--checkpoint", str(ft), "--out", str(export), "--format", "orbax"], work)
    ct = work / "ct_large.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_ct(sz.ct_shape, 0), np.diag([0.8, 0.8, 1.5, 1.0])), str(ct))
    wall = _run([py, "-m", "lnfm", "predict", "--model", str(export), "--input", str(ct),
                 "--output", str(work / "mask.nii.gz"), "--force"], work)
    mask = np.asarray(nib.load(str(work / "mask.nii.gz")).dataobj)
    if mask.shape != sz.ct_shape:
        raise RuntimeError(f"predict wrote a mask of shape {mask.shape} for a CT of shape {sz.ct_shape}")
    return {"section": f"lnfm predict {'x'.join(map(str, sz.ct_shape))} CT (pelvis preset, fresh process)",
            "wall_s": wall}


def markdown(rows: list[dict], device: str) -> str:
    cols = ["section", "step_s", "planner_step_s", "volumes_per_s", "tokens_per_s", "mfu", "lnfm_speedup",
            "patches_per_s", "step_consumes_per_s", "headroom", "verdict", "wall_s", "max_abs_diff", "error"]
    used = [c for c in cols if any(c in r and r[c] is not None for r in rows)]

    def cell(col: str, v) -> str:
        if v is None:
            return ""
        if col == "mfu":
            return f"{v:.1%}"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"device: {device}", "", "| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for r in rows:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c in used) + " |")
    return "\n".join(lines)


def run(sz: Sizes, work: Path) -> list[dict]:
    rows = [bench_attention()]
    vit_row, vit_cfg = bench_vit(sz)
    rows.append(vit_row)
    rows += bench_monai(vit_cfg, sz, vit_row["step_s"])
    rows.append(bench_swin(sz))
    store = make_store(sz, work)
    rows.append(bench_loader(store, vit_cfg, sz, vit_row["step_s"]))
    rows.append(bench_predict(store, sz, work))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every section at toy size on the CPU (tests)")
    ap.add_argument("--out", default="gpu_bench.json", help="JSON file of the rows")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    sz = DRY if args.dry_run else FULL
    if not args.dry_run and jax.default_backend() != "gpu":
        print(f"bench/gpu.py: no GPU visible to JAX (backend {jax.default_backend()}); use --dry-run on a CPU",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = run(sz, Path(tmp))
    device = _device()
    table = markdown(rows, device)
    print(table)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    Path(args.out).write_text(json.dumps({"device": device, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"),
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
