"""FROC analysis of lymph-node detection from probability maps.

Candidates: the connected components of ``prob >= min(thresholds)`` in each
volume. Each candidate is scored by the maximum probability inside it, and it
hits the ground-truth nodes it matches under the `detect_nodes` criterion
(evaluated on the candidate's full extent at that lowest threshold). At a
threshold t the candidates scoring >= t are kept: a node is detected when a
kept candidate hits it; a kept candidate that hits no node is a false
positive (extra candidates on an already hit node are not false positives).

Sensitivity at a false-positive rate r is the best sensitivity among the
operating points whose mean FP per volume is <= r (0 when none is), so it never
credits an interpolated point that no threshold achieves. The CPM-style score
is the mean over r in (0.5, 1, 2, 4, 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from lnfm.eval.detection import Criterion, describe_components, label_components, match_matrix

FP_RATES = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


@dataclass
class Froc:
    """FROC curve and its summary."""

    thresholds: np.ndarray  # ascending
    sensitivity: np.ndarray  # per threshold, pooled over volumes
    fp_per_volume: np.ndarray  # per threshold, mean over volumes
    sensitivity_at: dict[float, float]  # FP rate -> sensitivity
    cpm: float  # mean of sensitivity_at
    n_nodes: int
    n_volumes: int


def _candidates(prob: np.ndarray, gt: np.ndarray, spacing, t_min, criterion, min_overlap, max_distance_mm,
                connectivity):
    """(scores, hits) for one volume: max probability per candidate and its (n_cand, n_gt) match matrix."""
    c_lab, n_c = label_components(prob >= t_min, connectivity)
    g_lab, n_g = label_components(gt, connectivity)
    scores = np.asarray(ndimage.maximum(prob, c_lab, np.arange(1, n_c + 1)), np.float64).reshape(-1)
    hits = match_matrix(c_lab, describe_components(c_lab, n_c, spacing), g_lab,
                        describe_components(g_lab, n_g, spacing), spacing, criterion, min_overlap,
                        max_distance_mm)
    return scores, hits


def froc(
    prob_maps: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    spacing,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    criterion: Criterion = "overlap",
    min_overlap: float = 0.1,
    max_distance_mm: float = 10.0,
    connectivity: int = 26,
    fp_rates: Sequence[float] = FP_RATES,
) -> Froc:
    """FROC over probability thresholds for a set of volumes (see module docstring).

    `spacing` is one (sx, sy, sz) for all volumes or one per volume.
    """
    if len(prob_maps) != len(gt_masks) or not prob_maps:
        raise ValueError(f"need the same non-zero number of probability maps and masks, got "
                         f"{len(prob_maps)} and {len(gt_masks)}")
    thr = np.sort(np.asarray(thresholds, np.float64))
    spacings = list(spacing) if np.ndim(spacing) == 2 else [spacing] * len(prob_maps)
    detected = np.zeros(len(thr))
    fps = np.zeros(len(thr))
    n_nodes = 0
    for prob, gt, sp in zip(prob_maps, gt_masks, spacings):
        prob, gt = np.asarray(prob), np.asarray(gt, bool)
        if prob.shape != gt.shape:
            raise ValueError(f"probability map {prob.shape} and mask {gt.shape} differ in shape")
        scores, hits = _candidates(prob, gt, sp, thr[0], criterion, min_overlap, max_distance_mm, connectivity)
        n_nodes += hits.shape[1]
        is_fp = ~hits.any(axis=1)
        for i, t in enumerate(thr):
            kept = scores >= t
            detected[i] += hits[kept].any(axis=0).sum()
            fps[i] += (kept & is_fp).sum()
    sens = detected / n_nodes if n_nodes else np.zeros(len(thr))
    fpv = fps / len(prob_maps)
    at = {float(r): float(sens[fpv <= r].max()) if (fpv <= r).any() else 0.0 for r in fp_rates}
    return Froc(thr, sens, fpv, at, float(np.mean(list(at.values()))), n_nodes, len(prob_maps))
