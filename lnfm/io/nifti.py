"""NIfTI (.nii, .nii.gz) reading and atomic writing with the full affine."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from lnfm.io.volume import ImageReadError, Volume, check_affine
from lnfm.workdir import check_job_folder, temp_file


# What loading a damaged, cut or foreign .nii or .nii.gz raises (tried on thousands of them): OSError (gzip's
# BadGzipFile, data cut short), EOFError and zlib.error (a .gz cut short or damaged), nibabel's errors, ValueError
# (a NaN or negative size) and OverflowError (a memory map of a size the header cannot give). Any other is a bug.
BAD_NIFTI = (OSError, EOFError, zlib.error, ValueError, OverflowError, ImageFileError, HeaderDataError)

# qform and sform may differ by what float32 storage of the qform's quaternion loses: near a 180-degree
# rotation up to 1.3e-3 of an axis's length (measured over 20,000 random rotations), about four times
# less than this. A mirrored axis differs by twice its length, another voxel size by its difference.
AXIS_TOLERANCE = 5e-3  # |qform axis - sform axis| / |sform axis|, for each voxel axis
ORIGIN_TOLERANCE_MM = 1e-3  # both store voxel 0's centre as float32, whose step at 2 m is 1.2e-4 mm


def orientation_problem(header: nib.Nifti1Header) -> str | None:
    """Why the header holds no one geometry: no qform or sform (nibabel would make up the axes from
    pixdim), or a qform and an sform that place the voxels apart (nibabel takes the sform, other
    readers, older ITK among them, the qform: the scan would be mirrored or moved in one of them)."""
    if not (int(header["qform_code"]) or int(header["sform_code"])):
        return "no orientation: qform and sform codes are 0"
    if not (int(header["qform_code"]) and int(header["sform_code"])):
        return None
    q, s = header.get_qform(), header.get_sform()
    axis = np.linalg.norm(q[:3, :3] - s[:3, :3], axis=0) / np.linalg.norm(s[:3, :3], axis=0)
    origin = float(np.abs(q[:3, 3] - s[:3, 3]).max())
    if np.all(axis <= AXIS_TOLERANCE) and origin <= ORIGIN_TOLERANCE_MM:  # NaN fails both
        return None
    return (f"qform and sform disagree (voxel axes differ by {np.array2string(axis, precision=4)} of their "
            f"length, voxel 0 by {origin:.4g} mm; tolerance {AXIS_TOLERANCE}, {ORIGIN_TOLERANCE_MM} mm): "
            "set the code of the wrong one to 0")


NIFTI_XFORM_CODES = (0, 1, 2, 3, 4)  # unknown, scanner, aligned, Talairach, MNI
# xyzt_units' spatial code (its low 3 bits) -> mm per unit: the qform and sform are in that unit. Unknown (0) is
# read as mm, as every reader does; ITK (SimpleITK) converts metres and microns to mm, and so does lnfm.
MM_PER_NIFTI_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 1e-3}  # unknown, meter, mm, micron


def stored_header_problem(raw: nib.Nifti1Header) -> str | None:
    """Why a header as stored (unchecked) holds no one geometry although its forms' codes say it does.
    nibabel's loader rewrites such a header in memory with at most a log line: a 0 voxel size becomes
    1 mm, a negative one its absolute value, a qfac other than +-1 becomes 1 (ITK takes its sign), an
    unknown form code 0, so the scan would be read at a spacing or orientation its writer never gave."""
    for name in ("qform_code", "sform_code"):
        if int(raw[name]) not in NIFTI_XFORM_CODES:
            return f"{name} {int(raw[name])} is not a NIfTI transform code (0-4)"
    if int(raw["xyzt_units"]) & 7 not in MM_PER_NIFTI_UNIT:
        return (f"xyzt_units {int(raw['xyzt_units'])} names no spatial unit (its low 3 bits are "
                f"{int(raw['xyzt_units']) & 7}; NIfTI defines 0 unknown, 1 meter, 2 mm, 3 micron)")
    if not int(raw["qform_code"]):  # pixdim scales only the qform; an sform alone carries its own sizes
        return None
    qfac, *sizes = (float(v) for v in raw["pixdim"][:4])
    if not all(np.isfinite(s) and s > 0 for s in sizes):
        shown = tuple(round(s, 4) for s in sizes)
        return f"pixdim voxel sizes {shown} are not all positive (the qform is scaled by them)"
    if qfac not in (0.0, 1.0, -1.0):
        return f"pixdim[0] (qfac) {qfac:g} is not 1 or -1 (readers disagree on the slice direction)"
    return None


def stored_header(path: str) -> nib.Nifti1Header | None:
    """The header's bytes as written, before nibabel's in-memory fixes; None if they are no NIfTI-1/2
    header (nibabel's loader then names the problem)."""
    with ImageOpener(path) as f:
        block = f.read(nib.Nifti2Header.sizeof_hdr)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.sizeof_hdr
        if len(block) >= size and size in (int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")):
            return klass(binaryblock=block[:size], check=False)
    return None


def load_header(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """The image with its header checked (ImageReadError 'PATH: reason'), none of its voxels read yet (nibabel
    reads them when asked for them); other errors are nibabel's (`read_nifti` names them)."""
    path = str(path)
    stored = stored_header(path)  # checked first: nibabel would log its own fix of it
    problem = stored_header_problem(stored) if stored is not None else None
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{path}: not a NIfTI image")
    problem = orientation_problem(img.header)
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    return img


def affine_mm(img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The image's voxel-to-world affine in mm (its qform and sform are in xyzt_units' unit)."""
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3] *= MM_PER_NIFTI_UNIT[int(img.header["xyzt_units"]) & 7]
    return affine


def read_nifti(path: str | Path) -> Volume:
    path = str(path)
    try:
        img = load_header(path)
        data = np.asanyarray(img.dataobj)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types for corrupt files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path}: unreadable NIfTI ({reason})") from None
    return Volume(np.asarray(data), check_affine(affine_mm(img), path))  # the geometry is kept in mm


def nifti_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """`data` on `affine` as `write_nifti` writes it: qform and sform both set (the sform alone on a sheared grid)."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if orientation_problem(img.header):  # a sheared grid: no qform holds it, so write the sform alone
        img.set_qform(None, code=0)
    return img


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, descrip: str = "") -> None:
    """Write a NIfTI file via a temporary sibling and rename (never half-written); `descrip` goes into the
    header's 80-byte description (predict marks its outputs there)."""
    path = Path(path)
    check_job_folder(path, path.name)  # a test mask of a moved run: not written at the old path
    path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel compresses by the (lower-case) suffix: MASK.NII.GZ must be gzipped too
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    img = nifti_image(data, affine)
    if descrip:
        img.header["descrip"] = descrip.encode()[:80]
    with temp_file(path, suffix) as tmp:  # a full disk or a kill signal: no partial file is left behind
        nib.save(img, str(tmp))
        os.replace(tmp, path)
