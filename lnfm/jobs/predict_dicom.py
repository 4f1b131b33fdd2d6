"""`lnfm predict --format nifti|dicom-seg|rtstruct`: which outputs a case gets, where, and the
DICOM ones written onto the source series (`lnfm.io.dicom_seg`, `lnfm.io.rtstruct`).

`--output PATH` names them all: the mask PATH (.nii.gz), the DICOM-SEG PATH_STEM.seg.dcm and the
RTSTRUCT PATH_STEM.rtstruct.dcm, where PATH_STEM is PATH without .nii.gz, .nii or .dcm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lnfm import __version__
from lnfm.errors import LnfmError
from lnfm.jobs.export_meta import ExportMeta
from lnfm.jobs.predict_marks import seal_dicom
from lnfm.io import is_dicom_path
from lnfm.io.dicom_source import Provenance, SourceSeries, read_source_series
from lnfm.runs import CHECKSUMS

log = logging.getLogger("lnfm.predict")

FORMATS = ("nifti", "dicom-seg", "rtstruct")
DICOM_FORMATS = ("dicom-seg", "rtstruct")
SUFFIXES = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}
_STEMS = (".nii.gz", ".nii", ".seg.dcm", ".rtstruct.dcm", ".dcm")


class DicomOutputError(LnfmError, ValueError):
    """A DICOM output that cannot be made (no DICOM source, an unknown format); one line."""


@dataclasses.dataclass
class OutputFormats:
    formats: tuple[str, ...] = ("nifti",)
    seg_per_node: bool = False  # DICOM-SEG: one segment per node instead of per class
    rtstruct_all_nodes: bool = False  # RTSTRUCT: one more ROI holding every node
    seg_compression: str = "jpeg2000"  # or "none"
    export_sha256: str = ""  # sha256 of the export's checksums.sha256

    @property
    def dicom(self) -> bool:
        return any(f in DICOM_FORMATS for f in self.formats)


def parse_formats(values: list[str] | None) -> tuple[str, ...]:
    """--format values, each possibly comma-separated, in FORMATS order; nifti when none."""
    names = {v.strip() for value in values or ["nifti"] for v in value.split(",") if v.strip()}
    unknown = sorted(names - set(FORMATS))
    if unknown:
        raise DicomOutputError(f"--format: unknown format {unknown[0]!r} (choose from {', '.join(FORMATS)})")
    return tuple(f for f in FORMATS if f in names)


def export_digest(export_dir: str | Path) -> str:
    """One checksum for a whole export: the sha256 of its checksums.sha256 (which lists every file)."""
    return hashlib.sha256((Path(export_dir) / CHECKSUMS).read_bytes()).hexdigest()


def output_paths(output: str | Path, formats: tuple[str, ...]) -> dict[str, Path]:
    output = Path(output)
    if not output.name:  # '', '.', '/': a folder, not a file name to derive the outputs from
        raise DicomOutputError(f"{str(output)!r}: --output names no file (give a mask path such as mask.nii.gz)")
    stem = output.name
    for s in _STEMS:
        if stem.lower().endswith(s):
            stem = stem[:-len(s)]
            break
    paths = {f: output.with_name(stem + SUFFIXES[f]) for f in formats}
    if "nifti" in paths and output.name.lower().endswith((".nii", ".nii.gz")):
        paths["nifti"] = output
    return paths


def check_outside_inputs(paths: dict[str, Path], inputs: list[str]) -> None:
    """No output goes into an input series folder: it would become a slice of that series."""
    folders = {Path(p).resolve() for p in inputs if Path(p).is_dir()}
    for path in paths.values():
        if path.resolve().parent in folders:
            raise DicomOutputError(f"{path}: inside the input series folder; write outputs elsewhere")


def source_series(inputs: list[str], formats: OutputFormats, series_uid: str | None = None) -> SourceSeries | None:
    """The DICOM series the outputs go onto (the first channel; `series_uid` picks it in a folder
    holding several), or None when no DICOM format is asked."""
    if not formats.dicom:
        return None
    if not is_dicom_path(Path(inputs[0])):
        wanted = " and ".join(f for f in formats.formats if f in DICOM_FORMATS)
        raise DicomOutputError(f"{inputs[0]}: --format {wanted} needs a DICOM series as input (DICOM outputs "
                               f"reference their source); this scan is not DICOM")
    return read_source_series(inputs[0], series_uid)


def write_dicom_outputs(labels: np.ndarray, affine: np.ndarray, meta: ExportMeta, series: SourceSeries,
                        paths: dict[str, Path], formats: OutputFormats, temp: Callable[[Path], Path],
                        pending: list[tuple[Path, Path]]) -> None:
    """Write the requested DICOM outputs under temporary names, appending (temporary, final) to `pending`."""

    if not formats.export_sha256:  # a caller's bug: the outputs must identify the model
        raise RuntimeError("OutputFormats.export_sha256 is empty; set it to export_digest(export_dir)")
    # imported here: highdicom, matplotlib and scikit-image cost a second of start-up that
    # a NIfTI-only prediction need not pay
    from lnfm.io.dicom_seg import write_dicom_seg
    from lnfm.io.rtstruct import build_rtstruct, write_rtstruct

    provenance = Provenance(__version__, formats.export_sha256, f"LNFM {meta.model.arch}-{meta.model.size}")
    site = (meta.site.name if meta.site else "") or "ln"
    if "dicom-seg" in paths:
        pending.append((temp(paths["dicom-seg"]), paths["dicom-seg"]))
        write_dicom_seg(pending[-1][0], series, labels, affine, list(meta.labels or ["background", "node"]),
                        site, provenance, per_node=formats.seg_per_node, compression=formats.seg_compression)
        seal_dicom(pending[-1][0])
    if "rtstruct" in paths:
        ds = build_rtstruct(series, labels, affine, site, provenance, all_nodes=formats.rtstruct_all_nodes)
        if ds is None:
            stale = os.path.lexists(paths["rtstruct"])  # predict's own (--force checked it): it would be stale
            log.warning("no node found: no RTSTRUCT written (a structure set needs at least one ROI)%s",
                        "; the earlier run's RTSTRUCT at this output is removed with the other outputs' renames"
                        if stale else "")
            if stale:
                pending.append((None, paths["rtstruct"]))  # None: delete the final path when the outputs commit
        else:
            pending.append((temp(paths["rtstruct"]), paths["rtstruct"]))
            write_rtstruct(pending[-1][0], ds)
            seal_dicom(pending[-1][0])
