"""Patch augmentations: flips, in-plane 90-degree turns, rotation (in-plane and out-of-plane
tilt) with zoom, simulated low resolution, blur, noise and intensity jitter. Each takes a
numpy Generator so a patch is a pure function of (seed, index).

Scans differ in slice thickness, in-plane resolution, noise and in how vessels run through
the patch; the spatial and resolution augmentations make a model see those differences in
training rather than first meet them in a clinic (nnU-Net's default augmentation covers the
same families)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def context_size(patch: tuple[int, int, int], rotate_deg: float, scale: float,
                 tilt_deg: float = 0.0) -> tuple[int, int, int]:
    """Edge of the region to read so a rotated/scaled patch samples no padding it need not."""
    if rotate_deg <= 0 and scale <= 0 and tilt_deg <= 0:
        return tuple(patch)  # type: ignore[return-value]
    if tilt_deg > 0:  # any 3D rotation: the patch's diagonal bounds every axis
        edge = int(math.ceil(float(np.linalg.norm(patch)) * (1 + scale)))
        return (edge, edge, edge)
    grow = (1 + scale) * (math.sqrt(2) if rotate_deg > 0 else 1.0)
    # In-plane rotation mixes axes 0 and 1; the slice axis only grows with scale.
    return (int(math.ceil(patch[0] * grow)), int(math.ceil(patch[1] * grow)), int(math.ceil(patch[2] * (1 + scale))))


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def rotate_scale(image: np.ndarray, label: np.ndarray | None, patch: tuple[int, int, int], rotate_deg: float,
                 scale: float, rng: np.random.Generator,
                 tilt_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample a `patch`-sized view of the centred context region, rotated in-plane by up to
    +-rotate_deg, tilted about both in-plane axes by up to +-tilt_deg and zoomed by up to +-scale
    (image linear, label nearest)."""

    def angle(limit: float) -> float:
        return math.radians(rng.uniform(-limit, limit)) if limit > 0 else 0.0

    matrix = _rotation(2, angle(rotate_deg))
    zoom = 1.0 + (rng.uniform(-scale, scale) if scale > 0 else 0.0)
    if tilt_deg > 0:
        matrix = _rotation(0, angle(tilt_deg)) @ _rotation(1, angle(tilt_deg)) @ matrix
    matrix = matrix * zoom
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


def low_resolution(image: np.ndarray, rng: np.random.Generator, max_factor: float, p: float = 0.5) -> np.ndarray:
    """With probability p, resample each channel down by U(1, max_factor) along every axis
    (linear) and back up to its own grid (linear): the blur and staircase of a coarser scan."""
    if max_factor <= 1 or rng.random() >= p:
        return image
    shape = np.asarray(image.shape[:3])
    small = np.maximum(np.round(shape / rng.uniform(1.0, max_factor, 3)).astype(int), 1)
    # Zoom 1 along the channel axis: channels are resampled independently.
    down = ndimage.zoom(image, (*(small / shape), 1), order=1, grid_mode=True, mode="nearest")
    return ndimage.zoom(down, (*(shape / small), 1), order=1, grid_mode=True, mode="nearest")


def blur(image: np.ndarray, rng: np.random.Generator, max_sigma: float, p: float = 0.2) -> np.ndarray:
    """With probability p, a Gaussian blur of sigma U(0.5, max_sigma) voxels per channel."""
    if max_sigma <= 0 or rng.random() >= p:
        return image
    sigma = rng.uniform(min(0.5, max_sigma), max_sigma)
    return ndimage.gaussian_filter(image, (sigma, sigma, sigma, 0))  # sigma 0: no mixing of channels


def noise(image: np.ndarray, rng: np.random.Generator, max_std: float, p: float = 0.3) -> np.ndarray:
    """With probability p, add Gaussian noise of std U(0, max_std) (normalised intensity units)."""
    if max_std <= 0 or rng.random() >= p:
        return image
    return (image + rng.normal(0.0, rng.uniform(0, max_std), image.shape)).astype(np.float32)


def intensity_jitter(image: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """x * (1 + U(-scale, scale)) + U(-shift, shift), per channel, on normalised intensities."""
    n = image.shape[-1]
    a = 1.0 + (rng.uniform(-scale, scale, n) if scale > 0 else np.zeros(n))
    b = rng.uniform(-shift, shift, n) if shift > 0 else np.zeros(n)
    return (image * a.astype(np.float32) + b.astype(np.float32)).astype(np.float32)
