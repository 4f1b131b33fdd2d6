"""How predict recognises its own output files, so that `--force` replaces those and nothing else.

Every file predict writes carries a mark no input of a user carries: the NIfTI header's description
(mask and probabilities), the report's first comment line, the overlay PNG's Software text chunk,
and the DICOM outputs' Manufacturer. None holds a path or a patient identifier.

The NIfTI, CSV, PNG and DICOM marks also hold a digest of the file's content as written. A user who
corrects a predicted mask in nibabel (passing its header along), annotates a report, or renames and
approves an RTSTRUCT's ROI in a planning system keeps the mark's text, so the text alone would let
`--force` replace (or, for an RTSTRUCT with no node left, remove) their work; with the digest, a
changed file is no longer predict's. A NIfTI's digest covers its voxels and its geometry (qform,
sform, voxel sizes, units, scaling), so a mask moved into place by a corrected affine is the user's
too; marks of an earlier predict ("lnfm predict sha256:...", voxels only) cannot tell that, so their
files are refused (`earlier_mark`), as are overlays of an earlier predict, whose Software chunk had no digest
beside it. An overlay's digest covers its decoded pixels. A DICOM output's digest lies in a private element of its own
(`seal_dicom`), over every other element's value as read back from the file (geometry included).
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from lnfm.eval.report import OVERLAY_DIGEST, OVERLAY_SOFTWARE, overlay_digest, report_is_unchanged
from lnfm.io.dicom import BAD_DICOM, damaged
from lnfm.io.dicom_source import MANUFACTURER
from lnfm.io.nifti import BAD_NIFTI, nifti_image, stored_header

NIFTI_MARK = "lnfm predict v2"  # the start of the NIfTI header's 80-byte description
EARLIER_NIFTI_MARK = "lnfm predict sha256:"  # before v2: a digest of the voxels alone
# The header fields that place the voxels in space, hashed as stored (a reader takes its geometry from them).
NIFTI_GEOMETRY = ("xyzt_units", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                  "qoffset_y", "qoffset_z", "pixdim", "srow_x", "srow_y", "srow_z")


def array_digest(data: np.ndarray) -> str:
    """16 hex digits of SHA-256 over an array's dtype, shape and C-order bytes."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.tobytes())
    return h.hexdigest()[:16]


def nifti_digest(header, voxels: np.ndarray) -> str:
    """16 hex digits of SHA-256 over the voxels as stored, the scaling readers apply to them and the
    header's geometry fields (`NIFTI_GEOMETRY`)."""
    slope, inter = header.get_slope_inter()  # (None, None): no scaling, however the header spells it
    numbers = [(1.0, 0.0) if slope is None else (slope, inter)] + [header[name] for name in NIFTI_GEOMETRY]
    h = hashlib.sha256(array_digest(voxels).encode())
    h.update(np.concatenate([np.ravel(np.asarray(n, np.float64)) for n in numbers]).tobytes())
    return h.hexdigest()[:16]


def nifti_descrip(data: np.ndarray, affine: np.ndarray) -> str:
    """The description predict writes into the NIfTI header of `data` on `affine` (`write_nifti`): its mark
    and the digest of the voxels and geometry as written."""
    img = nifti_image(data, affine)
    return f"{NIFTI_MARK} sha256:{nifti_digest(img.header, np.asarray(img.dataobj))}"


def _description(header) -> str:
    return bytes(header["descrip"]).rstrip(b"\0").decode("ascii", "replace")


# Deflate packs at most about 1032 bytes into one, so a .nii.gz cannot hold more voxel bytes than this times its size.
_DEFLATE_MAX_RATIO = 1032


def _claimed_bytes(header: nib.Nifti1Header) -> int:
    """The voxel bytes the header claims; 0 for an unknown datatype code, which nibabel's load then refuses."""
    try:
        itemsize = header.get_data_dtype().itemsize
    except KeyError:
        return 0
    return int(np.prod([int(n) for n in header.get_data_shape()], dtype=object)) * itemsize


def _most_bytes(path: Path) -> int:
    """The most voxel bytes the file at `path` can hold."""
    size = path.stat().st_size
    return size * _DEFLATE_MAX_RATIO if path.name.lower().endswith(".gz") else size


def _nifti_is_predicts(path: Path) -> bool:
    header = stored_header(str(path))  # as written: nibabel's loader mends some fields in memory
    if header is None or not _description(header).startswith(f"{NIFTI_MARK} sha256:"):
        return False
    if _claimed_bytes(header) > _most_bytes(path):  # a damaged size: reading it would fill the memory, not fail
        return False
    voxels = nib.load(str(path)).dataobj.get_unscaled()  # as stored
    return _description(header) == f"{NIFTI_MARK} sha256:{nifti_digest(header, voxels)}"


def earlier_nifti_mark(path: str | Path) -> bool:
    """Whether `path` is a NIfTI with the mark of a predict from before v2, whose digest covers the voxels
    alone: whether its geometry was corrected since cannot be told, so `--force` leaves it."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return False  # never opened: a FIFO would block the read
    try:
        header = stored_header(str(path))  # no NIfTI header there: None
    except (OSError, EOFError, zlib.error):  # unreadable, or a .gz that is not one, cut short or damaged
        return False
    return header is not None and _description(header).startswith(EARLIER_NIFTI_MARK)


def _earlier_overlay_mark(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {})
    except (OSError, SyntaxError, Image.DecompressionBombError):  # PIL's, on a cut, damaged or foreign file
        return False
    return text.get("Software") == OVERLAY_SOFTWARE and OVERLAY_DIGEST not in text


def earlier_mark(path: str | Path) -> str | None:
    """Why `path` is not replaced although an earlier predict marked it (its mark cannot tell an edited copy
    from its own file), or None."""
    path = Path(path)
    if earlier_nifti_mark(path):
        return "whose mark does not cover the geometry: a corrected affine cannot be told"
    if not path.is_symlink() and path.is_file() and path.name.lower().endswith(".png") and _earlier_overlay_mark(path):
        return "whose overlay mark holds no digest of its pixels: an edited copy cannot be told"
    return None


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
    if name.endswith((".nii", ".nii.gz")):
        try:
            return _nifti_is_predicts(path)
        except (*BAD_NIFTI, MemoryError):  # not a NIfTI, or a damaged one (MemoryError: the huge size it claims)
            return False
    if name.endswith(".csv"):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return report_is_unchanged(text)
    if name.endswith(".png"):
        from PIL import Image

        try:
            with Image.open(path) as image:
                text = getattr(image, "text", {})
                return text.get("Software") == OVERLAY_SOFTWARE and text.get(OVERLAY_DIGEST) == overlay_digest(image)
        except (OSError, SyntaxError, Image.DecompressionBombError):  # PIL's, on a cut, damaged or foreign file
            return False
    if name.endswith(".dcm"):
        try:
            return _dicom_is_predicts(path)
        except BAD_DICOM as e:
            if not damaged(e):
                raise
            return False
    return False
