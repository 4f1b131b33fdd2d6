"""NRRD (.nrrd, .nhdr) reading with space directions and origin mapped to RAS."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import nrrd
import numpy as np

from lnfm.io.volume import ImageReadError, Volume, check_affine
from lnfm.workdir import temp_file

# NRRD 'space' values -> sign flips that take the space to RAS. 'scanner-xyz' and '3D-right-handed' name
# no patient axes (ITK reads them as LPS, as it does a header without 'space'): refused, like no 'space'.
_SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
}

# 'space units' -> millimetres per unit: the geometry is kept in mm. No unit ("" or no field) is mm. ITK
# (SimpleITK) ignores the field, so it reads a file in cm as 10x too small; lnfm converts it. Any other unit
# is refused rather than read as mm.
_MM_PER_UNIT = {
    **dict.fromkeys(("", "mm", "millimeter", "millimeters", "millimetre", "millimetres"), 1.0),
    **dict.fromkeys(("cm", "centimeter", "centimeters", "centimetre", "centimetres"), 10.0),
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), 1000.0),
    **dict.fromkeys(("um", "\u00b5m", "\u03bcm", "micron", "microns", "micrometer", "micrometers", "micrometre",
                     "micrometres"), 1e-3),
}


def _space_units(path: str) -> list[str] | None:
    """The header's 'space units', found as pynrrd finds fields but decoded here: pynrrd decodes the
    header as ASCII and drops other bytes, so 'µm' would come back as 'm' (metres, a 10^6 error)."""
    with open(path, "rb") as f:
        next(f, None)  # the magic line
        for line in f:
            line = line.rstrip()
            if not line:  # the blank line that ends the header
                return None
            if line.startswith(b"#") or b":" not in line:
                continue
            field, value = re.split(rb":=?", line, maxsplit=1)
            if field.strip() == b"space units":
                try:
                    return shlex.split(value.decode("utf-8"))
                except UnicodeDecodeError:
                    return shlex.split(value.decode("latin-1"))
    return None


def mm_per_space_unit(path: str) -> np.ndarray:
    """Millimetres per unit of each world axis ('space units' names one unit per axis of the space)."""
    units = _space_units(path)
    if units is None:
        return np.ones(3)
    if len(units) != 3:
        raise ImageReadError(f"{path}: NRRD 'space units' names {len(units)} units, expected 3 (one per axis of the "
                             "space)")
    unknown = [u for u in units if u.strip().lower() not in _MM_PER_UNIT]
    if unknown:
        raise ImageReadError(f"{path}: unsupported NRRD space unit '{unknown[0]}' (expected mm, cm, m or um)")
    return np.array([_MM_PER_UNIT[u.strip().lower()] for u in units])


def _data_file_field(path: str) -> str | None:
    with open(path, "rb") as f:
        header = nrrd.read_header(f)
    name = header.get("datafile", header.get("data file"))
    return None if name is None else str(name)


def data_file_named(path: str | Path) -> str | None:
    """The `data file:` a detached header (.nhdr) names, as written; None when it names none or cannot be read.
    Prepare keeps it out of the reasons it stores, as the case's own file names."""
    try:
        return _data_file_field(str(path))
    except Exception:  # any unreadable header: its reading names the problem
        return None


def _check_data_file(path: str) -> None:
    """A detached header (.nhdr) may name its data file only beside itself: a `data file:` pointing
    elsewhere would read any file on disk as voxels."""
    name = _data_file_field(path)
    if name is None:
        return
    if name.upper().startswith("LIST") or "%" in name:
        raise ImageReadError(f"{path}: NRRD 'data file' lists several files; only one data file is supported")
    folder = Path(path).resolve().parent
    target = (folder / name).resolve()
    if target.parent != folder:
        raise ImageReadError(f"{path}: NRRD 'data file' must lie beside the header, not at '{name}'")


def read_nrrd(path: str | Path) -> Volume:
    path = str(path)
    try:
        _check_data_file(path)
        data, header = nrrd.read(path, index_order="F")
        mm_per_unit = mm_per_space_unit(path)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path}: unreadable NRRD ({reason})") from None
    if header.get("space") is None:
        raise ImageReadError(f"{path}: NRRD has no 'space' field, so its axes' patient directions are unknown "
                             "(ITK reads them as left-posterior-superior); add a 'space:' line")
    space = str(header["space"]).lower()
    if space not in _SPACE_TO_RAS:
        raise ImageReadError(f"{path}: unsupported NRRD space '{space}' (expected {', '.join(sorted(_SPACE_TO_RAS))})")
    raw_dirs = header.get("space directions")
    if raw_dirs is None:
        raise ImageReadError(f"{path}: NRRD has no 'space directions' (no geometry)")
    # A non-spatial (channel) axis has a 'none' direction (NaN row); it moves last.
    spatial = [i for i, d in enumerate(raw_dirs) if d is not None and np.all(np.isfinite(np.asarray(d, float)))]
    if len(spatial) != 3:
        raise ImageReadError(f"{path}: NRRD has {len(spatial)} spatial axes, expected 3")
    # Each world coordinate (a column of the directions, an entry of the origin) is in its axis's unit.
    dirs = np.asarray([raw_dirs[i] for i in spatial], float) * mm_per_unit
    data = np.transpose(data, spatial + [i for i in range(data.ndim) if i not in spatial])
    origin = np.asarray(header.get("space origin", np.zeros(3)), float) * mm_per_unit
    affine = np.eye(4)
    affine[:3, :3] = dirs.T  # column j = world step of voxel axis j
    affine[:3, 3] = origin
    affine = np.diag(list(_SPACE_TO_RAS[space]) + [1]) @ affine
    return Volume(np.asarray(data), check_affine(affine, path))


def write_nrrd(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a RAS-space NRRD (used by tests and exports)."""
    header = {"space": "right-anterior-superior",
              "space directions": np.asarray(affine, float)[:3, :3].T,
              "space origin": np.asarray(affine, float)[:3, 3]}
    path = Path(path)
    with temp_file(path.with_name(path.stem), path.suffix) as tmp:  # a full disk: no partial file is left behind
        nrrd.write(str(tmp), np.asarray(data), header, index_order="F")
        os.replace(tmp, path)
