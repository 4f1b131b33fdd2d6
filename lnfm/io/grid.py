"""A scan's voxel grid (its shape and voxel size) from its headers alone, without reading a voxel: what a
job needs to know that a scan will not fit in memory before reading it (a compressed file inflates to up to
about 1000 times its size)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import nrrd
import numpy as np

from lnfm.io.dicom import (BAD_DICOM, damaged, is_dicom_file, select_series, slice_geometry, slice_header,
                           stack_geometry)
from lnfm.io.nifti import BAD_NIFTI, affine_mm, load_header
from lnfm.io.nrrd_io import mm_per_space_unit

Grid = tuple[tuple[int, int, int], tuple[float, float, float]]
# What a bad file's headers raise (tried on empty, cut, damaged and foreign files of each format): the NIfTI and
# DICOM readers' (`BAD_NIFTI`; `BAD_DICOM`, a TypeError only from within pydicom: `damaged`) and pynrrd's. Any
# other is a bug.
_BAD_HEADER = (*BAD_NIFTI, *BAD_DICOM, nrrd.NRRDError)


def _grid(shape, spacing) -> Grid | None:
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or \
            not all(math.isfinite(s) and s > 0 for s in spacing):
        return None
    return shape, spacing  # type: ignore[return-value]


def _nifti_grid(path: Path) -> Grid | None:
    img = load_header(path)  # nibabel reads the voxels only when asked for them
    if len(img.shape) < 3:
        return None
    return _grid(img.shape[:3], np.linalg.norm(affine_mm(img)[:3, :3], axis=0))


def _nrrd_grid(path: Path) -> Grid | None:
    with open(path, "rb") as f:
        try:
            header = nrrd.read_header(f)
        except (StopIteration, IndexError):  # pynrrd's, on an empty file or a garbled field
            return None
    sizes, directions = header.get("sizes"), header.get("space directions")
    if sizes is None or directions is None or len(sizes) != len(directions):
        return None
    spatial = [i for i, d in enumerate(directions) if d is not None and np.all(np.isfinite(np.asarray(d, float)))]
    if len(spatial) != 3:
        return None
    dirs = np.asarray([directions[i] for i in spatial], float) * mm_per_space_unit(str(path))  # unit per world axis
    return _grid([sizes[i] for i in spatial], np.linalg.norm(dirs, axis=1))


def _dicom_grid(path: Path, series: str | None) -> Grid | None:
    """(Columns, Rows, slices) as `read_dicom_series` stacks them; the slice step from the slices' positions."""
    _, files = select_series(path, series)
    heads = [slice_header(f) for f in files]  # kept for the read that follows (its warnings silenced there)
    geometry = [slice_geometry(h, str(path)) for h in heads]  # a tag missing or unusable: ImageReadError
    rows, cols = heads[0].get("Rows"), heads[0].get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int):
        return None
    iop, _, pixel = geometry[0]
    _, step = stack_geometry([ipp for _, ipp, _ in geometry], iop, heads[0], str(path))
    return _grid((cols, rows, len(heads)), (pixel[1], pixel[0], np.linalg.norm(step)))


def image_grid(path: str | Path, series: str | None = None) -> Grid | None:
    """((X, Y, Z) voxels, (X, Y, Z) voxel size in mm) of the scan `lnfm.io.read_image(path, series)` reads, from
    its headers: a NIfTI's dims and affine, an NRRD's sizes and space directions, a DICOM series' rows, columns
    and slices. None where the headers do not give them (the read names the problem)."""
    path = Path(path)
    name = path.name.lower()
    try:
        with warnings.catch_warnings():  # the read warns, or refuses, in its own words
            warnings.simplefilter("ignore")
            if name.endswith((".nii", ".nii.gz")):
                return _nifti_grid(path)
            if name.endswith((".nrrd", ".nhdr")):
                return _nrrd_grid(path)
            if path.is_dir() or (path.is_file() and is_dicom_file(path)):  # as read_image tells a DICOM
                return _dicom_grid(path, series)
    except _BAD_HEADER as e:  # reading the scan names the problem in one line
        if not damaged(e):
            raise
        return None
    return None


def grid_voxels(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> int:
    """Voxels of the scan's extent on the `target` grid (a model's, a store's) before the body crop (upper bound)."""
    return math.prod(math.ceil(n * s / t) for n, s, t in zip(shape[:3], spacing, target))
