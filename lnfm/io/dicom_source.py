"""The source DICOM series of a prediction, for writing clinical outputs (DICOM-SEG, RTSTRUCT) back onto it.

`read_dicom_series` gives a `Volume` whose axis 0 runs along a row (column index), axis 1 down the
columns (row index) and axis 2 through the slices sorted along the slice normal. `SourceSeries`
holds the slice headers in that same order, so `frame(mask, k)` is the (rows, columns) pixel
matrix of source instance k. The headers carry patient, study and site attributes: the DICOM outputs
(which must belong to the source study) copy the few their IODs require, `SOURCE_PATIENT_STUDY`, and
the writers see nothing else of them (`source_reference`); no other output reads them.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from lnfm.io.dicom import select_series, slice_header, stack_geometry
from lnfm.io.volume import LPS_TO_RAS, ImageReadError

GRID_TOL_MM = 1e-2  # a prediction is on the source grid when its affine differs by less than this
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")


MANUFACTURER = "LNFM"  # Manufacturer of every DICOM output: what predict --force recognises as its own


@dataclasses.dataclass
class Provenance:
    """What made a clinical output: written into its algorithm / equipment attributes."""

    version: str  # lnfm version
    export_sha256: str  # sha256 of the export's checksums.sha256, which lists every file of the export
    model: str = "LNFM"  # model name, e.g. the architecture

    @property
    def software_version(self) -> str:
        return f"{self.version} export-sha256:{self.export_sha256[:16]}"


@dataclasses.dataclass
class SourceSeries:
    datasets: list[pydicom.Dataset]  # slice headers (no pixel data), sorted as read_dicom_series stacks them
    affine: np.ndarray  # RAS voxel -> world, as read_dicom_series computes it

    @property
    def shape(self) -> tuple[int, int, int]:
        ds = self.datasets[0]
        return int(ds.Columns), int(ds.Rows), len(self.datasets)

    def check_grid(self, shape: tuple[int, ...], affine: np.ndarray, where: str) -> None:
        """A mask must lie exactly on this series' grid (the clinical outputs reference its slices)."""
        if tuple(shape[:3]) != self.shape or not np.allclose(affine, self.affine, atol=GRID_TOL_MM):
            raise ValueError(f"{where}: the mask grid {tuple(shape[:3])} is not the source series grid {self.shape}")


# What a DICOM output copies from its source (the one allow-list of both writers): the Patient and General
# Study attributes of type 1 and 2, which the SEG and RT Structure Set IODs require and by which a PACS or a
# planning system files the output with its scan. Nothing else of the patient or the study is copied: no
# optional clinical text (medical alerts, allergies, history, diagnoses, comments, occupation), no other
# names or IDs, no age, size or weight, no physicians beyond the referring one, no study description.
# The standard lets a series leave the type 2 ones empty, and converters and anonymisers often drop them:
# the writers add them empty where missing. StudyInstanceUID (type 1) is always there (read_source_series).
SOURCE_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Whether the source was de-identified, and how: copied from a source whose PatientIdentityRemoved is YES, so
# an output made from a de-identified series says so too (the method is type 1C then). Never added empty.
SOURCE_DEIDENTIFICATION = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")
# The rest a writer reads from a source slice: the references (SOP Common, General Series, Frame of Reference),
# the slice's geometry and pixel description, the character set its names are in. No equipment attribute:
# the outputs' equipment is LNFM's, and highdicom makes the source's Manufacturer, institution, department,
# station and serial number a Contributing Equipment item when it finds them (it has no option to leave it out).
SOURCE_REFERENCE = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
                    "FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
                    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Rows",
                    "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                    "HighBit", "PixelRepresentation", "LossyImageCompression", "LossyImageCompressionRatio",
                    "LossyImageCompressionMethod")


def source_reference(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A new dataset holding only SOURCE_PATIENT_STUDY (type 2 ones empty where missing), SOURCE_DEIDENTIFICATION
    (of a source whose PatientIdentityRemoved is YES) and SOURCE_REFERENCE
    of a source slice: all a writer may copy or read, so nothing else of the source can reach an output."""
    out = pydicom.Dataset()
    deidentified = str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
    for key in (*SOURCE_PATIENT_STUDY, *(SOURCE_DEIDENTIFICATION if deidentified else ()), *SOURCE_REFERENCE):
        if key in ds:
            out[key] = copy.deepcopy(ds[key])
        elif key in SOURCE_PATIENT_STUDY:
            setattr(out, key, "")
    return out


def frame(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice k of an (X, Y, Z) array as the source instance's (rows, columns) pixel matrix."""
    return np.asarray(volume[:, :, k]).T


def read_source_series(path: str | Path, series_uid: str | None = None) -> SourceSeries:
    """Slice headers of a DICOM series folder, checked for the UIDs a derived object must reference.

    SOP Class/Instance UIDs missing from a slice's dataset are taken from its file meta header,
    which holds the same values by definition; a missing Study, Series or Frame of Reference UID
    is an error (an output could not be linked to its source)."""
    path = Path(path)
    _, files = select_series(path, series_uid)  # several series in the folder: refused, or the one chosen
    datasets = []
    for f in files:
        ds = slice_header(f)  # read when the series was found or read (and checked) first
        meta = getattr(ds, "file_meta", None) or {}
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if not ds.get(k) and meta.get(f"MediaStorage{k}")]
        if missing:
            ds = copy.deepcopy(ds)  # the shared header stays as read
            for k in missing:
                setattr(ds, k, meta.get(f"MediaStorage{k}"))
        datasets.append(ds)
    for key in _REQUIRED_UIDS:
        values = {str(ds.get(key, "") or "") for ds in datasets}
        if "" in values:
            raise ImageReadError(f"{path}: the series lacks {key} (anonymised?); DICOM outputs must reference "
                                 f"their source, write --format nifti instead")
        if key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID") and len(values) > 1:
            raise ImageReadError(f"{path}: slices differ in {key} (more than one series?)")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) < len(uids):  # every reference to a slice would resolve to whichever holds the UID
        twice = len(uids) - len(set(uids))
        raise ImageReadError(f"{path}: {twice} of its {len(uids)} slices share another slice's SOPInstanceUID (a "
                             f"faulty anonymiser?): DICOM outputs must reference each source slice, write --format "
                             f"nifti instead")
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    order, step = stack_geometry([ds.ImagePositionPatient for ds in datasets], iop, datasets[0], str(path))
    datasets = [datasets[i] for i in order]
    row_dir, col_dir = iop[:3], iop[3:]
    spacing = np.asarray(datasets[0].PixelSpacing, float)
    first = np.asarray(datasets[0].ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * spacing[1], col_dir * spacing[0], step, first
    return SourceSeries(datasets, LPS_TO_RAS @ lps)


@dataclasses.dataclass
class Node:
    box: tuple[slice, slice, slice]  # bounding box in the (X, Y, Z) grid
    mask: np.ndarray  # bool, the node's voxels inside `box`
    label: int  # its most frequent class


def find_nodes(labels: np.ndarray, affine: np.ndarray) -> list[Node]:
    """The nodes of a label map in the order of `lnfm.eval.report.node_table` (node n is row n):
    26-connected components of `labels > 0`, largest first, ties by world centroid. Each node is
    kept inside its bounding box, so a scan with many nodes never holds one full-size array per node."""
    labels = np.asarray(labels)
    comps, _ = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    keyed = []
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        mask = comps[box] == i
        idx = np.argwhere(mask) + np.array([s.start for s in box])
        centroid = (affine @ np.append(idx.mean(axis=0), 1.0))[:3]
        counts = np.bincount(labels[box][mask].astype(np.int64))
        label = int(np.argmax(counts[1:]) + 1) if counts.size > 1 else 1
        keyed.append(((-int(mask.sum()), *(float(c) for c in centroid)), Node(box, mask, label)))
    keyed.sort(key=lambda kn: kn[0])
    return [node for _, node in keyed]


def node_map(nodes: list[Node], shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z) uint16 map: n on the voxels of nodes[n - 1], 0 elsewhere."""
    out = np.zeros(shape[:3], np.uint16)
    for n, node in enumerate(nodes, start=1):
        out[node.box][node.mask] = n
    return out
