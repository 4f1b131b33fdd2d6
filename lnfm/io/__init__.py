"""Image I/O: NIfTI, NRRD and DICOM series to `Volume` (array + RAS voxel->world affine)."""

from __future__ import annotations

from pathlib import Path

from lnfm.io.dicom import SeriesChoiceError, is_dicom_file, read_dicom_series, series_uid
from lnfm.io.nifti import read_nifti, write_nifti
from lnfm.io.nrrd_io import read_nrrd, write_nrrd
from lnfm.io.volume import ImageReadError, Volume

__all__ = ["ImageReadError", "SeriesChoiceError", "Volume", "read_image", "write_nifti", "write_nrrd", "read_nifti",
           "read_nrrd", "read_dicom_series", "series_uid", "is_dicom_path"]


def is_dicom_path(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() or (path.is_file() and is_dicom_file(path))


def read_image(path: str | Path, series: str | None = None) -> Volume:
    """Read a NIfTI file, an NRRD file, a DICOM series folder or a single DICOM file.
    A DICOM folder holding several series needs `series` (a SeriesInstanceUID).

    Raises ImageReadError("PATH: reason") for anything unreadable.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    if name.endswith((".nrrd", ".nhdr")):
        return read_nrrd(path)
    if is_dicom_path(path):
        return read_dicom_series(path, series)
    raise ImageReadError(f"{path}: unknown image format (expected .nii, .nii.gz, .nrrd, .nhdr or DICOM)")
