"""Post-processing of predicted lymph-node masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lnfm.eval.detection import connectivity_structure


@dataclass
class PostprocessConfig:
    """Clean-up of predicted node masks."""

    min_volume_mm3: float = 0.0  # components smaller than this are removed (0 keeps all)
    body_threshold_hu: float | None = -500.0  # HU threshold of the body mask; None keeps predictions outside it


def postprocess(mask: np.ndarray, spacing, cfg: PostprocessConfig, hu: np.ndarray | None = None) -> np.ndarray:
    """Apply `cfg`: restrict to the body of `hu` (when given and enabled), then drop small components."""
    mask = np.asarray(mask, bool)
    if hu is not None and cfg.body_threshold_hu is not None:
        mask = restrict_to_body(mask, body_mask_from_ct(hu, cfg.body_threshold_hu))
    if cfg.min_volume_mm3 > 0:
        mask = remove_small_components(mask, spacing, cfg.min_volume_mm3)
    return mask


def remove_small_components(mask: np.ndarray, spacing, min_volume_mm3: float, connectivity: int = 26) -> np.ndarray:
    """Drop connected components smaller than `min_volume_mm3` (volume = voxels * voxel volume)."""
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, structure=connectivity_structure(connectivity))
    if n == 0:
        return mask.copy()
    voxel_mm3 = float(np.prod(np.asarray(spacing, np.float64)))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = counts * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    return keep[labels]


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
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body
