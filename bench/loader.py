"""Loader throughput: random 3D patches/s from the prepared TensorStore dataset vs the usual
uncached baseline (nibabel loads the whole .nii.gz, then crops), same cases, same patch size.

python bench/loader.py [--cases 3] [--shape 512,512,160] [--patch 96] [--workdir /tmp/lnfm_bench_loader]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import flags
from scipy import ndimage

from lnfm.data.loader import LoaderConfig, make_loader, normalize
from lnfm.data.prepare import PrepareConfig, prepare_dataset


def synthetic_ct(shape, seed) -> np.ndarray:
    """Body-like int16 HU volume: smooth soft-tissue texture in an elliptic body, air outside."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, [max(2, s // 16) for s in shape])
    tissue = ndimage.zoom(coarse, 16, order=1)[: shape[0], : shape[1], : shape[2]]
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1
    hu = np.where(body[..., None], 40 + 60 * tissue + rng.normal(0, 15, shape), -1000)
    return hu.astype(np.int16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--shape", default="512,512,160")
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--baseline-patches", type=int, default=6)
    ap.add_argument("--patches", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="grain worker processes for the second measurement")
    ap.add_argument("--workdir", default="/tmp/lnfm_bench_loader")
    args = ap.parse_args()
    flags.FLAGS.mark_as_parsed()
    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(args.workdir)
    raw = work / "raw"
    paths = []
    for i in range(args.cases):
        p = raw / f"case{i}.nii.gz"
        if not p.exists():
            raw.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(synthetic_ct(shape, i), np.diag([0.8, 0.8, 1.5, 1.0])), str(p))
        paths.append(p)
    csv = work / "cases.csv"
    # prepare reads a CSV's relative paths from the CSV's folder
    csv.write_text("case_id,image,split\n" + "".join(f"case{i},{p.relative_to(work).as_posix()},train\n"
                                                     for i, p in enumerate(paths)))
    store = str(work / "store")
    t0 = time.perf_counter()
    prepare_dataset(str(csv), store, PrepareConfig(workers=2, crop_body=False, salt="bench"), show_progress=False)
    prep_s = time.perf_counter() - t0

    patch = (args.patch,) * 3
    cfg = LoaderConfig(patch_size=patch, batch_size=1, flips=False, rot90=False, intensity_scale=0.0,
                       intensity_shift=0.0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(args.baseline_patches):
        img = np.asarray(nib.load(str(paths[rng.integers(len(paths))])).get_fdata(dtype=np.float32))
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(img.shape, patch)]
        crop = img[tuple(slice(a, a + p) for a, p in zip(start, patch))]
        normalize(crop[..., None], cfg)
    base = args.baseline_patches / (time.perf_counter() - t0)

    rows = []
    for workers in (0, args.workers):
        it = iter(make_loader([store], dataclasses.replace(cfg, workers=workers), shard_index=0, shard_count=1))
        next(it)  # start-up (worker processes, first chunk reads) is not throughput
        t0 = time.perf_counter()
        for _ in range(args.patches):
            next(it)
        rows.append((workers, args.patches / (time.perf_counter() - t0)))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.cases} cases {shape} int16, patch {patch}; prepare {prep_s:.1f}s")
    print(f"baseline nibabel .nii.gz load + crop: {base:.2f} patches/s")
    for workers, rate in rows:
        print(f"TensorStore + grain, {workers} workers: {rate:.1f} patches/s  ratio {rate / base:.1f}x")


if __name__ == "__main__":
    main()
