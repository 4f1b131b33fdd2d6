"""Lesion-wise lymph-node detection: connected components of prediction and truth, matched.

A ground-truth node counts as detected (TP) when at least one predicted
component matches it; a predicted component that matches no node is a false
positive. One component may match several nodes (a prediction bridging two
touching nodes detects both) and several components may match one node (a
node predicted in two pieces is one TP and no FP), as in lesion-wise LN
detection studies.

Matching criteria:
* ``"overlap"``: intersection-over-union of the two components >= `min_overlap`
  (and they share at least one voxel).
* ``"centroid"``: distance between the components' centroids <= `max_distance_mm`.

Node sizes use `lnfm.data.geometry.axial_diameters` (short and long axis in the
axial plane, in mm); size strata follow the short axis: < 5 mm, 5-10 mm,
>= 10 mm (10 mm is the usual threshold for a suspicious node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from lnfm.data.geometry import axial_diameters

Criterion = Literal["overlap", "centroid"]
SIZE_STRATA = {"lt5": (0.0, 5.0), "5to10": (5.0, 10.0), "ge10": (10.0, float("inf"))}


def connectivity_structure(connectivity: int) -> np.ndarray:
    """3x3x3 structuring element for 6-, 18- or 26-connectivity."""
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, rank)


@dataclass
class Node:
    """One connected component: size in mL, axial diameters and centroid in mm."""

    label: int
    voxels: int
    volume_ml: float
    short_axis_mm: float
    long_axis_mm: float
    centroid_mm: tuple[float, float, float]
    matched: bool = False


@dataclass
class Detection:
    """Lesion-wise result for one volume."""

    tp: int
    fp: int
    fn: int
    sensitivity: float | None  # None when the volume has no ground-truth node
    fp_per_volume: float
    sensitivity_by_size: dict[str, float | None]  # keys of SIZE_STRATA
    gt_nodes: list[Node] = field(default_factory=list)
    pred_nodes: list[Node] = field(default_factory=list)


def label_components(mask: np.ndarray, connectivity: int = 26, block: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask (labels 1..n, numbered as `scipy.ndimage.label`
    numbers them: by each component's first voxel in C order).

    Labelling a whole CT grid is the slowest step of an evaluation, and nodes fill a tiny
    part of it: the mask is first reduced to occupied `block`^3 blocks, clusters of
    26-adjacent occupied blocks are found on that coarse grid, and only each cluster's box
    is labelled at full resolution. Voxels that touch lie in the same or adjacent blocks,
    so no component spans two clusters.
    """
    mask = np.asarray(mask, bool)
    structure = connectivity_structure(connectivity)
    labels = np.zeros(mask.shape, np.int32)
    starts = [np.arange(0, n, block) for n in mask.shape]
    occupied = mask
    for axis, idx in enumerate(starts):
        occupied = np.logical_or.reduceat(occupied, idx, axis=axis) if mask.shape[axis] else occupied
    coarse, n_coarse = ndimage.label(occupied, structure=np.ones((3, 3, 3), bool))
    pieces = []
    for c, cbox in enumerate(ndimage.find_objects(coarse), start=1):
        fbox = tuple(slice(b.start * block, min(b.stop * block, n)) for b, n in zip(cbox, mask.shape))
        own = coarse[cbox] == c
        for axis in range(3):
            own = np.repeat(own, block, axis=axis)
        own = own[tuple(slice(0, f.stop - f.start) for f in fbox)]
        sub, k = ndimage.label(mask[fbox] & own, structure=structure)
        for j, box in enumerate(ndimage.find_objects(sub), start=1):
            first = np.argwhere(sub[box] == j)[0] + [b.start for b in box] + [f.start for f in fbox]
            pieces.append((tuple(first), fbox, sub, j))
    pieces.sort(key=lambda piece: piece[0])
    for new, (_, fbox, sub, j) in enumerate(pieces, start=1):
        view = labels[fbox]
        view[sub == j] = new
    return labels, len(pieces)


def describe_components(labels: np.ndarray, n: int, spacing) -> list[Node]:
    """Voxel count, volume, axial diameters and centroid of each labelled component, each in its box."""
    sp = np.asarray(spacing, np.float64)
    nodes = []
    for k, box in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        own = labels[box] == k
        idx = np.argwhere(own)
        short, long = axial_diameters(own, sp)
        start = np.array([s.start for s in box])
        nodes.append(
            Node(
                label=k,
                voxels=len(idx),
                volume_ml=float(len(idx) * np.prod(sp) / 1000.0),
                short_axis_mm=float(short),
                long_axis_mm=float(long),
                centroid_mm=tuple(float(c) for c in (idx.mean(axis=0) + start) * sp),
            )
        )
    return nodes


def match_matrix(
    pred_labels: np.ndarray,
    pred_nodes: list[Node],
    gt_labels: np.ndarray,
    gt_nodes: list[Node],
    spacing,
    criterion: Criterion = "overlap",
    min_overlap: float = 0.1,
    max_distance_mm: float = 10.0,
) -> np.ndarray:
    """Boolean (n_pred, n_gt) matrix: which predicted component matches which node."""
    n_p, n_g = len(pred_nodes), len(gt_nodes)
    if n_p == 0 or n_g == 0:
        return np.zeros((n_p, n_g), bool)
    if criterion == "centroid":
        cp = np.array([n.centroid_mm for n in pred_nodes])
        cg = np.array([n.centroid_mm for n in gt_nodes])
        return np.linalg.norm(cp[:, None] - cg[None], axis=-1) <= max_distance_mm
    if criterion != "overlap":
        raise ValueError(f"criterion must be 'overlap' or 'centroid', got {criterion!r}")
    both = (pred_labels > 0) & (gt_labels > 0)
    pairs = pred_labels[both].astype(np.int64) * (n_g + 1) + gt_labels[both]
    inter = np.bincount(pairs, minlength=(n_p + 1) * (n_g + 1)).reshape(n_p + 1, n_g + 1)[1:, 1:]
    vox_p = np.array([n.voxels for n in pred_nodes])[:, None]
    vox_g = np.array([n.voxels for n in gt_nodes])[None, :]
    iou = inter / (vox_p + vox_g - inter)
    return (inter > 0) & (iou >= min_overlap)


def stratified_sensitivity(gt_nodes: list[Node], detected: np.ndarray) -> dict[str, float | None]:
    """Sensitivity per short-axis stratum (None for a stratum without nodes)."""
    short = np.array([n.short_axis_mm for n in gt_nodes])
    out: dict[str, float | None] = {}
    for key, (lo, hi) in SIZE_STRATA.items():
        sel = (short >= lo) & (short < hi) if len(short) else np.zeros(0, bool)
        out[key] = float(detected[sel].mean()) if sel.any() else None
    return out


def detect_nodes(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing,
    criterion: Criterion = "overlap",
    min_overlap: float = 0.1,
    max_distance_mm: float = 10.0,
    connectivity: int = 26,
) -> Detection:
    """Match predicted components to ground-truth nodes in one volume (see module docstring)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be 3D masks of the same shape")
    p_lab, n_p = label_components(pred, connectivity)
    g_lab, n_g = label_components(gt, connectivity)
    p_nodes = describe_components(p_lab, n_p, spacing)
    g_nodes = describe_components(g_lab, n_g, spacing)
    hits = match_matrix(p_lab, p_nodes, g_lab, g_nodes, spacing, criterion, min_overlap, max_distance_mm)
    detected = hits.any(axis=0)
    used = hits.any(axis=1)
    for node, d in zip(g_nodes, detected):
        node.matched = bool(d)
    for node, u in zip(p_nodes, used):
        node.matched = bool(u)
    tp, fp = int(detected.sum()), int((~used).sum())
    return Detection(
        tp=tp,
        fp=fp,
        fn=n_g - tp,
        sensitivity=tp / n_g if n_g else None,
        fp_per_volume=float(fp),
        sensitivity_by_size=stratified_sensitivity(g_nodes, detected),
        gt_nodes=g_nodes,
        pred_nodes=p_nodes,
    )
