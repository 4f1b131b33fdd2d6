"""How predict recognises its own output files, so that `--force` replaces those and nothing else.

Every file predict writes carries a mark no input of a user carries: the NIfTI header's description
(mask and probabilities), the report's first comment line, the overlay PNG's Software text chunk,
and the DICOM outputs' Manufacturer. None holds a path or a patient identifier.

The NIfTI and CSV marks also hold a digest of the file's content as written. A user who corrects a
predicted mask in nibabel (passing its header along) or annotates a report keeps the mark's text, so
the text alone would let `--force` replace their work; with the digest, a changed file is no longer
predict's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lnfm.eval.report import OVERLAY_SOFTWARE, report_is_unchanged
from lnfm.io.dicom_source import MANUFACTURER

NIFTI_MARK = "lnfm predict"  # the start of the NIfTI header's 80-byte description


def array_digest(data: np.ndarray) -> str:
    """16 hex digits of SHA-256 over an array's dtype, shape and C-order bytes."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.tobytes())
    return h.hexdigest()[:16]


def nifti_descrip(data: np.ndarray) -> str:
    """The description predict writes into a NIfTI header: its mark and the voxels' digest."""
    return f"{NIFTI_MARK} sha256:{array_digest(np.asarray(data))}"


def made_by_predict(path: str | Path) -> bool:
    """Whether `path` is a plain file that carries predict's mark for its kind (False for anything
    unreadable, a link, or a kind predict does not write)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            descrip = bytes(img.header["descrip"]).rstrip(b"\0").decode("ascii", "replace")
            if not descrip.startswith(f"{NIFTI_MARK} sha256:"):
                return False
            return descrip == nifti_descrip(np.asarray(img.dataobj.get_unscaled()))  # the voxels as stored
        if name.endswith(".csv"):
            return report_is_unchanged(path.read_text(encoding="utf-8", errors="replace"))
        if name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as image:
                return getattr(image, "text", {}).get("Software") == OVERLAY_SOFTWARE
        if name.endswith(".dcm"):
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Manufacturer"])
            return ds.get("Manufacturer") == MANUFACTURER
    except Exception:  # a file that does not parse as its kind (any reader's error) is not one predict wrote
        return False
    return False
