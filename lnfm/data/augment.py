"""Patch augmentations: flips, in-plane 90-degree turns, small rotation/scale and intensity
jitter. Each takes a numpy Generator so a patch is a pure function of (seed, index)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def context_size(patch: tuple[int, int, int], rotate_deg: float, scale: float) -> tuple[int, int, int]:
    """Edge of the region to read so a rotated/scaled patch samples no padding it need not."""
    if rotate_deg <= 0 and scale <= 0:
        return tuple(patch)  # type: ignore[return-value]
    grow = (1 + scale) * (math.sqrt(2) if rotate_deg > 0 else 1.0)
    # In-plane rotation mixes axes 0 and 1; the slice axis only grows with scale.
    return (int(math.ceil(patch[0] * grow)), int(math.ceil(patch[1] * grow)), int(math.ceil(patch[2] * (1 + scale))))


def rotate_scale(image: np.ndarray, label: np.ndarray | None, patch: tuple[int, int, int], rotate_deg: float,
                 scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample a `patch`-sized view of the centred context region, rotated in-plane by up to
    +-rotate_deg and zoomed by up to +-scale (image linear, label nearest)."""
    angle = math.radians(rng.uniform(-rotate_deg, rotate_deg)) if rotate_deg > 0 else 0.0
    zoom = 1.0 + (rng.uniform(-scale, scale) if scale > 0 else 0.0)
    c, s = math.cos(angle), math.sin(angle)
    matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) * zoom
    in_centre = (np.asarray(image.shape[:3]) - 1) / 2
    out_centre = (np.asarray(patch) - 1) / 2
    offset = in_centre - matrix @ out_centre

    def warp(x: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(x, matrix, offset=offset, output_shape=tuple(patch), order=order,
                                        mode="nearest", prefilter=False)

    img = np.stack([warp(image[..., ch], 1) for ch in range(image.shape[-1])], axis=-1)
    lab = warp(label, 0) if label is not None else None
    return img, lab


def flip_rot90(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, flips: bool,
               rot90: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Random flips of each spatial axis and, for square in-plane patches, k * 90 degrees in-plane."""
    if flips:
        axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
        if axes:
            image = np.flip(image, axes)
            label = np.flip(label, axes) if label is not None else None
    if rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        if k:
            image = np.rot90(image, k, axes=(0, 1))
            label = np.rot90(label, k, axes=(0, 1)) if label is not None else None
    return image, label


def intensity_jitter(image: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """x * (1 + U(-scale, scale)) + U(-shift, shift), per channel, on normalised intensities."""
    n = image.shape[-1]
    a = 1.0 + (rng.uniform(-scale, scale, n) if scale > 0 else np.zeros(n))
    b = rng.uniform(-shift, shift, n) if shift > 0 else np.zeros(n)
    return (image * a.astype(np.float32) + b.astype(np.float32)).astype(np.float32)
