"""DICOM series reading: slices sorted along the slice normal, HU via rescale, LPS -> RAS.

Only geometry and pixel values leave this module; no patient attribute does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from lnfm.io.volume import LPS_TO_RAS, ImageReadError, Volume, check_affine

# Relative tolerance on the spacing between consecutive slices.
SLICE_SPACING_TOL = 0.01


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 file (DICM magic) or a .dcm file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def series_uid(path: str | Path) -> str:
    """SeriesInstanceUID of a series folder or file (used only to derive hashed case ids)."""
    path = Path(path)
    first = dicom_files(path)[0] if path.is_dir() else path
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    return str(ds.get("SeriesInstanceUID", ""))


def _slice_geometry(ds: pydicom.Dataset, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        spacing = np.asarray(ds.PixelSpacing, float)
    except AttributeError as e:
        raise ImageReadError(f"{path}: DICOM slice lacks geometry ({e.args[0].split()[-1]})") from None
    if iop.shape != (6,) or ipp.shape != (3,) or spacing.shape != (2,):
        raise ImageReadError(f"{path}: malformed DICOM geometry attributes")
    return iop, ipp, spacing


def read_dicom_series(path: str | Path) -> Volume:
    """A folder holding one DICOM series, or a single DICOM file."""
    path = Path(path)
    files = dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise ImageReadError(f"{path}: folder holds no DICOM files")
    slices = []
    for n, f in enumerate(files):
        # Errors name the series and the slice number, never the file: DICOM file names often hold UIDs.
        where = f"{path}: file {n + 1} of {len(files)}" if path.is_dir() else str(path)
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
        except FileNotFoundError:
            raise ImageReadError(f"{where}: file not found") from None
        except Exception as e:
            reason = type(e).__name__
            raise ImageReadError(f"{where}: unreadable DICOM ({reason})") from None
        if pixels.ndim != 2:
            raise ImageReadError(f"{where}: DICOM pixel data is {pixels.ndim}D; expected one 2D slice per file")
        iop, ipp, spacing = _slice_geometry(ds, where)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append((iop, ipp, spacing, pixels, slope, intercept, ds.get("SliceThickness"),
                       ds.get("SpacingBetweenSlices")))
    iop, _, spacing = slices[0][:3]
    for s in slices[1:]:
        if not np.allclose(s[0], iop, atol=1e-4) or not np.allclose(s[2], spacing, rtol=1e-4):
            raise ImageReadError(f"{path}: slices differ in orientation or pixel spacing (more than one series?)")
        if s[3].shape != slices[0][3].shape:
            raise ImageReadError(f"{path}: slices differ in size (more than one series?)")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s[1], normal)))
    positions = np.array([np.dot(s[1], normal) for s in slices])
    if len(slices) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < 1e-6 * max(1.0, abs(gaps).max())):
            raise ImageReadError(f"{path}: two slices share one position (duplicate slices or several series)")
        if np.ptp(gaps) > SLICE_SPACING_TOL * gaps.mean():
            raise ImageReadError(f"{path}: non-uniform slice spacing ({gaps.min():.3g}-{gaps.max():.3g} mm)")
        step = (slices[-1][1] - slices[0][1]) / (len(slices) - 1)
    else:
        thick = slices[0][7] or slices[0][6] or 1.0
        step = normal * float(thick)
    # Pixel array is (rows, cols); volume axis 0 runs along a row (col index), axis 1 down the columns.
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = slices[0][1]
    stack = []
    for s in slices:
        px = s[3].astype(np.float64) * s[4] + s[5] if (s[4] != 1 or s[5] != 0) else s[3]
        stack.append(np.asarray(px).T)
    data = np.stack(stack, axis=-1)
    if np.issubdtype(data.dtype, np.floating) and np.all(data == np.round(data)) and \
            data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    return Volume(data, check_affine(LPS_TO_RAS @ lps, str(path)))
