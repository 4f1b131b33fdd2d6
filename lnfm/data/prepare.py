"""Convert raw cases (NIfTI/NRRD/DICOM) into the sharded TensorStore dataset.

Per case: read every channel and the label, check them, reorient to RAS, resample to the
target spacing (images linear, labels nearest), crop to the body, write one zarr3 array
per channel plus the label, then write the manifest record last. A case whose record
exists is finished and skipped on reruns; an interrupted case is redone from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from lnfm.config import ConfigError, load_config, parse_args_once, preset_path, read_yaml
from lnfm.data import store as st
from lnfm.data.cases import SALT_ENV, CaseSpec, assign_split, discover, drop_duplicates, hashed_id, resolve_salt
from lnfm.data.contract import (CONTRACT, CONTRACT_VERSION, CT_STORAGE, ORIENTATION, ContractError,
                                PrepareContract, contract_problem, read_contract, write_contract)
from lnfm.data.prepare_memory import case_memory_problem
from lnfm.data.geometry import (axial_diameters, body_bbox, canonical_grid, crop_affine, orientation_of,
                                resample_to_grid, resample_to_spacing, spacing_of, to_canonical)
from lnfm.data.scan_checks import (ScanError, check_ct, check_field_of_view, check_pet, check_source_spacing,
                                   check_target_spacing)
from lnfm.data.workers import map_in_workers
from lnfm.errors import LnfmError
from lnfm.io import ImageReadError, Volume, read_image
from lnfm.io.dicom import dicom_files, known_series_uids, learn_series_uids
from lnfm.io.nrrd_io import data_file_named
from lnfm.runs import model_folder_of
from lnfm.safety import check_apart
from lnfm.workdir import LOCK_FILE, WorkdirError, file_sha256, lock_folder, lock_holder, progress, setup_logging

log = logging.getLogger("lnfm.data.prepare")

# What a reason kept in failures.jsonl or the log may not hold (the FAILED console line keeps it all: the user needs
# it there). Paths: the case's own paths and their folder and file names (`private_names`), and any word with a
# slash in it.
_PATHLIKE = re.compile(r"\S*[/\\]\S*")
# A case's folder or file name this plain (one word all in lower or all in upper case letters: tmp, data, DICOM)
# or this short is replaced only where a path holds it: standing alone, it is a word of the reason ('Cannot work
# out file type', 'pixel data').
_PLAIN_NAME = re.compile(r"[a-z]+|[A-Z]+|.{1,2}")
# DICOM UIDs (SeriesInstanceUID in a series list): numbers joined by dots, four or more. Those under the
# standard's own root (transfer syntaxes, SOP classes) identify no one and stay.
_UID = re.compile(r"(?<![0-9])[0-9]+(?:\.[0-9]+){3,}")
_STANDARD_UID_ROOT = "1.2.840.10008."
# A header's text that a reader quotes: pydicom's "'Photometric Interpretation' value 'X'", "a value of 'X'",
# "Invalid value for VR DS: 'X'", Python's "could not convert string to float: 'X'".
_QUOTED_VALUE = re.compile(r"""(\bvalue(?: of)?|\bVR [A-Z]{2}:|\bstring to \w+:)\s*(['"])(?:(?!\2).)*\2""")
# Affines of two grids agree when every entry differs by less than this (mm).
GRID_TOL_MM = 1e-3
# A channel on a grid of its own (PET) must cover at least this share of the first channel's (CT's) voxels,
# or it is refused: resampled, the voxels outside it would be stored as 0, a blank PET where the CT shows
# the body. A PET/CT's PET field of view (60-80 cm across, and the beds' scan range) covers its CT: the
# whole-body pair tests/data/test_prepare.py builds from one scanner's geometry, its CT range 15 mm longer
# at each end, covers 96.7%; a lower share means a wrong origin or orientation, or another scan's PET.
MIN_CHANNEL_COVERAGE = 0.9


@dataclass
class PrepareConfig:
    """Conversion of raw cases into a TensorStore dataset."""

    spacing: tuple[float, float, float] | None = None  # target voxel size in mm (X, Y, Z); None keeps each case's
    workers: int = 2  # conversion processes; 0 or 1 converts in this process
    chunk: int = 64  # zarr inner chunk edge (voxels)
    shard: int = 128  # zarr shard edge (voxels), a multiple of chunk
    crop_body: bool = True  # crop the air margin around the body
    body_threshold_hu: float = -500.0  # voxels above this HU count as body (crop and intensity statistics)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train/val/test shares of the id hash
    split_seed: int = 0  # seed of the split hash
    salt: str = ""  # salt for hashed case ids (else the LNFM_ID_SALT environment variable)
    site: str = ""  # site for every case (else dataset.json's, the CSV column, or 'unspecified'; never a folder name)
    site_preset: str = ""  # site preset (lnfm/configs/sites/NAME.yaml) whose spacing applies when spacing is unset
    label_map: dict[int, int] = field(  # source label -> stored label, unlisted -> 0 (e.g. {2: 1} keeps HECKTOR's
        default_factory=dict)  # GTVn as node); empty keeps labels
    series: list[str] = field(default_factory=list)  # SeriesInstanceUIDs to read where a DICOM folder holds several
    resample_channels: bool = True  # resample other-grid channels (PET) linearly onto the CT grid; false rejects them


@dataclass
class PrepareResult:
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


class PrepareError(LnfmError, ValueError):
    """A prepare option that cannot work (shard numbers, output); one line."""


class CaseError(LnfmError, ValueError):
    """A case that cannot be converted: (file, reason)."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def check_config(cfg: PrepareConfig) -> None:
    """Values that would fail every case fail once, before anything is read or written."""
    if cfg.chunk < 1 or cfg.shard < 1 or cfg.shard % cfg.chunk:
        raise ConfigError(f"shard: {cfg.shard} must be a positive multiple of chunk ({cfg.chunk})")
    if len(cfg.split_fractions) != 3 or min(cfg.split_fractions) < 0 or sum(cfg.split_fractions) <= 0:
        raise ConfigError(f"split_fractions: {list(cfg.split_fractions)} must be three non-negative shares, "
                          f"not all zero")
    if not np.isfinite(cfg.body_threshold_hu):
        raise ConfigError(f"body_threshold_hu: {cfg.body_threshold_hu} is not a HU value")
    if any(not 0 <= int(k) <= 255 or not 0 <= int(v) <= 255 for k, v in cfg.label_map.items()):
        raise ConfigError(f"label_map: {cfg.label_map} maps labels outside 0..255")


def preset_spacing(name: str) -> tuple[float, float, float]:
    """The `site.spacing` of a packaged site preset or a site YAML file."""
    data = read_yaml(preset_path("sites", name)).get("site", {})
    if "spacing" not in data:
        raise ConfigError(f"site preset '{name}' has no site.spacing")
    return tuple(float(v) for v in data["spacing"])  # type: ignore[return-value]


def _canonical_resampled(vol: Volume, spacing, order: int) -> Volume:
    vol = to_canonical(vol)
    return resample_to_spacing(vol, spacing, order) if spacing is not None else vol


def preprocess_volume(vol: Volume, spacing, *, crop_body: bool = True, is_label: bool = False,
                      body_threshold_hu: float = -500.0, crop: tuple | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The preprocessing prepare applies (and `lnfm predict` applies to a new scan):
    RAS reorientation, resampling to `spacing` (linear; nearest for labels) and body crop
    (from channel 0 above `body_threshold_hu`, or the given (start, stop) `crop`).
    Returns (array, affine of the array, geometry dict for `restore_to_source`)."""
    out = _canonical_resampled(vol, spacing, 0 if is_label else 1)
    shape = out.data.shape[:3]
    if crop is not None:
        start, stop = list(crop[0]), list(crop[1])
    elif crop_body and not is_label:
        start, stop = body_bbox(out.data if out.data.ndim == 3 else out.data[..., 0], body_threshold_hu)
    else:
        start, stop = [0, 0, 0], list(shape)
    data = out.data[tuple(slice(a, b) for a, b in zip(start, stop))]
    affine = crop_affine(out.affine, start)
    geometry = {
        "source_shape": [int(s) for s in vol.data.shape[:3]],
        "source_affine": np.asarray(vol.affine).tolist(),
        "source_orientation": orientation_of(vol.affine),
        "source_spacing": list(spacing_of(vol.affine)),
        "resampled_shape": [int(s) for s in shape],
        "crop_start": [int(a) for a in start],
        "crop_stop": [int(b) for b in stop],
        "affine": affine.tolist(),
        "orientation": orientation_of(affine),
        "spacing": list(spacing_of(affine)),
        "origin": affine[:3, 3].tolist(),
        "shape": [int(s) for s in data.shape[:3]],
    }
    return data, affine, geometry


def _read3d(path: str, series: str | None = None) -> Volume:
    try:
        vol = read_image(path, series)
    except ImageReadError as e:
        raise CaseError(path, str(e).split(": ", 1)[-1]) from None
    data = vol.data
    if data.size == 0:  # a zero in the header's dim field
        raise CaseError(path, f"image has no voxels (shape {tuple(data.shape)})")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(path, f"image is {data.ndim}D with shape {tuple(vol.data.shape)}; expected a 3D volume")
    if data.dtype.kind not in "biuf":
        raise CaseError(path, f"unsupported voxel type {data.dtype}")
    return Volume(data, vol.affine)


def _grid_difference(other: Volume, ref: Volume, name: str, ref_name: str) -> str | None:
    """How `other`'s voxel centres differ from `ref`'s in the world, as a message naming them (None: the
    same grid, up to GRID_TOL_MM); axis order may differ (a LAS label on an LPS series)."""
    (ar, sr), (ao, so) = canonical_grid(ref.affine, ref.shape3), canonical_grid(other.affine, other.shape3)
    if so != sr:
        return f"{name} grid {so} differs from {ref_name} grid {sr} (shape, in RAS order)"
    corners = np.array([[*c, 1.0] for c in itertools.product(*((0, n - 1) for n in sr))]).T
    shift = float(np.max(np.linalg.norm((ar @ corners - ao @ corners)[:3], axis=0)))
    if shift <= GRID_TOL_MM and np.allclose(ar, ao, atol=GRID_TOL_MM):
        return None
    return (f"{name} voxels lie up to {shift:.3g} mm from {ref_name} voxels (same shape {sr}, but the affine "
            f"differs beyond {GRID_TOL_MM:g} mm)")


def _fov_intervals(ref_affine: np.ndarray, ref_shape, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Per line (i, j) of the reference grid, the k interval [lo, hi] of its voxel centres that lie in the
    field of view of grid (affine, shape): its voxels' extent, half a voxel beyond its outer centres. Along
    a line of reference voxels the other grid's index is linear, so each of its axes admits one interval."""
    m = np.linalg.inv(np.asarray(affine, float)) @ np.asarray(ref_affine, float)  # ref index -> other index
    nx, ny, nz = (int(n) for n in ref_shape[:3])
    i, j = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    lo, hi = np.zeros(i.shape), np.full(i.shape, nz - 1.0)  # the k interval of each (i, j) line inside
    for a in range(3):
        start, step = m[a, 0] * i + m[a, 1] * j + m[a, 3], m[a, 2]  # index along axis a at k = 0, per k
        low, high = -0.5 - 1e-6, int(shape[a]) - 0.5 + 1e-6  # a centre on the edge (1e-6 voxel) is inside
        if abs(step) < 1e-12:  # the line runs parallel to this axis's faces: wholly inside or outside
            hi = np.where((start >= low) & (start <= high), hi, -1.0)
        else:
            k1, k2 = (low - start) / step, (high - start) / step
            lo, hi = np.maximum(lo, np.minimum(k1, k2)), np.minimum(hi, np.maximum(k1, k2))
    return np.ceil(lo), np.floor(hi)


def grid_coverage(ref_affine: np.ndarray, ref_shape, affine: np.ndarray, shape) -> float:
    """Fraction of the voxel centres of grid (ref_affine, ref_shape) that lie in the field of view of grid
    (affine, shape): its voxels' extent, half a voxel beyond its outer centres. Exact for any two affines
    and cheap (`_fov_intervals`)."""
    lo, hi = _fov_intervals(ref_affine, ref_shape, affine, shape)
    inside = np.clip(hi - lo + 1, 0, None).sum()
    return float(inside) / float(np.prod([int(n) for n in ref_shape[:3]]))


def zero_outside_fov(data: np.ndarray, ref_affine: np.ndarray, affine: np.ndarray, shape) -> None:
    """Set to 0, in place, the voxels of `data` (on ref_affine) whose centres lie outside the field of view
    of grid (affine, shape), as `grid_coverage` counts them: resampling gives the first of them the edge
    value (up to one voxel out), a copy of the signal where the scan saw nothing."""
    lo, hi = _fov_intervals(ref_affine, data.shape, affine, shape)
    k = np.arange(data.shape[2])
    data[(k < lo[..., None]) | (k > hi[..., None])] = 0


def _check_label(vol: Volume, path: str, label_map: dict[int, int] | None = None) -> np.ndarray:
    data = vol.data
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise CaseError(path, "label has NaN or Inf voxels")
        if not np.all(data == np.round(data)):
            raise CaseError(path, "label has non-integer values")
    if data.min() < 0 or data.max() > 255:
        raise CaseError(path, f"label values {data.min()}..{data.max()} are outside 0..255")
    if label_map:
        lut = np.zeros(256, np.uint8)
        for src, dst in label_map.items():
            lut[int(src)] = int(dst)
        data = lut[data.astype(np.uint8)]
    if not data.any():
        raise CaseError(path, "empty label (all voxels are 0)")
    return data.astype(np.uint8)


def intensity_stats(values: np.ndarray) -> dict:
    """nnU-Net-style fingerprint of the voxels of one channel inside the body."""
    if values.size == 0:
        return {"mean": None, "std": None, "p00_5": None, "p99_5": None, "voxels": 0}
    v = values.astype(np.float64)
    p0, p1 = np.percentile(v, [0.5, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p0), "p99_5": float(p1),
            "voxels": int(v.size)}


def lymph_nodes(label: np.ndarray, spacing) -> list[dict]:
    """One entry per connected component (26-connectivity) of label > 0, in stored voxels."""
    comps, n = ndimage.label(label > 0, structure=np.ones((3, 3, 3), bool))
    voxel_mm3 = float(np.prod(spacing))
    nodes = []
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        mask = comps[box] == i
        classes = np.bincount(label[box][mask], minlength=1)
        short_mm, long_mm = axial_diameters(mask, spacing)
        offset = np.array([s.start for s in box])
        nodes.append({
            "bbox": [[int(s.start) for s in box], [int(s.stop) for s in box]],  # [start, stop)
            "centroid": (np.argwhere(mask).mean(axis=0) + offset).round(2).tolist(),
            "voxels": int(mask.sum()),
            "volume_mm3": float(mask.sum() * voxel_mm3),
            "short_axis_mm": round(short_mm, 3),
            "long_axis_mm": round(long_mm, 3),
            "class": int(np.argmax(classes)),
            "max_class": int(np.flatnonzero(classes).max()),  # the highest label value in the node
        })
    return nodes


def resolve_contract(cfg: PrepareConfig, channels: list[str]) -> PrepareContract:
    """The contract of a store prepared with `cfg` (its spacing already resolved) from cases with `channels`."""
    return PrepareContract(
        version=CONTRACT_VERSION, spacing=None if cfg.spacing is None else tuple(float(s) for s in cfg.spacing),
        orientation=ORIENTATION, crop_body=bool(cfg.crop_body), body_threshold_hu=float(cfg.body_threshold_hu),
        channels=tuple(channels), ct_storage=CT_STORAGE, label_map={int(k): int(v) for k, v in cfg.label_map.items()},
        resample_channels=bool(cfg.resample_channels))


def read_channels(paths: list[str], resample_channels: bool, series: str | None = None,
                  checks: tuple[list[str], float] | None = None, case: str = "this scan") -> Volume:
    """Channel files -> one float32 (X, Y, Z, C) volume on the first file's grid. A channel on
    another grid (PET is usually reconstructed coarser, in the same scanner frame) is resampled
    linearly onto it, or refused without `resample_channels`; one covering less than
    MIN_CHANNEL_COVERAGE of the first file's voxels is refused; one covering less than all of them is
    0 beyond its field of view, with a warning naming `case` (no path: logs keep none); one holding the
    first file's scan is refused. Prepare and predict both read here. `checks` = (channel names, body
    threshold) adds prepare's source-spacing, CT and PET checks."""
    vols = [_read3d(p, series) for p in paths]
    first = vols[0]
    for i, (p, v) in enumerate(zip(paths[1:], vols[1:]), start=1):  # the CT's file (or a copy) in the PET's place
        if v.shape3 == first.shape3 and np.allclose(v.affine, first.affine) and np.array_equal(v.data, first.data):
            raise CaseError(p, f"channel {i} holds the same scan as channel 0 ({paths[0]}): each channel needs its own "
                               f"file (the PET's, not the CT's)")
    for i, (p, v) in enumerate(zip(paths, vols)):
        if v.data.dtype.itemsize == 1:  # CT numbers span -1000..3000 HU, PET needs more than 256 levels
            raise CaseError(p, f"8-bit voxels ({v.data.dtype}) cannot hold CT numbers in HU or PET values: a label "
                               f"map, a mask or a display-windowed or clipped image")
        if checks is not None:
            try:
                check_source_spacing(spacing_of(v.affine), p)
                if i == 0:  # the grid the case keeps (predict checks the same one)
                    check_field_of_view(v.affine, v.shape3, p)
                if checks[0][i].upper() == "CT":
                    check_ct(v.data, p, checks[1])
                else:  # every other channel is normalised as PET (`lnfm.data.contract.normalize`)
                    check_pet(v.data, p)
            except ScanError as e:
                raise CaseError(p, str(e).split(": ", 1)[-1]) from None
        if v.data.dtype.kind == "f" and not np.all(np.isfinite(v.data)):
            raise CaseError(p, "image has NaN or Inf voxels")
        if v.data.dtype.itemsize > 4 and v.data.size:  # float64 or int64: refused before float32 turns them to Inf
            peak = float(np.abs(v.data).max())
            if peak > float(np.finfo(np.float32).max):
                raise CaseError(p, f"voxel values up to {peak:.3g} exceed float32's range (no CT or PET value does)")
    for i, (p, v) in enumerate(zip(paths[1:], vols[1:]), start=1):
        difference = _grid_difference(v, vols[0], "channel", "the first channel's")
        if difference is None:
            continue
        if not resample_channels:
            raise CaseError(p, difference)
        covered = grid_coverage(vols[0].affine, vols[0].shape3, v.affine, v.shape3)
        if covered < MIN_CHANNEL_COVERAGE:
            shown = np.floor(covered * 1000) / 10  # rounded down: 89.96% is not shown as the 90% it fails
            raise CaseError(p, f"channel grid covers only {shown:.1f}% of the first channel's voxels (at least "
                               f"{MIN_CHANNEL_COVERAGE:.0%} must lie inside it; resampled, the rest would be 0): a "
                               f"PET of this CT covers it, so an origin or orientation is wrong, or it is another "
                               f"scan's")
        resampled = resample_to_grid(v.data.astype(np.float32), v.affine, vols[0].affine, vols[0].shape3, 1)
        if covered < 1.0:  # beyond the field of view: 0 (no signal), as a refused PET's would be, and said
            zero_outside_fov(resampled, vols[0].affine, v.affine, v.shape3)
            shown = np.floor(covered * 1000) / 10
            log.warning("%s: channel %d%s covers only %.1f%% of the first channel's voxels; the other %.1f%% lie "
                        "outside its field of view and are set to 0 (no signal)", case, i,
                        f" ({checks[0][i]})" if checks else "", shown, 100 - shown)
        vols[i] = Volume(resampled, vols[0].affine)
    # np.stack keeps the files' memory order (NIfTI: Fortran); the geometry steps take either order,
    # and turning a 512x512x300 CT around costs 1.5 s.
    if len(vols) == 1:  # a view with a channel axis, not a stacked copy
        return Volume(vols[0].data.astype(np.float32, copy=False)[..., None], vols[0].affine)
    return Volume(np.stack([v.data.astype(np.float32) for v in vols], axis=-1), vols[0].affine)


def as_stored(data: np.ndarray, channels) -> np.ndarray:
    """float32 (X, Y, Z, C) with each CT channel rounded and clipped as its int16 storage holds it."""
    data = np.array(data, np.float32)
    for c, name in enumerate(channels):
        if name.upper() == "CT":
            ct = data[..., c]  # a view: rounded and clipped in place (no 200 MB temporaries)
            np.clip(np.round(ct, out=ct), np.float32(-32768), np.float32(32767), out=ct)
    return data


def preprocess_case(image: Volume, contract: PrepareContract, label: Volume | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The contract applied to one read case: RAS reorientation, resampling to the contract
    spacing (linear; nearest for the label), body crop, CT values as stored. Returns (image
    (X, Y, Z, C) float32, label uint8 or None, geometry record fields for `restore_to_source`).
    Prepare stores its output; predict segments it.

    The crop box comes from the image alone, never from the label: predict has no label, so
    only then does it crop a scan exactly as prepare cropped the training cases. Labelled
    voxels outside the box (annotation spilling into the air beyond the body margin) are
    dropped, and the geometry counts them in `label_voxels_outside_crop`."""
    img_rs = _canonical_resampled(image, contract.spacing, 1)
    start, stop = [0, 0, 0], list(img_rs.data.shape[:3])
    if contract.crop_body:
        start, stop = body_bbox(img_rs.data[..., 0], contract.body_threshold_hu)
    data, _, geometry = preprocess_volume(img_rs, None, crop=(start, stop))
    geometry.update(source_shape=list(image.shape3), source_affine=np.asarray(image.affine).tolist(),
                    source_orientation=orientation_of(image.affine), source_spacing=list(spacing_of(image.affine)))
    lab = None
    if label is not None:
        lab_rs = _canonical_resampled(label, contract.spacing, 0).data
        lab = lab_rs[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.uint8)
        geometry["label_voxels_outside_crop"] = int(np.count_nonzero(lab_rs)) - int(np.count_nonzero(lab))
    return as_stored(data, contract.channels), lab, geometry


def _inputs(case: CaseSpec) -> list[str]:
    """The case's inputs, images then the label; '' where it has no label, so that the label keeps its place in the
    lists kept per input (the stats, the source digest)."""
    return [*case.images, case.label or ""]


def _source_files(case: CaseSpec) -> list[list[Path]]:
    """The files of each of the case's inputs (`_inputs`): every file of a DICOM series folder."""
    return [sorted(dicom_files(Path(path))) if path and Path(path).is_dir() else [Path(path)] if path else []
            for path in _inputs(case)]


def source_fingerprint(case: CaseSpec) -> str:
    """A digest of the case's input files' bytes (every file of a DICOM series folder): a rerun into the store
    tells a case it finished from one whose image or label changed since under the same id. Not salted: the
    store holds the scan's voxels, which tell as much to someone holding the file, and a salt changed between
    runs would make every case look changed."""
    h = hashlib.sha256(b"lnfm prepare source\0")
    for files in _source_files(case):
        for f in files:
            h.update(file_sha256(f).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()[:32]


def source_stat(case: CaseSpec, stats: list[str] | None = None) -> str:
    """A digest of the case's input files' size, modification and status-change times (nanoseconds; no names;
    `stats`: `_input_stats` already taken): while it matches the record's, a rerun takes the files as unchanged
    without reading them (hashing a large collection's finished cases took as long as reading it). Any write
    changes the status-change time, which no tool sets back; a file written with its size kept on a file system
    that keeps no such time is missed."""
    h = hashlib.sha256(b"lnfm prepare source stat\0")
    for text in _input_stats(case) if stats is None else stats:
        h.update(text.encode() + b"\0")
    return "stat:" + h.hexdigest()[:32]


def _input_stats(case: CaseSpec) -> list[str]:
    """Per input (images, then the label): its files' size, modification and status-change times, one line each."""
    out = []
    for files in _source_files(case):
        lines = []
        for f in files:
            info = f.stat()
            lines.append(f"{info.st_size} {info.st_mtime_ns} {info.st_ctime_ns}\n")
        out.append("".join(lines))
    return out


def _stats_or_none(case: CaseSpec) -> list[str] | None:
    try:
        return _input_stats(case)
    except OSError:  # a file missing or unreadable: the reader names it
        return None


def source_changed(case: CaseSpec, record: dict) -> bool:
    """Whether the case's files differ from those its store record was prepared from: the same sizes and times
    (`source_stat`) are taken as the same files, else the bytes' digest decides. A source gone since, or a record
    from before digests, tells nothing: the store keeps the case."""
    recorded = record.get("source")
    if recorded is None:
        return False
    try:
        if record.get("source_stat") is not None and record["source_stat"] == source_stat(case):
            return False
        return source_fingerprint(case) != recorded
    except OSError:
        return False


def convert_case(case: CaseSpec, output: str, cfg: PrepareConfig, contract: PrepareContract) -> dict:
    """Convert one case and write its arrays; returns the manifest record (not yet written).

    The record's source digest and stat are taken before the files are read, and the stat again once the arrays
    are written: a file replaced meanwhile (a corrected label) fails the case, with no record, so that a rerun
    converts it, instead of a record that names the new file over arrays of the old one.
    A case this host cannot hold is refused from its files' headers first, none of it read (`prepare_memory`)."""
    found = case_memory_problem(case.images, case.series, contract.spacing)
    if found is not None:
        if found[2]:
            raise CaseError(found[0], found[1])
        log.warning("case %s: %s", case.case_id, found[1])
    input_stats = _stats_or_none(case)
    try:
        source = {} if input_stats is None else {"source_stat": source_stat(case, input_stats),
                                                 "source": source_fingerprint(case)}
    except OSError:  # the reader names the unreadable file below
        source = {}
    image = read_channels(case.images, cfg.resample_channels, case.series,
                          (list(case.channels), cfg.body_threshold_hu), f"case {case.case_id}")
    label = None
    if case.label:
        lab = _read3d(case.label)
        difference = _grid_difference(lab, image, "label", "the image's")
        if difference is not None:
            raise CaseError(case.label, difference)
        label = Volume(_check_label(lab, case.label, cfg.label_map), lab.affine)
    data, lab_arr, geometry = preprocess_case(image, contract, label)
    del image
    lost = geometry.get("label_voxels_outside_crop", 0)
    if lab_arr is not None and not lab_arr.any():
        raise CaseError(case.label, f"every labelled voxel ({lost}) lies outside the body crop (channel 0 above "
                                    f"{cfg.body_threshold_hu:g} HU): is the label on this image?")
    if lost:
        log.warning("case %s: %d labelled voxel(s) lie outside the body crop and are not stored (predict crops a "
                    "scan the same way, from the image alone)", case.case_id, lost)
    base = f"cases/{case.case_id}"
    image_paths, stats = [], []
    body = data[..., 0] > cfg.body_threshold_hu
    for c, name in enumerate(case.channels):
        chan = data[..., c]
        if name.upper() == "CT":
            chan = chan.astype(np.int16)  # already rounded and clipped by as_stored
        else:
            chan = chan.astype(np.float32)
        path = f"{base}/image_{c:04d}"
        st.create_array(output, path, chan, cfg.chunk, cfg.shard)
        image_paths.append(path)
        stats.append({"channel": name, **intensity_stats(chan[body])})
    nodes, label_path = [], None
    if lab_arr is not None:
        lab = lab_arr
        label_path = f"{base}/label"
        st.create_array(output, label_path, lab, cfg.chunk, cfg.shard)
        nodes = lymph_nodes(lab, geometry["spacing"])
    _check_unchanged(case, input_stats, source)
    split = case.split or assign_split(case.case_id, cfg.split_seed, tuple(cfg.split_fractions))
    return {"case_id": case.case_id, "site": case.site, "split": split, **geometry,
            "channels": list(case.channels), "image_path": image_paths, "label_path": label_path,
            "labelled": label_path is not None, "intensity": stats, "nodes": nodes,
            st.EVERY_CHUNK: True, **source}


def _check_unchanged(case: CaseSpec, stats: list[str] | None, source: dict) -> None:
    """A CaseError naming the input whose files changed since `stats` were taken (before the case was read)."""
    now = _stats_or_none(case)
    if stats is not None and now == stats and source:
        return
    inputs = _inputs(case)
    changed = [p for i, p in enumerate(inputs) if p and (stats is None or now is None or stats[i] != now[i])]
    raise CaseError((changed or inputs)[0], "changed while it was being converted; rerun prepare")


def _case_failure(case: CaseSpec, file: str, reason: str) -> dict:
    """A failed case: its id, the file the console line names, the reason, and the case's files (`inputs`: what
    the stored reason must not name)."""
    return {"case_id": case.case_id, "file": file, "reason": reason, "inputs": [p for p in _inputs(case) if p]}


def _convert_or_fail(case: CaseSpec, output: str, cfg: PrepareConfig, contract: PrepareContract
                     ) -> tuple[str, dict]:
    try:
        return "ok", convert_case(case, output, cfg, contract)
    except CaseError as e:
        return "failed", _case_failure(case, e.file, e.reason)
    except st.StoreError:  # the store cannot be written (e.g. a full disk): every case would fail, so stop
        raise
    except MemoryError:
        return "failed", _case_failure(case, case.images[0], "out of memory")
    except Exception as e:  # a bug in one case must not stop the others, but it keeps its traceback in the log
        log.exception("unexpected error converting a case (a bug, not bad input)")
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        return "failed", _case_failure(case, case.images[0], reason)


def _convert_found(item: tuple[CaseSpec, dict], output: str, cfg: PrepareConfig, contract: PrepareContract
                   ) -> tuple[str, dict]:
    """`_convert_or_fail` in a worker process, told the SeriesInstanceUIDs of its DICOM files that this process
    read to find the case (`known_series_uids`): their headers are not read a second time to find it again."""
    case, known = item
    learn_series_uids(known)
    return _convert_or_fail(case, output, cfg, contract)


def private_names(paths, listing: bool = True) -> set[str]:
    """The texts of `paths` a reason may hold: each path as given, absolute and resolved, with the files of a
    folder among them (a DICOM series; `listing`) and the data file a detached NRRD header names, and every
    folder and file name in them (but the plain ones, `_PLAIN_NAME`)."""
    forms: set[str] = set()
    for path in (os.fspath(p) for p in paths if p):
        given = {path, os.path.abspath(path), os.path.realpath(path)}
        forms |= given
        if listing and os.path.isdir(path):
            try:
                forms |= {os.path.join(g, name) for g in given for name in os.listdir(path)}
            except OSError:
                pass
        data = data_file_named(path) if listing and path.lower().endswith((".nhdr", ".nrrd")) else None
        if data:
            forms |= {data, *(os.path.join(os.path.dirname(g), data) for g in given),
                      os.path.realpath(os.path.join(os.path.dirname(path), data))}
    names = {part for form in forms for part in Path(form).parts if not _PLAIN_NAME.fullmatch(part)}
    return names | {form for form in forms if len(form) > 2 and form not in (os.sep, os.curdir, os.pardir)}


def _scrub(text: str, names=()) -> str:
    """A reason without any path in it (file and folder names may hold patient names) or DICOM identifier: every
    occurrence of `names` (`private_names`; longest first) that no letter or digit adjoins, and every word with a
    slash in it, becomes <path>; a DICOM UID <uid>; a header's text that a reader quoted <value>."""
    for name in sorted(names, key=lambda n: (-len(n), n)):
        if name in text:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", "<path>", text)
    text = _PATHLIKE.sub("<path>", text)
    text = _UID.sub(lambda m: m[0] if m[0].startswith(_STANDARD_UID_ROOT) else "<uid>", text)
    return _QUOTED_VALUE.sub(r"\1 <value>", text)


class _Scrubber:
    """`_scrub` of a failure's reason, knowing the run's paths (its input, the input's folder, every case's and
    every problem's file) and the failure's own (`inputs`, a DICOM folder's files among them)."""

    def __init__(self, paths):
        self.paths, self.names = list(paths), None

    def __call__(self, failure: dict) -> str:
        if self.names is None:  # on the first failure: a run without any reads no path
            self.names = private_names(self.paths, listing=False)
        return _scrub(failure["reason"], self.names | private_names(failure.get("inputs") or [failure["file"]]))


def stored_failure(failure: dict, salt: str, scrub=None) -> dict:
    """What failures.jsonl keeps of a failure: the case id when there is one, a hash of the file's absolute path
    salted as case ids are (under one salt the same file always gives the same ref, named relative to any folder),
    and the reason without paths, DICOM UIDs or quoted header values (`scrub`: a `_Scrubber`; by default one
    knowing the failure's own paths)."""
    scrub = scrub or _Scrubber([])
    return {"case_id": failure.get("case_id"), "ref": hashed_id(os.path.abspath(str(failure["file"])), salt),
            "reason": scrub(failure)}


def _write_failures(output: str, shard_index: int, num_shards: int, failures: list[dict], salt: str,
                    scrub: _Scrubber) -> None:
    st.write_text(output, f"failures.parts/{shard_index}-of-{num_shards}.jsonl",
                  "".join(json.dumps(stored_failure(f, salt, scrub)) + "\n" for f in failures))
    merged = []
    for i in range(num_shards):
        text = st.read_text(output, f"failures.parts/{i}-of-{num_shards}.jsonl") or ""
        merged += [line + "\n" for line in text.splitlines() if line.strip()]
    st.write_text(output, st.FAILURES, "".join(merged))


def settle_contract(output: str, cfg: PrepareConfig, cases: list[CaseSpec], source: str | None = None
                    ) -> PrepareContract | None:
    """The contract of this run, checked against the one the store records (written when new).

    A store holds one contract: a rerun with other settings (spacing, crop, channels, label
    map, ...) would mix differently prepared cases, so it is refused before anything is written.
    So is one no reader takes (`contract_problem`), naming `source`, where the cases' channel
    names came from (default: the store)."""
    kinds = sorted({tuple(c.channels) for c in cases})
    if len(kinds) > 1:
        raise ContractError(f"{output}: the input mixes cases with channels {[list(k) for k in kinds]}; a store "
                            f"holds one channel list (prepare them into separate stores)")
    if not kinds:
        return read_contract(output)
    contract = resolve_contract(cfg, list(kinds[0]))
    problem = contract_problem(contract)
    if problem:  # written, it was refused by every reader (pretrain, finetune, this prepare's rerun) only then
        raise ContractError(f"{source or output}: {problem} (lnfm reads CT, with PET as further channels)")
    # Read, compared and written under a lock every prepare of the store takes in turn: two runs into a new store
    # at once both found no contract, wrote their own and converted at their own settings.
    with lock_folder(output, f"{LOCK_FILE}.contract", enabled="://" not in output, wait=True):
        return _settle(output, contract)


def _settle(output: str, contract: PrepareContract) -> PrepareContract:
    recorded = read_contract(output)
    if recorded is None:
        if st.finished_ids(output):
            raise ContractError(f"{output}: holds cases but records no preprocessing contract ({CONTRACT}); "
                                f"prepare into a new store")
        write_contract(output, contract)
        return contract
    diff = contract.differences(recorded)
    if diff:
        raise ContractError(f"{output}: was prepared with other settings ({'; '.join(diff)}, this run != the "
                            f"store); prepare into a new store or repeat the store's settings")
    return contract


@contextlib.contextmanager
def _shard_lock(output: str, shard_index: int, num_shards: int) -> Iterator[None]:
    """Hold this shard's lock on `output`, refused while a prepare of another --num-shards holds one.

    The shards of two layouts share cases, and a case converted by two runs at once failed one of them with a
    TensorStore error; the shards of one layout (a SLURM array) run side by side. Checked and taken under the
    store-wide contract lock, so that two layouts cannot both find the other absent."""
    local = "://" not in output
    with contextlib.ExitStack() as held:
        with lock_folder(output, f"{LOCK_FILE}.contract", enabled=local, wait=True):
            for path in sorted(Path(output).glob(f"{LOCK_FILE}.shard-*-of-*")) if local else []:
                layout = path.name.rsplit("-of-", 1)[1]
                holder = lock_holder(path) if layout != str(num_shards) else None
                if holder:
                    raise WorkdirError(f"{output}: being prepared with --num-shards {layout} ({holder}); wait for "
                                       f"it to finish, or give the same --num-shards to run beside it")
            held.enter_context(lock_folder(output, f"{LOCK_FILE}.shard-{shard_index}-of-{num_shards}",
                                           enabled=local))
        yield


def check_output_folder(output: str) -> None:
    """Refuse a local --output that prepare did not make, before anything is written: an export or a
    folder inside one (its checksums.sha256 lists every file, so a store there breaks `lnfm predict` and `export
    --verify`), a pretraining or finetuning workdir, or a folder holding other files (hidden ones aside). A new or
    empty folder and a store (records, a manifest or a contract: a rerun, or a run stopped before its first case)
    are prepare's."""
    spec = st.kvstore_spec(output)
    if spec["driver"] != "file":
        return
    path = Path(spec["path"])
    found = model_folder_of(path)
    if found is not None and found[0] == "export":
        what = "is a model export" if found[1] == found[2] else f"lies inside the model export {found[1]}"
        raise PrepareError(f"{output}: {what} (its checksums.sha256 lists every file, and a store there would break "
                           f"it); choose another --output")
    if found is not None:
        kind = "finetuning" if found[0] == "finetune" else "pretraining"
        inside = "" if found[1] == found[2] else f" (in {found[1]})"
        raise PrepareError(f"{output}: is a {kind} run's workdir{inside}; prepare writes a store only into a new or "
                           f"empty folder or a store it made: choose another --output")
    if not path.is_dir() or st.is_local_store(path) or (path / CONTRACT).is_file():
        return
    found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise PrepareError(f"{output}: holds files prepare did not make ({', '.join(found[:3])}{more}) and is not a "
                           f"store; prepare writes a store only into a new or empty folder or a store it made: choose "
                           f"another --output")


def check_sites(output: str, finished: list[tuple[CaseSpec, dict]]) -> None:
    """Refuse a rerun that gives finished cases another site than their records hold (--site, the CSV column,
    dataset.json): it skipped them and kept the old site without a word, while the cases it did convert took the
    new one. The site is part of what the store tells: each record's, and the sites an export's model.json lists
    under training_data."""
    changed = [(case, record["site"]) for case, record in finished if record.get("site", case.site) != case.site]
    if changed:
        (case, old), more = changed[0], f" (and {len(changed) - 1} more case(s))" if len(changed) > 1 else ""
        raise PrepareError(f"{output}: case {case.case_id} was prepared with site '{old}', this run gives it site "
                           f"'{case.site}'{more}; a store keeps the site its cases were prepared with: prepare into a "
                           f"new --output, or repeat the site")


def check_rescans(output: str, todo: list[CaseSpec], given: set[str]) -> None:
    """Refuse a case to convert whose files are those of a case the store holds under an id this input does not
    give (`given`): ids hashed under another salt (a CSV without case_id, a DICOM folder) or files renamed added
    every scan again, one scan under two ids, in two splits (training on a validation case). Matched by the
    records' stat digest (`source_stat`: no file read), else by the bytes' (`source_fingerprint`: the new cases'
    files read once more, only into a store holding cases). Copies the input lists under two ids it gives are
    `repeated_scan`'s, as in a first run."""
    records = [r for r in st.read_records(output) if r.get("case_id") not in given] if todo else []
    by_stat = {r["source_stat"]: r["case_id"] for r in records if r.get("source_stat")}
    by_source = {r["source"]: r["case_id"] for r in records if r.get("source")}
    found = []
    for case in todo if by_source else []:
        try:
            twin = by_stat.get(source_stat(case)) or by_source.get(source_fingerprint(case))
        except OSError:  # a file missing or unreadable: the reader names it
            continue
        if twin is not None:
            found.append((case, twin))
    if found:
        (case, twin), more = found[0], f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise PrepareError(f"{case.images[0]}: is the scan of case {twin} in the store {output} (the same image and "
                           f"label files, here under the id {case.case_id}){more}: ids hashed under another salt or "
                           f"files renamed would add each scan again under a new id; repeat the store's salt "
                           f"(--salt, {SALT_ENV}) and file names, or prepare into a new --output")


def repeated_scan(case: CaseSpec, record: dict, first: dict[str, str]) -> dict | None:
    """The failure of a case just converted whose files are, byte for byte, those of a case converted before it
    (`first`: each source digest's first case, the store's then this run's as they finish; this case's noted there
    when new), else None. `drop_duplicates` finds a file listed twice; a copy of it under another name and id was
    converted twice, one scan in two splits (a training scan among the test cases)."""
    source = record.get("source")
    twin = first.setdefault(source, case.case_id) if source else case.case_id
    if twin == case.case_id:
        return None
    return _case_failure(case, case.images[0], f"case '{case.case_id}' holds a copy of the image and label files of "
                                               f"case '{twin}' (the same bytes); each scan may be prepared once")


def prepare_dataset(input: str, output: str, cfg: PrepareConfig, num_shards: int = 1, shard_index: int = 0,
                    show_progress: bool = True) -> PrepareResult:
    """Convert this shard's slice of the input cases into STORE `output`; resumable, idempotent."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise PrepareError(f"--shard-index {shard_index} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    st.check_local_store(output)
    if cfg.spacing is None and cfg.site_preset:
        cfg = dataclasses.replace(cfg, spacing=preset_spacing(cfg.site_preset))
    cfg = dataclasses.replace(cfg, spacing=check_target_spacing(cfg.spacing, "spacing"))
    check_config(cfg)
    salt = resolve_salt(cfg.salt)
    if not salt:
        log.warning("no id salt set (salt=... or %s); hashed case ids are unsalted", "LNFM_ID_SALT")
    cases, errors = discover(input, cfg.site or cfg.site_preset, salt, cfg.series)
    if not cases:  # nothing to convert: one error, and no store is created
        if not errors:
            raise PrepareError(f"{input}: no cases found (expected an nnU-Net/MSD folder with imagesTr/ or "
                               f"imagesTs/, a CSV, or a folder holding DICOM series)")
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise PrepareError(f"{errors[0].file}: {errors[0].reason}{more}")
    check_apart({"--output": output}, {"--input": [input] + [p for c in cases for p in _inputs(c) if p]})
    check_output_folder(output)
    cases, dup_errors = drop_duplicates(cases)
    errors += dup_errors
    names = Path(input) / "dataset.json"  # where an nnU-Net folder's channel names come from
    contract = settle_contract(output, cfg, cases, str(names) if names.is_file() else input)
    given = {c.case_id for c in cases}
    cases = sorted(cases, key=lambda c: c.case_id)[shard_index::num_shards]
    errors = [e for i, e in enumerate(sorted(errors, key=lambda e: e.file)) if i % num_shards == shard_index]
    result = PrepareResult()
    result.failures = [{"case_id": None, "file": e.file, "reason": e.reason, "inputs": [e.file]} for e in errors]
    scrub = _Scrubber([input, os.path.dirname(input), *(p for c in cases for p in _inputs(c) if p),
                       *(e.file for e in errors)])
    done = st.finished_ids(output)
    todo = [c for c in cases if c.case_id not in done]
    result.skipped = len(cases) - len(todo)
    finished = [(c, json.loads(st.read_text(output, f"{st.RECORDS}{c.case_id}.json") or "{}")) for c in cases
                if c.case_id in done]
    check_sites(output, finished)
    check_rescans(output, todo, given)
    for case, record in finished:  # finished: unless its files changed since
        if source_changed(case, record):
            result.skipped -= 1
            result.failures.append(_case_failure(case, case.label or case.images[0], (
                "its image or label files changed since this case was prepared into the store: "
                "the store keeps the first version; prepare into a new --output")))
    bar = progress(total=len(todo), desc="prepare", disable=not show_progress)
    first: dict[str, str] = {}  # each source digest's first case, for repeated_scan
    for record in st.read_records(output) if todo else []:
        if record.get("source"):
            first.setdefault(record["source"], record["case_id"])
    todo_ids = {c.case_id: c for c in todo}

    def finish(status: str, payload: dict) -> None:
        repeat = repeated_scan(todo_ids[payload["case_id"]], payload, first) if status == "ok" else None
        if repeat is not None:  # its arrays are written: deleted below, as a failed case's
            status, payload = "failed", repeat
        if status == "ok":
            st.write_record(output, payload)  # last: only now is the case part of the dataset
            result.converted += 1
        else:  # arrays it wrote before failing (or a killed run's) would be a case folder with no record
            st.delete_case(output, payload["case_id"])
            result.failures.append(payload)
            log.warning("failed case %s: %s", payload["case_id"], scrub(payload))
        bar.update(1)
        bar.set_postfix(ok=result.converted, failed=len(result.failures))

    with _shard_lock(output, shard_index, num_shards):
        if cfg.workers <= 1:
            for case in todo:
                finish(*_convert_or_fail(case, output, cfg, contract))
        else:  # store errors raised in a worker propagate (as in-process); a dead worker fails only its case
            found = [(c, {k: v for p in _inputs(c) if p and os.path.isdir(p) for k, v in known_series_uids(p).items()})
                     for c in todo]
            map_in_workers(_convert_found, found, (output, cfg, contract), cfg.workers, lambda item, res: finish(*res),
                           lambda item, how: finish("failed", _case_failure(item[0], item[0].images[0],
                                                                            f"the conversion process died ({how})")))
        bar.close()
        result.failed = len(result.failures)
        _write_failures(output, shard_index, num_shards, result.failures, salt, scrub)
        st.write_manifest(output)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert raw CT cases into an LNFM TensorStore dataset.")
    ap.add_argument("--input", required=True, help="nnU-Net/MSD folder, CSV (case_id,image,label,site[,pet][,split]) "
                                                   "or a folder of DICOM series")
    ap.add_argument("--output", required=True, help="store path or URL (file://, gs://, s3://)")
    ap.add_argument("--config", default=None, help="YAML file with PrepareConfig keys")
    ap.add_argument("--spacing", default=None, help="target spacing X,Y,Z in mm")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--num-shards", type=int, default=1)
    ap.add_argument("--shard-index", type=int, default=0)
    ap.add_argument("--site", default=None, help="site name written into every record")
    ap.add_argument("--site-preset", default=None, help="site preset whose spacing is used when --spacing is unset")
    ap.add_argument("--series", default=None, help="SeriesInstanceUID(s), comma-separated, to read from DICOM "
                                                   "folders that hold several series")
    ap.add_argument("--salt", default=None, help="salt for hashed case ids (default: the LNFM_ID_SALT variable)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_args_once(ap, argv)
    given = {k: getattr(args, k) for k in ("spacing", "workers", "site", "site_preset", "salt")
             if getattr(args, k) is not None}
    for item in args.overrides:  # an option and an override of one key: one of them would be ignored
        key = item.split("=", 1)[0].strip()
        if key in given:
            raise ConfigError(f"--{key.replace('_', '-')} and the override '{item}' both set {key}; give one")
    overrides = list(args.overrides) + [f"{k}={given[k]}" for k in ("spacing", "workers") if k in given]
    setup_logging()  # lnfm at INFO; libraries (orbax, absl) stay at WARNING
    cfg = load_config(PrepareConfig, args.config, overrides, kind="prepare")
    # Names and the salt as typed: read as YAML, '#secret' was a comment (the salt became the text "None"),
    # '0777' the number 511 and 'yes' true.
    cfg = dataclasses.replace(cfg, **{k: given[k] for k in ("site", "site_preset", "salt") if k in given})
    if args.series:
        cfg = dataclasses.replace(cfg, series=[s for s in args.series.split(",") if s])
    res = prepare_dataset(args.input, args.output, cfg, args.num_shards, args.shard_index)
    print(f"converted {res.converted}, skipped {res.skipped} (already done), failed {res.failed}")
    for f in res.failures:
        print(f"FAILED {f['file']}: {f['reason']}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
