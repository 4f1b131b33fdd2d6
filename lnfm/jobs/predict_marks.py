"""How predict recognises its own output files, so that `--force` replaces those and nothing else.

Every file predict writes carries a mark no input of a user carries: the NIfTI header's description
(mask and probabilities), the report's first comment line, the overlay PNG's Software text chunk,
and the DICOM outputs' Manufacturer. None holds a path or a patient identifier.
"""

from __future__ import annotations

from pathlib import Path

from lnfm.eval.report import HEADER_COMMENT, OVERLAY_SOFTWARE
from lnfm.io.dicom_source import MANUFACTURER

NIFTI_DESCRIP = "lnfm predict"  # the NIfTI header's 80-byte description


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

            descrip = bytes(nib.load(str(path)).header["descrip"]).rstrip(b"\0")
            return descrip == NIFTI_DESCRIP.encode()
        if name.endswith(".csv"):
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.readline().rstrip("\n") == HEADER_COMMENT
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
