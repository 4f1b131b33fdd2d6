"""Inputs for the evaluation tests: random anisotropic blobs and real node masks."""

import gzip
import zipfile

import nibabel as nib
import numpy as np
from scipy import ndimage

SPACING = (0.7, 0.9, 2.5)


def blob(shape, seed, level=1.0, smooth=2.0):
    """Thresholded smoothed noise: irregular, sometimes multi-component masks."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), smooth)
    return noise > level * noise.std()


def read_node_mask(path, margin=4):
    """A zipped NIfTI node mask, cropped to its bounding box + margin; returns (mask, spacing)."""
    with zipfile.ZipFile(path) as z:
        raw = z.read(z.namelist()[0])
    img = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    data = np.asarray(img.dataobj).reshape(img.shape[:3]) > 0.5
    idx = np.argwhere(data)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = idx.max(0) + margin + 1
    crop = data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return crop, tuple(float(z) for z in img.header.get_zooms()[:3])


def perturbations(mask):
    """Shifted, eroded and dilated copies of a mask (the 'predictions')."""
    return {
        "shift": np.roll(mask, (2, -1, 1), axis=(0, 1, 2)),
        "erode": ndimage.binary_erosion(mask, iterations=2),
        "dilate": ndimage.binary_dilation(mask, iterations=2),
        "erode_shift": np.roll(ndimage.binary_erosion(mask), 3, axis=0),
    }
