"""Node paste: a labelled lymph node copied into the fat of an unlabelled scan.

A few labelled scans show each node in one surrounding; an unlabelled pool shows many more
anatomies, without labels. Pasting a labelled node (its voxels, by its mask) into fat of a
pool scan gives a training patch whose node is known exactly, in anatomy the labelled scans
never show. Nodes lie in fat, so a site is accepted only where most of the voxels the node
covers are fat. The pool scan's own nodes are unlabelled: only a shell of `margin` voxels
around the pasted node is scored; every other voxel carries IGNORE_LABEL.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lnfm.data.augment import flip_rot90

IGNORE_LABEL = -1  # voxels the loss leaves out
FAT_HU = (-190.0, -30.0)  # adipose tissue on CT
MIN_FAT_SHARE = 0.7  # share of the covered host voxels that must be fat
EDGE_SIGMA = 0.7  # voxels: the pasted edge is feathered by a Gaussian this wide, as a scanner blurs it


def paste_site(host_ct: np.ndarray, mask: np.ndarray, rng: np.random.Generator, tries: int = 20
               ) -> np.ndarray | None:
    """A corner in the host patch where `mask`'s box fits and at least MIN_FAT_SHARE of the host
    voxels under `mask` are fat; None after `tries` random corners."""
    room = np.asarray(host_ct.shape) - np.asarray(mask.shape)
    if np.any(room < 0) or not mask.any():
        return None
    for _ in range(tries):
        at = rng.integers(0, room + 1)
        under = host_ct[tuple(slice(a, a + m) for a, m in zip(at, mask.shape))][mask]
        if np.mean((under >= FAT_HU[0]) & (under <= FAT_HU[1])) >= MIN_FAT_SHARE:
            return at
    return None


def augment_donor(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, flip: bool, zoom: float,
                  max_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A donor box (X, Y, Z, C image, X, Y, Z label) flipped on each axis with probability 1/2 when `flip`,
    and zoomed by a factor log-uniform in [1/(1+zoom), 1+zoom] when `zoom` > 0 (linearly; the zoomed
    label is the box's node class where the zoomed mask is at least one half), then cropped about its
    centre to at most `max_size`. The few labelled nodes are each seen in one orientation and size; the
    pool's hosts vary, and so should the nodes in them."""
    image, label = flip_rot90(image, label, rng, flips=flip, rot90=False)
    if zoom > 0:
        f = float(np.exp(rng.uniform(-np.log1p(zoom), np.log1p(zoom))))
        image = ndimage.zoom(image, (f, f, f, 1), order=1, mode="nearest", grid_mode=True)
        # The mask is zoomed linearly and cut at one half: nearest neighbour would duplicate whole
        # slices of a small node (up to 13 % volume error for an 8-voxel radius).
        mask = ndimage.zoom((label > 0).astype(np.float32), (f, f, f), order=1, mode="nearest", grid_mode=True)
        label = np.where(mask >= 0.5, label.max(), 0).astype(label.dtype)
    over = np.maximum(np.asarray(label.shape) - np.asarray(max_size), 0)
    box = tuple(slice(o // 2, n - (o - o // 2)) for o, n in zip(over, label.shape))
    return np.ascontiguousarray(image[box]), np.ascontiguousarray(label[box])


def paste_node(host: np.ndarray, donor: np.ndarray, donor_label: np.ndarray, at: np.ndarray, margin: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of the host patch (X, Y, Z, C raw intensities) with the donor box's node
    voxels (donor_label > 0) blended in at corner `at`. The label is the donor's class on the
    node, 0 within `margin` voxels of it and IGNORE_LABEL elsewhere."""
    mask = donor_label > 0
    box = tuple(slice(a, a + m) for a, m in zip(at, mask.shape))
    alpha = np.maximum(ndimage.gaussian_filter(mask.astype(np.float32), EDGE_SIGMA), mask)[..., None]
    image = host.astype(np.float32, copy=True)
    image[box] = image[box] * (1.0 - alpha) + donor.astype(np.float32) * alpha
    placed = np.zeros(host.shape[:3], bool)
    placed[box] = mask
    label = np.full(host.shape[:3], IGNORE_LABEL, np.int32)
    label[ndimage.binary_dilation(placed, iterations=margin) if margin > 0 else placed] = 0
    label[box][mask] = donor_label[mask]
    return image, label
