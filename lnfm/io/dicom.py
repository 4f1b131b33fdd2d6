"""DICOM series reading: slices sorted along the slice normal, HU via rescale, LPS -> RAS.

Only geometry and pixel values leave this module; no patient attribute does.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError

from lnfm.io.volume import LPS_TO_RAS, ImageReadError, Volume, check_affine

# Relative tolerance on the spacing between consecutive slices.
SLICE_SPACING_TOL = 0.01
# ImageOrientationPatient holds two perpendicular unit vectors, to this tolerance (rounding of its decimals).
ORIENTATION_TOL = 1e-3
# Slice positions lie on one line to within this fraction of a pixel.
SLICE_LINE_TOL = 0.2


# The first data elements of a DICOM dataset written without the Part-10 preamble (older scanners and
# PACS exports; SimpleITK reads them): little-endian (group, element) of the file meta (0002,0000..0010) or
# of the identifying module (0008,0000..0020: SpecificCharacterSet, ImageType, SOPClassUID, ...).
_RAW_GROUPS = (0x0002, 0x0008)
_RAW_MAX_ELEMENT = 0x0020
# A refusal names at most this many of pydicom's warnings about the slice, each cut to this many characters.
_WARNINGS_SHOWN, _WARNING_CHARS = 2, 160
# What reading a damaged, cut or foreign file's header raises (tried on thousands of mutated and cut slices of
# the real series under ../shared/data, SEG and RTSTRUCT outputs, datasets without preamble): OSError and
# struct.error (a file or an element cut short; a file gone since it was listed), InvalidDicomError (no DICM
# prefix), NotImplementedError (an unknown VR), BytesLengthException and ValueError (a value that does not fit
# its VR, a null in SpecificCharacterSet), and TypeError where a damaged VR makes SpecificCharacterSet a number,
# only from pydicom's own code (`damaged`). Any other is a bug.
BAD_DICOM = (OSError, struct.error, InvalidDicomError, NotImplementedError, BytesLengthException, ValueError,
             TypeError)
_PYDICOM = os.path.dirname(pydicom.__file__) + os.sep


def damaged(e: BaseException) -> bool:
    """Whether `e`, caught as one of `BAD_DICOM`, says the file is damaged: a TypeError only when raised within
    pydicom (ours is a bug, to keep its traceback)."""
    return not isinstance(e, TypeError) or any(frame.f_code.co_filename.startswith(_PYDICOM)
                                               for frame, _ in traceback.walk_tb(e.__traceback__))


@contextlib.contextmanager
def pydicom_warnings():
    """pydicom's warnings while reading (a malformed header: 'Expected implicit VR, but found explicit VR', an
    invalid value), recorded instead of printed above the one-line refusal: yields the list they are recorded in
    (`warned` turns it into text for that line). A slice read all the same keeps none: what lnfm needs of it
    (geometry, rescale, pixels) is checked on its own."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def warned(caught: list) -> str:
    """'; pydicom warned: ...' with the distinct texts of the recorded warnings (short), or ''."""
    texts = list(dict.fromkeys(str(w.message).strip().splitlines()[0][:_WARNING_CHARS] for w in caught
                               if str(w.message).strip()))
    return f"; pydicom warned: {'; '.join(texts[:_WARNINGS_SHOWN])}" if texts else ""


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return b""


def _is_raw_dataset(head: bytes) -> bool:
    """A dataset without the 128-byte preamble and DICM prefix: it starts with a data element of its first
    groups (a NIfTI, NRRD, gzip or text file does not)."""
    if len(head) < 8 or head[128:132] == b"DICM":
        return False
    group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    return group in _RAW_GROUPS and element <= _RAW_MAX_ELEMENT


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 file (DICM magic), a .dcm file, or a dataset written without the preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    head = _head(path)
    return (len(head) == 132 and head[128:132] == b"DICM") or _is_raw_dataset(head)


def read_dataset(path: Path, **kwargs) -> pydicom.Dataset:
    """pydicom's dcmread, told to read a dataset without the preamble (which it refuses by default); such a
    dataset has no file meta, so its transfer syntax is the encoding pydicom found it in."""
    raw = _is_raw_dataset(_head(path))
    ds = pydicom.dcmread(path, force=raw, **kwargs)
    if raw and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        implicit, little = ds.original_encoding
        if not little:
            raise ValueError("a big-endian dataset without file meta is not supported")  # named by the caller
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else \
            pydicom.uid.ExplicitVRLittleEndian
    return ds


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


class SeriesChoiceError(ImageReadError):
    """A folder holds several DICOM series and none (or an unknown one) was chosen."""


class _Newest:
    """The newest `size` entries path -> (the file's stat when read, value); an entry of a file whose stat
    changed since (rewritten, replaced) is not returned."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, path: str, stat: tuple):
        with self.lock:
            hit = self.items.get(path)
            if hit is None or hit[0] != stat:
                return None
            self.items.move_to_end(path)
            return hit[1]

    def put(self, path: str, stat: tuple, value) -> None:
        with self.lock:
            self.items[path] = (stat, value)
            self.items.move_to_end(path)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


# A slice's header is read once: finding a series (series_of, of every folder of a batch before the first is
# read), grouping its folder again to load it, and writing DICOM outputs onto it (read_source_series) all use
# it. Kept by file stat, so a file written since is read anew: whole headers (10-50 kB in memory each, 100 MB at
# most) for the last HEADER_CACHE_FILES files read, their SeriesInstanceUID (the grouping) for many more.
HEADER_CACHE_FILES = 2048
UID_CACHE_FILES = 1 << 18
_HEADERS, _UIDS = _Newest(HEADER_CACHE_FILES), _Newest(UID_CACHE_FILES)


def _stat(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def slice_header(path: Path) -> pydicom.Dataset:
    """The header of a DICOM file (no pixel data), read once while the file is unchanged. Shared by every
    reader: not to be modified."""
    key, stat = os.path.abspath(path), _stat(path)  # stat first: a file changed while read is read again
    ds = _HEADERS.get(key, stat)
    if ds is None:
        with pydicom_warnings():
            ds = read_dataset(path, stop_before_pixels=True)
        _HEADERS.put(key, stat, ds)
        _UIDS.put(key, stat, str(ds.get("SeriesInstanceUID", "") or ""))
    return ds


def _series_uid_of(path: Path) -> str:
    uid = _UIDS.get(os.path.abspath(path), _stat(path))
    return uid if uid is not None else str(slice_header(path).get("SeriesInstanceUID", "") or "")


def known_series_uids(folder: str | Path) -> dict[str, tuple]:
    """What this process read of the SeriesInstanceUIDs of `folder`'s files, for a worker process to find the
    folder's series without reading the headers again (`learn_series_uids`)."""
    folder = os.path.abspath(folder)
    try:
        paths = [os.path.join(folder, n) for n in os.listdir(folder)]
    except OSError:  # gone since: the worker says so
        return {}
    with _UIDS.lock:
        return {k: _UIDS.items[k] for k in paths if k in _UIDS.items}


def learn_series_uids(known: dict[str, tuple]) -> None:
    for path, (stat, uid) in known.items():
        _UIDS.put(path, stat, uid)


def series_of(files: list[Path]) -> tuple[dict[str, list[Path]], list[Path]]:
    """(files grouped by SeriesInstanceUID, '' for slices without one; files whose header
    cannot be parsed)."""
    groups: dict[str, list[Path]] = {}
    unreadable = []
    for f in files:
        try:
            uid = _series_uid_of(f)
        except BAD_DICOM as e:  # read_dicom_series reports it, as a file of the series it reads
            if not damaged(e):
                raise
            unreadable.append(f)
            continue
        groups.setdefault(uid, []).append(f)
    return groups, unreadable


def describe_series(groups: dict[str, list[Path]]) -> str:
    return "; ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(files)} file(s))" for uid, files in groups.items())


def select_series(path: Path, series: str | None = None) -> tuple[str, list[Path]]:
    """(SeriesInstanceUID, files) of the one series of a folder or file to read.

    A folder holding several series is refused with their list unless `series` names one."""
    if not path.is_dir():
        return series_uid_of_file(path), [path]
    files = dicom_files(path)
    if not files:
        raise ImageReadError(f"{path}: folder holds no DICOM files")
    groups, unreadable = series_of(files)
    if len(groups) > 1 and "" in groups:  # slices without a UID go with the series read (and fail there if foreign)
        unreadable += groups.pop("")
    if series:
        if series not in groups:
            raise SeriesChoiceError(f"{path}: no DICOM series {series} here (found: {describe_series(groups)})")
        return series, sorted(groups[series] + unreadable)
    if len(groups) > 1:
        raise SeriesChoiceError(f"{path}: folder holds {len(groups)} DICOM series: {describe_series(groups)}; "
                                f"choose one with --series UID")
    uid, group = next(iter(groups.items()), ("", []))
    return uid, sorted(group + unreadable)


def series_uid_of_file(path: Path) -> str:
    try:
        return str(slice_header(path).get("SeriesInstanceUID", ""))
    except BAD_DICOM as e:  # reading the file names it
        if not damaged(e):
            raise
        return ""


def series_uid(path: str | Path, series: str | None = None) -> str:
    """SeriesInstanceUID of the series `read_dicom_series(path, series)` reads (used only to
    derive hashed case ids)."""
    return select_series(Path(path), series)[0]


def _instance_uids(folder: str) -> set[str]:
    found = set()
    for f in dicom_files(Path(folder)):
        try:
            found.add(str(slice_header(f).get("SOPInstanceUID", "")))
        except BAD_DICOM as e:  # the folder's reading names such a file
            if not damaged(e):
                raise
    return found - {""}


def split_series(uids: dict[str, str]) -> dict[str, list[str]]:
    """{folder: the other folders holding slices of its series} for folders whose SeriesInstanceUID (`uids`:
    folder -> uid; '' for none, which tells nothing) is another folder's too, with no slice (SOPInstanceUID) in
    common: one series split over several folders, each of which would be read as a short series of its own.
    Folders sharing slices are copies of one series, which the callers' duplicate checks name."""
    by_uid: dict[str, list[str]] = {}
    for folder, uid in uids.items():
        if uid:
            by_uid.setdefault(uid, []).append(folder)
    split = {}
    for group in (g for g in by_uid.values() if len(g) > 1):
        instances = [_instance_uids(f) for f in group]
        if sum(len(i) for i in instances) == len(set().union(*instances)):  # pairwise disjoint
            split.update({f: [g for g in group if g != f] for f in group})
    return split


def split_series_reason(others: list[str]) -> str:
    return (f"holds part of a DICOM series whose other slices lie in {len(others)} other folder(s) ({others[0]}"
            f"{', ...' if len(others) > 1 else ''}): each folder would be read as a short series; move the series' "
            f"slices into one folder")


def _numbers(ds: pydicom.Dataset, name: str, path: str) -> np.ndarray:
    """The values of geometry tag `name` as floats. A value that is no number (a decimal string holding text) is
    refused naming the tag, not the value: a header's text is kept out of the reason, as any DICOM attribute."""
    try:
        return np.asarray(getattr(ds, name), float)
    except AttributeError:
        raise ImageReadError(f"{path}: DICOM slice lacks geometry ('{name}')") from None
    except (ValueError, TypeError, OverflowError):  # float('CANARY'), or pydicom validating the value
        raise ImageReadError(f"{path}: {name} holds a value that is not a number") from None


def slice_geometry(ds: pydicom.Dataset, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of a slice; one missing or unusable is an
    ImageReadError naming `path` and the tag."""
    iop, ipp, spacing = (_numbers(ds, name, path) for name in
                         ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"))
    if iop.shape != (6,) or ipp.shape != (3,) or spacing.shape != (2,):
        raise ImageReadError(f"{path}: malformed DICOM geometry attributes")
    if not np.all(np.isfinite(ipp)):  # a NaN sort key would order the slices arbitrarily, and pass every gap check
        raise ImageReadError(f"{path}: ImagePositionPatient {ipp.tolist()} is not a finite position")
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ImageReadError(f"{path}: PixelSpacing {spacing.tolist()} is not two positive sizes in mm")
    row, col = iop[:3], iop[3:]
    if not (np.all(np.isfinite(iop)) and abs(np.linalg.norm(row) - 1) <= ORIENTATION_TOL
            and abs(np.linalg.norm(col) - 1) <= ORIENTATION_TOL and abs(row @ col) <= ORIENTATION_TOL):
        raise ImageReadError(f"{path}: ImageOrientationPatient {iop.round(4).tolist()} is not two perpendicular "
                             f"unit vectors (the voxel size and orientation it implies would be wrong)")
    return iop, ipp, spacing


def _off_line(positions: np.ndarray) -> float:
    """The largest distance (mm) of a slice position from the line through the first and the last."""
    direction = positions[-1] - positions[0]
    direction = direction / np.linalg.norm(direction)
    rel = positions - positions[0]
    return float(np.linalg.norm(rel - np.outer(rel @ direction, direction), axis=1).max())


def stack_geometry(positions, iop, first, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(the order that sorts slices at ImagePositionPatient `positions` along the slice normal of orientation `iop`,
    the step (mm, LPS) from one sorted slice to the next): the mean step, the first slice to the last. A single
    slice steps along the normal by its SpacingBetweenSlices, else SliceThickness, else 1 mm (of header `first`,
    a Dataset or a dict). Every reader of a series' grid (`read_dicom_series`, `read_source_series`, `image_grid`)
    takes it from here, so that they agree."""
    positions, iop = np.asarray(positions, float).reshape(-1, 3), np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort(positions @ normal, kind="stable")  # stable: as list.sort, should two slices tie
    if len(order) > 1:
        return order, (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    between, thickness = first.get("SpacingBetweenSlices"), first.get("SliceThickness")
    try:
        return order, normal * float(between or thickness or 1.0)
    except (TypeError, ValueError, OverflowError):
        name = "SpacingBetweenSlices" if between else "SliceThickness"
        raise ImageReadError(f"{where}: {name} holds a value that is not a number") from None


def _rescale(ds: pydicom.Dataset, where: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (1 and 0 when absent or empty). A slope of 0 would make
    every voxel the intercept: refused, as a value that is not a finite number. Text that is no number
    is not repeated in the refusal (a header's text stays out of it, as any DICOM attribute)."""
    values = []
    for name, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        try:
            raw = ds.get(name)
            value = default if raw is None or str(raw).strip() == "" else float(raw)
        except (TypeError, ValueError, OverflowError):
            value = None
        need = f"a finite number{', not 0' if name == 'RescaleSlope' else ''}"
        if value is None:
            raise ImageReadError(f"{where}: {name} holds a value that is not a number ({need})")
        if not np.isfinite(value) or (name == "RescaleSlope" and value == 0):
            raise ImageReadError(f"{where}: {name} {value:g} is not a usable value ({need})")
        values.append(value)
    return values[0], values[1]


def read_dicom_series(path: str | Path, series: str | None = None) -> Volume:
    """A folder holding one DICOM series (or several, of which `series` names the one to
    read by its SeriesInstanceUID), or a single DICOM file."""
    path = Path(path)
    _, files = select_series(path, series)
    slices, rescaled, numbers = [], [], set()
    for n, f in enumerate(files):
        # Errors name the series and the slice number, never the file: DICOM file names often hold UIDs.
        where = f"{path}: file {n + 1} of {len(files)}" if path.is_dir() else str(path)
        with pydicom_warnings() as caught:
            try:
                ds = read_dataset(f)
                has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
                if not has_pixels and "MediaStorageSOPClassUID" in getattr(ds, "file_meta", {}):  # no image
                    raise ImageReadError(f"{where}: holds no pixel data (not an image slice: a DICOMDIR, report or "
                                         f"structure set?)")
                pixels = ds.pixel_array
            except FileNotFoundError:
                raise ImageReadError(f"{where}: file not found") from None
            except ImageReadError:
                raise
            except Exception as e:  # pydicom's first line says why (e.g. which decoder a transfer syntax needs)
                detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                raise ImageReadError(f"{where}: unreadable DICOM ({type(e).__name__}{': ' + detail if detail else ''}"
                                     f"{warned(caught)})") from None
        if pixels.ndim != 2:
            raise ImageReadError(f"{where}: DICOM pixel data is {pixels.ndim}D; expected one 2D slice per file")
        iop, ipp, spacing = slice_geometry(ds, where)
        slope, intercept = _rescale(ds, where)
        slices.append((iop, ipp, spacing, pixels, slope, intercept,
                       {k: ds.get(k) for k in ("SpacingBetweenSlices", "SliceThickness")}))
        rescaled.append("RescaleIntercept" in ds or "RescaleSlope" in ds)
        numbers.add(str(ds.get("SeriesNumber", "") or "").strip())
    if 0 < sum(rescaled) < len(rescaled):  # those without would be read 1024 HU (the usual intercept) off
        raise ImageReadError(f"{path}: {len(rescaled) - sum(rescaled)} of {len(rescaled)} slices carry no "
                             f"RescaleIntercept or RescaleSlope where the others do: their HU cannot be known")
    numbers.discard("")
    if len(numbers) > 1:  # one series has one SeriesNumber: slices without a UID may be several series
        shown = ", ".join(sorted(numbers)) if all(n.lstrip("+-").isdigit() for n in numbers) else \
            f"{len(numbers)} different values"  # text in the tag is not repeated
        raise ImageReadError(f"{path}: slices carry SeriesNumber {shown}: more than one series "
                             f"(split them into one folder each)")
    iop, _, spacing = slices[0][:3]
    for s in slices[1:]:
        if not np.allclose(s[0], iop, atol=1e-4) or not np.allclose(s[2], spacing, rtol=1e-4):
            raise ImageReadError(f"{path}: slices differ in orientation or pixel spacing (more than one series?)")
        if s[3].shape != slices[0][3].shape:
            raise ImageReadError(f"{path}: slices differ in size (more than one series?)")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    order, step = stack_geometry([s[1] for s in slices], iop, slices[0][6], str(path))
    slices = [slices[i] for i in order]
    positions = np.array([np.dot(s[1], normal) for s in slices])
    if len(slices) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < 1e-6 * max(1.0, abs(gaps).max())):
            raise ImageReadError(f"{path}: two slices share one position (duplicate slices or several series)")
        if np.ptp(gaps) > SLICE_SPACING_TOL * gaps.mean():
            raise ImageReadError(f"{path}: non-uniform slice spacing ({gaps.min():.3g}-{gaps.max():.3g} mm)")
        off = _off_line(np.array([s[1] for s in slices]))
        if off > SLICE_LINE_TOL * min(spacing):
            raise ImageReadError(f"{path}: slice positions do not lie on one line (one is {off:.3g} mm off it; "
                                 f"several series, or shifted slices)")
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
