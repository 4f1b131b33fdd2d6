"""How predict recognises its own output files, so that `--force` replaces those and nothing else.

Every file predict writes carries a mark no input of a user carries: the NIfTI header's description
(mask and probabilities), the report's first comment line, the overlay PNG's Software text chunk,
and the DICOM outputs' Manufacturer. None holds a path or a patient identifier.

The NIfTI, CSV and DICOM marks also hold a digest of the file's content as written. A user who
corrects a predicted mask in nibabel (passing its header along), annotates a report, or renames and
approves an RTSTRUCT's ROI in a planning system keeps the mark's text, so the text alone would let
`--force` replace (or, for an RTSTRUCT with no node left, remove) their work; with the digest, a
changed file is no longer predict's. A DICOM output's digest lies in a private element of its own
(`seal_dicom`), over every other element's value as read back from the file.
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


# The private block a DICOM output's digest lies in (an odd group; the creator string reserves the block).
DICOM_DIGEST_GROUP = 0x0071
DICOM_DIGEST_CREATOR = "LNFM predict"
DICOM_DIGEST_ELEMENT = 0x01


def _digest_tags(ds) -> set:
    """The tags of the digest's own block in `ds` (creator and value), or an empty set without one."""
    try:
        block = ds.private_block(DICOM_DIGEST_GROUP, DICOM_DIGEST_CREATOR)
    except KeyError:
        return set()
    return {(DICOM_DIGEST_GROUP << 16) | (block.block_start >> 8), block.get_tag(DICOM_DIGEST_ELEMENT)}


def dicom_digest(ds) -> str:
    """16 hex digits of SHA-256 over every data element of a dataset read from a file (nested sequence
    items included, in order) but the digest's own block: each tag, VR and value as read (a DS or IS
    keeps its text, so the digest does not depend on how a float is printed)."""
    from pydicom.multival import MultiValue

    skip = _digest_tags(ds)
    h = hashlib.sha256()
    for elem in ds.iterall():
        if int(elem.tag) in skip:
            continue
        h.update(f"{int(elem.tag):08x}{elem.VR}".encode())
        if elem.VR == "SQ":
            continue  # its items' elements follow in iterall
        values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        for v in values:
            h.update(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass"))
            h.update(b"\\")
    return h.hexdigest()[:16]


def seal_dicom(path: str | Path) -> None:
    """Add predict's digest to the DICOM file predict has just written at `path` (a temporary name):
    read back, digested as `made_by_predict` will read it, and written again."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    digest = dicom_digest(ds)
    ds.private_block(DICOM_DIGEST_GROUP, DICOM_DIGEST_CREATOR, create=True).add_new(DICOM_DIGEST_ELEMENT, "LO",
                                                                                    f"sha256:{digest}")
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_is_predicts(path: Path) -> bool:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if ds.get("Manufacturer") != MANUFACTURER:
        return False
    try:
        recorded = ds.private_block(DICOM_DIGEST_GROUP, DICOM_DIGEST_CREATOR)[DICOM_DIGEST_ELEMENT].value
    except KeyError:  # no digest: written before predict sealed its DICOM outputs, or edited by a tool that drops it
        return False
    return recorded == f"sha256:{dicom_digest(ds)}"


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
            return _dicom_is_predicts(path)
    except Exception:  # a file that does not parse as its kind (any reader's error) is not one predict wrote
        return False
    return False
