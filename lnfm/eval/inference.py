"""Sliding-window inference over a whole volume with Gaussian blending.

Window placement and the importance map are those of MONAI's
`sliding_window_inference` (`dense_patch_slices` with step
``int(roi * (1 - overlap))``, last window flush with the far edge; Gaussian
weights ``exp(-x^2 / (2 (sigma_scale * roi)^2))`` centred on the window and
clamped below at 1e-3), so the two give the same result for the same predictor.

Memory: the blended output (X, Y, Z, K) and the weight sum (X, Y, Z) live on
the host in float32; the device only ever sees one batch of `sw_batch_size`
windows. Peak host memory is about the (padded) input plus 4 * X*Y*Z * (K + 1)
bytes plus two window batches; the output is cast to `out_dtype` at the end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal
from collections.abc import Callable, Sequence

import numpy as np


@dataclass
class InferenceConfig:
    """Sliding-window inference settings (keyword arguments of `sliding_window_inference`)."""

    roi: tuple[int, int, int] = (96, 96, 96)  # window in voxels (X, Y, Z); finetune and model.json: the training patch
    overlap: float = 0.5  # fraction of a window shared with its neighbour along each axis (0 to 0.75)
    mode: Literal["gaussian", "constant"] = "gaussian"  # blending weights of window outputs
    sigma_scale: float = 0.125  # Gaussian sigma as a fraction of the window size
    sw_batch_size: int = 4  # windows per predict_fn call
    tta_flips: bool = False  # average over all 8 axis-flip combinations


MAX_OVERLAP = 0.75  # 64 passes per voxel, 8x nnU-Net's cost: beyond it a prediction takes hours


def window_problem(overlap: float | None, sw_batch_size: int | None, overlap_name: str = "overlap",
                   batch_name: str = "sw_batch_size", sigma_scale: float | None = None,
                   sigma_name: str = "sigma_scale") -> str | None:
    """Why these sliding-window settings cannot run, in one line naming each as its caller knows it
    (a flag, a model.json key), or None; a None value is not checked. The one owner of these ranges."""
    if overlap is not None and not 0 <= overlap < 1:
        return f"{overlap_name}: {overlap:g} is not in [0, 1) (the fraction of a window its neighbour shares)"
    if overlap is not None and overlap > MAX_OVERLAP:  # the window count grows as (1 / (1 - overlap))^3
        return (f"{overlap_name}: {overlap:g} is above {MAX_OVERLAP:g} (each voxel would pass through the network "
                f"about {(1 / (1 - overlap)) ** 3:.3g} times; nnU-Net's 0.5 passes it 8 times)")
    if sw_batch_size is not None and sw_batch_size < 1:
        return f"{batch_name}: {sw_batch_size} windows per pass; it must be at least 1"
    if sigma_scale is not None and not (np.isfinite(sigma_scale) and sigma_scale > 0):
        return f"{sigma_name} {sigma_scale:g} is not in (0, inf) (a fraction of the window)"
    return None


def importance_map(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Per-voxel blending weight of one window (float32, shape roi)."""
    if mode == "constant":
        return np.ones(tuple(roi), np.float32)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    w = np.ones((), np.float64)
    for size in roi:
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        g = np.exp(-(x**2) / (2.0 * (sigma_scale * size) ** 2))
        w = w[..., None] * g
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start positions along one axis (size >= roi)."""
    if roi >= size:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    starts = []
    for i in range(-(-size // step)):
        start = i * step
        if start + roi >= size:
            starts.append(size - roi)
            break
        starts.append(start)
    return starts


def flip_sets(tta_flips) -> list[tuple[int, ...]]:
    """Spatial axes to flip for each TTA pass: False -> [()], True -> all 8 subsets of (0, 1, 2)."""
    if tta_flips is False or tta_flips is None:
        return [()]
    if tta_flips is True:
        return [c for r in range(4) for c in itertools.combinations(range(3), r)]
    sets = [tuple(sorted(int(a) for a in s)) for s in tta_flips]
    if not sets or any(a not in (0, 1, 2) for s in sets for a in s):
        raise ValueError(f"tta_flips must be a bool or a list of axis tuples from (0, 1, 2), got {tta_flips!r}")
    return sets


def sliding_window_inference(
    predict_fn: Callable,
    volume: np.ndarray,
    roi: Sequence[int],
    *,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 4,
    tta_flips=False,
    num_classes: int | None = None,
    pad_mode: Literal["edge", "constant"] = "edge",
    pad_value: float = 0.0,
    out_dtype=np.float32,
) -> np.ndarray:
    """Blend `predict_fn` over overlapping windows of `volume` (X, Y, Z, C) -> (X, Y, Z, K).

    `predict_fn` maps a batch (B, *roi, C) to (B, *roi, K), B = sw_batch_size or the
    number of windows if smaller; it is always called with that one shape (the last
    batch is filled up with repeats), so a jitted function compiles once. Its outputs (logits or
    probabilities, the caller's choice) are averaged with the window weights.
    Volumes smaller than `roi` are padded (half before, half after, as MONAI) and the result is
    cropped back: `pad_mode="edge"` repeats the border voxels (MONAI's padding_mode="replicate"),
    "constant" fills with `pad_value` (MONAI's default, 0). Edge is the default because a network
    meets a volume thinner than its window only here: training patches are cut from inside larger
    volumes, so a constant slab (0 is the HU window's floor, darker than fat) is an input it never
    saw, and it answered with false nodes along it. On held-out dev phantoms (a quarter of them
    0.8 mm slices: 26 slices of 1.5 mm under a 32-voxel window) the CPU recipe's models scored
    0.246 Dice with constant padding and 0.371 with edge padding (10 seeds; docs/results/README.md).
    `tta_flips` averages each window over axis flips (True: all 8;
    or a list such as [(), (0,), (1,), (2,)]), flipping predictions back before
    blending. `num_classes` checks K when given.
    """
    volume = np.asarray(volume)
    roi = tuple(int(r) for r in roi)
    if volume.ndim != 4:
        raise ValueError(f"volume must be (X, Y, Z, C), got shape {volume.shape}")
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi must be 3 positive sizes, got {roi}")
    problem = window_problem(overlap, sw_batch_size)
    if problem:
        raise ValueError(problem)
    flips = flip_sets(tta_flips)
    if pad_mode not in ("edge", "constant"):
        raise ValueError(f"pad_mode must be 'edge' or 'constant', got {pad_mode!r}")

    shape = volume.shape[:3]
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, shape)]
    if any(a or b for a, b in pad):
        fill = {"constant_values": pad_value} if pad_mode == "constant" else {}
        volume = np.pad(volume, pad + [(0, 0)], mode=pad_mode, **fill)
    # Windows are copied out row by row: from a Fortran-ordered volume (NIfTI's order) each copy
    # would be a strided transpose, several times slower than one reordering up front.
    volume = np.ascontiguousarray(volume)
    size = volume.shape[:3]
    corners = list(itertools.product(*(window_starts(s, r, overlap) for s, r in zip(size, roi))))
    weight = importance_map(roi, mode, sigma_scale)
    # A batch larger than the windows would only compute (and hold in memory) repeats of them.
    sw_batch_size = min(sw_batch_size, len(corners))

    out = None
    norm = np.zeros(size, np.float32)
    for c in corners:
        norm[tuple(slice(a, a + r) for a, r in zip(c, roi))] += weight

    def run(batch_corners):
        windows = [volume[tuple(slice(a, a + r) for a, r in zip(c, roi))] for c in batch_corners]
        windows += [windows[0]] * (sw_batch_size - len(windows))
        x = np.stack(windows).astype(np.float32, copy=False)
        # Dispatch every flip before reading any result back, so the device keeps busy.
        return [(axes, predict_fn(np.flip(x, [a + 1 for a in axes]) if axes else x)) for axes in flips]

    batches = [corners[i : i + sw_batch_size] for i in range(0, len(corners), sw_batch_size)]
    pending = run(batches[0])
    for b, batch_corners in enumerate(batches):
        results = pending
        if b + 1 < len(batches):
            pending = run(batches[b + 1])  # overlap the next batch's compute with this accumulation
        pred = None
        for axes, y in results:
            y = np.asarray(y, np.float32)
            if y.ndim != 5 or y.shape[:4] != (sw_batch_size, *roi):
                raise ValueError(f"predict_fn returned shape {y.shape}, expected ({sw_batch_size}, {roi[0]}, "
                                 f"{roi[1]}, {roi[2]}, K)")
            y = np.flip(y, [a + 1 for a in axes]) if axes else y
            pred = y if pred is None else pred + y
        if len(flips) > 1:
            pred = pred / len(flips)
        if out is None:
            k = pred.shape[-1]
            if num_classes is not None and k != num_classes:
                raise ValueError(f"predict_fn returned {k} channels, expected num_classes={num_classes}")
            out = np.zeros((*size, k), np.float32)
            scratch = np.empty((*roi, k), np.float32)  # reused: a fresh window-sized temporary costs page faults
        for c, p in zip(batch_corners, pred):
            out[tuple(slice(a, a + r) for a, r in zip(c, roi))] += np.multiply(p, weight[..., None], out=scratch)

    out /= norm[..., None]
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pad, shape))
    return out[crop].astype(out_dtype, copy=False)
