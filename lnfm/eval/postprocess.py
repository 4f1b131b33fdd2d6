"""Post-processing of predicted lymph-node masks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lnfm.data.geometry import nonzero_box
from lnfm.eval.detection import connectivity_structure
from lnfm.eval.surface import dice


@dataclass
class PostprocessConfig:
    """Clean-up of predicted node masks."""

    min_volume_mm3: float = 0.0  # components smaller than this are removed (0 keeps all)
    body_threshold_hu: float | None = -500.0  # HU threshold of the body mask; None keeps predictions outside it
    min_short_axis_mm: float = 0.0  # components whose 3D minor diameter is below this are removed (0 keeps all)
    max_elongation: float = 0.0  # components over this major/minor diameter ratio (vessel-like) are removed; 0: off


def postprocess_problem(post: PostprocessConfig | None) -> str | None:
    """A post-processing value that is not a size, a ratio or a HU value, in one line naming it, or None: the one
    owner of these ranges (finetuning's config and model.json)."""
    if post is None:
        return None
    for name in ("min_volume_mm3", "min_short_axis_mm", "max_elongation"):
        value = getattr(post, name)
        if not (math.isfinite(value) and value >= 0):
            return f"postprocess.{name} {value:g} is not a finite value >= 0 (0 turns it off)"
    if post.body_threshold_hu is not None and not math.isfinite(post.body_threshold_hu):
        return f"postprocess.body_threshold_hu {post.body_threshold_hu} is not a HU value (null turns it off)"
    return None


def postprocess(mask: np.ndarray, spacing, cfg: PostprocessConfig, hu: np.ndarray | None = None,
                body: np.ndarray | None = None) -> np.ndarray:
    """Apply `cfg`: restrict to the body of `hu` (when given and enabled; `body` is that mask when the
    caller has it already), then drop small components."""
    mask = np.asarray(mask, bool)
    if hu is not None and cfg.body_threshold_hu is not None:
        mask = restrict_to_body(mask, body_mask_from_ct(hu, cfg.body_threshold_hu) if body is None else body)
    if cfg.min_volume_mm3 > 0:
        mask = remove_small_components(mask, spacing, cfg.min_volume_mm3)
    if cfg.min_short_axis_mm > 0 or cfg.max_elongation > 0:
        mask = apply_size_prior(mask, spacing, cfg.min_short_axis_mm, cfg.max_elongation)
    return mask


def component_diameters(mask: np.ndarray, spacing, connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """(labels, diameters (n, 3) in mm, major first) of the connected components of `mask`.

    Diameters are those of the ellipsoid with the component's second moments: a solid
    ellipsoid with semi-axis a has variance a^2 / 5 along it, so d = 2 sqrt(5 lambda) for
    each eigenvalue lambda of the covariance of the voxel centres in mm (a ball of
    radius r gives 2r three times; a vessel gives one long and two short diameters)."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=connectivity_structure(connectivity))
    sp = np.asarray(spacing, np.float64)
    out = np.zeros((n, 3))
    for i, box in enumerate(ndimage.find_objects(labels)):
        pts = np.argwhere(labels[box] == i + 1) * sp
        if len(pts) > 1:
            lam = np.clip(np.linalg.eigvalsh(np.cov(pts, rowvar=False)), 0.0, None)[::-1]
        else:
            lam = np.zeros(3)
        # A voxel's own extent (variance s^2 / 12 per axis) keeps thin components from measuring 0 mm.
        out[i] = 2.0 * np.sqrt(5.0 * (lam + float(np.mean(sp ** 2)) / 12.0))
    return labels, out


def apply_size_prior(mask: np.ndarray, spacing, min_short_axis_mm: float = 0.0, max_elongation: float = 0.0,
                     connectivity: int = 26) -> np.ndarray:
    """Drop components whose minor diameter is under `min_short_axis_mm` or whose major /
    minor diameter ratio exceeds `max_elongation` (tubular, vessel-like); 0 disables a test."""
    labels, diam = component_diameters(mask, spacing, connectivity)
    if len(diam) == 0:
        return np.asarray(mask, bool).copy()
    keep = np.ones(len(diam) + 1, bool)
    keep[0] = False
    if min_short_axis_mm > 0:
        keep[1:] &= diam[:, 2] >= min_short_axis_mm
    if max_elongation > 0:
        keep[1:] &= diam[:, 0] <= max_elongation * diam[:, 2]
    return keep[labels]


def without_size_prior(cfg: PostprocessConfig) -> PostprocessConfig:
    """`cfg` with the node size prior off: what `tune_size_prior` must be given predictions under, since
    a prior already applied hides the components a milder setting would keep."""
    return dataclasses.replace(cfg, min_short_axis_mm=0.0, max_elongation=0.0)


def tune_size_prior(masks, truths, spacings, short_axes=(0.0, 3.0, 4.0, 5.0, 6.0),
                    elongations=(0.0, 4.0, 3.0, 2.5)) -> tuple[float, float, float]:
    """(min_short_axis_mm, max_elongation, mean Dice) maximising the mean Dice of the filtered
    `masks` against `truths` over the grid. Pass validation cases only, never test cases.
    Ties keep the earlier (milder) setting."""
    best = (0.0, 0.0, -1.0)
    for s in short_axes:
        for e in elongations:
            score = float(np.mean([dice(apply_size_prior(m, sp, s, e), t) for m, t, sp in
                                   zip(masks, truths, spacings)]))
            if score > best[2]:
                best = (float(s), float(e), score)
    return best


def remove_small_components(mask: np.ndarray, spacing, min_volume_mm3: float, connectivity: int = 26) -> np.ndarray:
    """Drop connected components smaller than `min_volume_mm3` (volume = voxels * voxel volume)."""
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    box = nonzero_box(mask)
    if box is None:
        return out
    labels, n = ndimage.label(mask[box], structure=connectivity_structure(connectivity))
    voxel_mm3 = float(np.prod(np.asarray(spacing, np.float64)))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = counts * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    out[box] = keep[labels]
    return out


def restrict_to_body(mask: np.ndarray, body_mask: np.ndarray) -> np.ndarray:
    """Zero the prediction outside the body."""
    mask, body_mask = np.asarray(mask, bool), np.asarray(body_mask, bool)
    if mask.shape != body_mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from body mask shape {body_mask.shape}")
    return mask & body_mask


def body_mask_from_ct(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Body of a CT volume (X, Y, Z) in HU: the largest 6-connected region above `threshold`,
    with holes filled slice by slice in the axial plane (lungs and bowel gas are enclosed in
    every axial slice but reach the outside in 3D through the airways)."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D CT volume (X, Y, Z), got shape {hu.shape}")
    labels, n = ndimage.label(hu > threshold)
    if n == 0:
        return np.zeros(hu.shape, bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    body = labels == int(np.argmax(counts))
    # binary_fill_holes of every axial slice in one labelling: the background's components under
    # in-plane 4-connectivity; those that touch the slice's edge are outside, the rest are holes.
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    background, _ = ndimage.label(~body, structure=in_plane)
    keep = np.ones(int(background.max()) + 1, bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        keep[np.unique(edge)] = False
    keep[0] = True  # the body itself
    return keep[background]
