"""NRRD (.nrrd, .nhdr) reading with space directions and origin mapped to RAS."""

from __future__ import annotations

import os
from pathlib import Path

import nrrd
import numpy as np

from lnfm.io.volume import ImageReadError, Volume, check_affine

# NRRD 'space' values -> sign flips that take the space to RAS. 'scanner-xyz' and '3D-right-handed' name
# no patient axes (ITK reads them as LPS, as it does a header without 'space'): refused, like no 'space'.
_SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
}


def _check_data_file(path: str) -> None:
    """A detached header (.nhdr) may name its data file only beside itself: a `data file:` pointing
    elsewhere would read any file on disk as voxels."""
    with open(path, "rb") as f:
        header = nrrd.read_header(f)
    name = header.get("datafile", header.get("data file"))
    if name is None:
        return
    name = str(name)
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
    dirs = np.asarray([raw_dirs[i] for i in spatial], float)
    data = np.transpose(data, spatial + [i for i in range(data.ndim) if i not in spatial])
    origin = np.asarray(header.get("space origin", np.zeros(3)), float)
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
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        nrrd.write(str(tmp), np.asarray(data), header, index_order="F")
    except BaseException:  # a full disk: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
