"""Metric time on a large CT-sized grid with ~30 lymph nodes.

Compares, on the same masks in one run:
  * lnfm: `evaluate_case` (Dice, HD95, ASSD, NSD at 2 mm, lesion-wise detection), and
    HD95 + ASSD alone;
  * MONAI `compute_hausdorff_distance(percentile=95)` + `compute_average_surface_distance`;
  * DeepMind surface-distance NSD (`compute_surface_distances` + surface Dice);
  * an unrestricted full-volume EDT (scipy `distance_transform_edt` of each whole surface
    complement with `sampling=spacing`), the naive way to get the same distances.

Usage: .venv/bin/python bench/metrics.py [--shape 512,512,300] [--nodes 30] [--skip-full-edt]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import ndimage


def make_case(shape, n_nodes, spacing, seed=0):
    """Ellipsoid nodes (short axis 3-20 mm) in a large grid; the prediction is shifted/eroded/
    dilated per node, misses a few and adds a few false positives."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    sp = np.asarray(spacing)
    for i in range(n_nodes + 4):
        radii = rng.uniform(2.0, 12.0, 3) / sp
        centre = rng.uniform(0.2, 0.8, 3) * np.array(shape)
        r = np.ceil(radii).astype(int) + 2
        lo = np.maximum(centre.astype(int) - r, 0)
        hi = np.minimum(centre.astype(int) + r + 1, shape)
        grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        inside = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grid, centre, radii)) <= 1
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        if i < n_nodes:
            gt[box] |= inside
            if i % 10 == 9:
                continue  # missed node
            node = ndimage.binary_dilation(inside) if i % 3 == 0 else inside
            node = ndimage.binary_erosion(node) if i % 3 == 1 else node
            pred[box] |= np.roll(node, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
        else:
            pred[box] |= inside  # false positive
    return pred, gt


def timed(fn, repeat=1):
    best, out = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def full_volume_edt(pred, gt, spacing):
    """HD95 and ASSD from whole-volume distance transforms (no cropping)."""
    sp = np.asarray(spacing)
    s_p = pred & ~ndimage.binary_erosion(pred)
    s_g = gt & ~ndimage.binary_erosion(gt)
    d_pg = ndimage.distance_transform_edt(~s_g, sampling=sp)[s_p]
    d_gp = ndimage.distance_transform_edt(~s_p, sampling=sp)[s_g]
    return max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), np.concatenate([d_pg, d_gp]).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="512,512,300")
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--spacing", default="0.8,0.8,1.5")
    ap.add_argument("--skip-full-edt", action="store_true", help="skip the slow unrestricted EDT baseline")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    spacing = tuple(float(s) for s in args.spacing.split(","))

    from lnfm.eval.metrics import assd, evaluate_case, hd95

    pred, gt = make_case(shape, args.nodes, spacing)
    print(f"grid {shape} spacing {spacing}: {args.nodes} nodes, {int(gt.sum())} gt / {int(pred.sum())} pred voxels")

    rows = []
    t_case, case = timed(lambda: evaluate_case(pred, gt, spacing), repeat=2)
    rows.append(("lnfm evaluate_case (Dice, HD95, ASSD, NSD, detection)", t_case))
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in case.items()})
    t_ours, (h_ours, a_ours) = timed(lambda: (hd95(pred, gt, spacing), assd(pred, gt, spacing)), repeat=2)
    rows.append(("lnfm hd95 + assd", t_ours))

    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    tp, tg = torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None])

    def monai_both():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = compute_hausdorff_distance(tp, tg, percentile=95, spacing=list(spacing)).item()
            a = compute_average_surface_distance(tp, tg, symmetric=True, spacing=list(spacing)).item()
        return h, a

    t_monai, (h_m, a_m) = timed(monai_both)
    rows.append(("MONAI HD95 + ASSD", t_monai))
    print(f"hd95 ours {h_ours:.6f} MONAI {h_m:.6f}; assd ours {a_ours:.6f} MONAI {a_m:.6f}")

    try:
        import surface_distance as deepmind

        t_dm, nsd_dm = timed(lambda: deepmind.compute_surface_dice_at_tolerance(
            deepmind.compute_surface_distances(gt, pred, spacing), 2.0))
        rows.append(("DeepMind surface-distance NSD@2mm", t_dm))
        print(f"nsd ours {case['nsd']:.6f} DeepMind {nsd_dm:.6f}")
    except ImportError:
        pass

    if not args.skip_full_edt:
        t_full, (h_f, a_f) = timed(lambda: full_volume_edt(pred, gt, spacing))
        rows.append(("full-volume EDT HD95 + ASSD", t_full))
        print(f"hd95 full EDT {h_f:.6f}; assd full EDT {a_f:.6f}")

    print("\n| method | seconds | time / lnfm hd95+assd |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {t / t_ours:.1f}x |")


if __name__ == "__main__":
    main()
