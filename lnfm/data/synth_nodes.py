"""Lymph-node shapes for the phantoms: ovoid, lobulated, or a real node mask resampled.

Every shape is built on the phantom's RAS voxel grid and scaled until its axial short
axis (measured like the rest of the project, `geometry.axial_diameters`) hits the target.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lnfm.data.geometry import axial_diameters
from lnfm.data.shared import shared_data_dir
from lnfm.errors import DataError

# Which real collection gives shapes to which site.
REAL_SET = {"head_neck": "NIH_LN_MED", "axilla": "NIH_LN_MED", "mediastinum": "NIH_LN_MED",
            "abdomen": "NIH_LN_ABD", "pelvis": "NIH_LN_ABD"}


# Share of each real collection kept for the held-out phantom variant (never used by training phantoms).
TEST_POOL_SHARE = 0.25


def real_mask_files(folder: str, root: str = "", pool: str = "all") -> tuple[Path, ...]:
    """Sorted zipped masks of one collection (from `root`, default the shared data's ln_masks/);
    empty when the folder is absent. `pool` "train" or "test" keeps the masks of that pool only."""
    if not root:
        shared = shared_data_dir()
        if shared is None:
            return ()
        root = str(shared / "ln_masks")
    return _pool(_listing(str(Path(root) / folder)), pool)


@functools.lru_cache(maxsize=16)
def _listing(folder: str) -> tuple[Path, ...]:
    path = Path(folder)
    return tuple(sorted(path.glob("*.zip"))) if path.is_dir() else ()


def mask_pool(path: Path) -> str:
    """"test" or "train": a fixed split of the real masks by a hash of the file name, so the
    same mask falls in the same pool on every machine and in every listing."""
    h = int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:8], "big") / 2.0**64
    return "test" if h < TEST_POOL_SHARE else "train"


def _pool(files: tuple[Path, ...], pool: str) -> tuple[Path, ...]:
    if pool == "all":
        return files
    if pool not in ("train", "test"):
        raise ValueError(f"unknown mask pool '{pool}' (choices: all, train, test)")
    return tuple(f for f in files if mask_pool(f) == pool)


@functools.lru_cache(maxsize=256)
def load_real_mask(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Largest component of a zipped NIfTI node mask, cropped and turned to RAS, with its spacing."""
    with zipfile.ZipFile(path) as zf:
        raw = zf.read(zf.namelist()[0])
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    img = nib.Nifti1Image.from_bytes(raw)
    data = np.asarray(img.dataobj).reshape(img.shape[:3]) > 0.5
    if not data.any():
        raise DataError(f"{path}: empty lymph-node mask")
    # Crop first: the file is mostly empty.
    box = tuple(slice(int(np.argmax(a)), len(a) - int(np.argmax(a[::-1])))
                for a in (data.any(axis=(1, 2)), data.any(axis=(0, 2)), data.any(axis=(0, 1))))
    ornt = nib.orientations.io_orientation(img.affine)
    data = nib.orientations.apply_orientation(data[box], ornt)
    zooms = np.asarray(img.header.get_zooms()[:3], float)[np.argsort(ornt[:, 0])]
    return crop(data), tuple(float(z) for z in zooms)  # type: ignore[return-value]


def _ellipsoids(rng: np.random.Generator, short_mm: float, lobulated: bool
                ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(centre_mm, radii_mm, in-plane angle) of the lobes; the first lobe is the main body."""
    ratio = rng.uniform(1.0, 2.2)
    r0 = np.array([short_mm / 2 * ratio, short_mm / 2, short_mm / 2 * rng.uniform(0.9, ratio + 0.3)])
    lobes = [(np.zeros(3), r0, rng.uniform(0, np.pi))]
    if lobulated:
        for _ in range(int(rng.integers(2, 5))):
            d = rng.normal(0, 1, 3)
            d /= np.linalg.norm(d) + 1e-9
            lobes.append((d * r0 * rng.uniform(0.4, 0.7), r0 * rng.uniform(0.45, 0.7), rng.uniform(0, np.pi)))
    return lobes


def _raster_lobes(lobes, scale: float, spacing) -> np.ndarray:
    ext = max(float(np.max(np.abs(c) + r)) for c, r, _ in lobes) * scale + 2 * max(spacing)
    axes = [np.arange(-np.ceil(ext / s), np.ceil(ext / s) + 1) * s for s in spacing]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    out = np.zeros((axes[0].size, axes[1].size, axes[2].size), bool)
    for c, r, ang in lobes:
        c, r = c * scale, r * scale
        u = np.cos(ang) * (x - c[0]) + np.sin(ang) * (y - c[1])
        v = -np.sin(ang) * (x - c[0]) + np.cos(ang) * (y - c[1])
        out |= (u / r[0]) ** 2 + (v / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
    return out


def _raster_real(mask: np.ndarray, src_spacing, scale: float, spacing, flip: np.ndarray, k90: int) -> np.ndarray:
    zoom = np.asarray(src_spacing) * scale / np.asarray(spacing)
    pad = np.pad(mask.astype(np.float32), 2)
    out = ndimage.zoom(pad, zoom, order=1) > 0.5
    out = np.rot90(out, k90, axes=(0, 1)) if spacing[0] == spacing[1] else out
    for ax in np.flatnonzero(flip):
        out = np.flip(out, ax)
    return np.ascontiguousarray(out)


def crop(mask: np.ndarray) -> np.ndarray:
    """Trim to the bounding box of the largest component."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask[:0, :0, :0]
    sizes = ndimage.sum_labels(mask, lab, range(1, n + 1))
    keep = lab == int(np.argmax(sizes)) + 1
    return keep[ndimage.find_objects(keep.astype(np.uint8))[0]]


def node_shape(rng: np.random.Generator, short_mm: float, spacing, real: Path | None,
               lo: float, hi: float) -> tuple[np.ndarray, str]:
    """A bool mask on a grid of `spacing` whose axial short axis is close to `short_mm`, within [lo, hi]."""
    kind = "real" if real is not None else ("lobulated" if rng.random() < 0.35 else "ovoid")
    lobes = _ellipsoids(rng, short_mm, kind == "lobulated")
    flip, k90 = rng.random(3) < 0.5, int(rng.integers(4))
    if kind == "real":
        src, src_spacing = load_real_mask(real)
        raster = functools.partial(_raster_real, src, src_spacing, spacing=spacing, flip=flip, k90=k90)
        scale = short_mm / max(axial_diameters(src, src_spacing, widest_of_ties=False)[0], 1e-3)
    else:
        raster = functools.partial(_raster_lobes, lobes, spacing=spacing)
        scale = 1.0
    target = float(np.clip(short_mm, lo, hi))
    mask, measured = None, 0.0
    for _ in range(4):
        mask = crop(raster(scale=scale))
        measured = axial_diameters(mask, spacing, widest_of_ties=False)[0] if mask.size else 0.0
        if measured > 0 and abs(measured - target) <= 0.08 * target:
            break
        scale *= target / measured if measured > 0 else 1.5
    if mask is None or not (lo <= measured <= hi):
        return np.zeros((0, 0, 0), bool), kind
    return mask, kind
