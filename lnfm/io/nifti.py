"""NIfTI (.nii, .nii.gz) reading and atomic writing with the full affine."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
from nibabel.openers import ImageOpener
import numpy as np

from lnfm.io.volume import ImageReadError, Volume, check_affine


def read_nifti(path: str | Path) -> Volume:
    path = str(path)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageReadError(f"{path}: not a NIfTI image")
        # The qform/sform affine nibabel picks is the scanner geometry. Without either, nibabel
        # builds one from pixdim and silently turns a zero into 1 mm and a negative into its size.
        if not (int(img.header["qform_code"]) or int(img.header["sform_code"])):
            with ImageOpener(path) as f:  # the header as stored: nib.load has already "fixed" pixdim
                zooms = np.asarray(type(img.header).from_fileobj(f, check=False)["pixdim"][1:4], np.float64)
            if not np.all(np.isfinite(zooms) & (zooms > 0)):
                raise ImageReadError(f"{path}: no voxel size: pixdim {zooms.tolist()} and no qform or sform")
        data = np.asanyarray(img.dataobj)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types for corrupt files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path}: unreadable NIfTI ({reason})") from None
    return Volume(np.asarray(data), check_affine(img.affine, path))


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI file via a temporary sibling and rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel compresses by the (lower-case) suffix: MASK.NII.GZ must be gzipped too
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    try:
        nib.save(img, str(tmp))
    except BaseException:  # a full disk or a kill signal: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
