"""RT Structure Set of predicted lymph nodes on their source series (pydicom datasets).

One ROI per node, named `LN_<site>_<nn>` and numbered as in the node report, plus optionally
one ROI holding all nodes. Contours are CLOSED_PLANAR polygons in patient coordinates (LPS mm)
on the source slices, traced by marching squares (`skimage.measure.find_contours`) at level 0.5:
each vertex lies half-way between a node voxel centre and a background voxel centre, so the
polygon encloses exactly the node's voxel centres and its area is the voxel area to within the
cut corners (contours through the boundary voxel centres, as OpenCV traces them, would shrink a
node by half a voxel all round). A hole is written as its own inner contour on the same slice, the
even-odd convention treatment planning systems read (nothing of the node is cut away to make a
keyhole). Nodes are separate 26-connected components, so touching voxels of two ROIs never occur;
each ROI is traced from its own mask, never from the union.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage.measure import approximate_polygon, find_contours

from lnfm.io.dicom_seg import LYMPH_NODE, node_name, roi_colour
from lnfm.io.dicom_source import (MANUFACTURER, SOURCE_DEIDENTIFICATION, SOURCE_PATIENT_STUDY, Provenance,
                                 SourceSeries, find_nodes, frame, source_reference)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence items conventionally reference
SERIES_NUMBER = 9102


def slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a (rows, columns) mask as (n, 2) arrays of fractional (row, column)
    indices: outer boundaries and holes, without the repeated closing vertex."""
    padded = np.pad(np.asarray(mask2d, np.float32), 1)  # contours close at the image border too
    # a tolerance of 1e-6 pixel drops only vertices on a straight run: the polygon itself is unchanged
    return [approximate_polygon(c, tolerance=1e-6)[:-1] - 1.0 for c in find_contours(padded, 0.5) if len(c) > 3]


def to_patient(rc: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """(n, 2) fractional (row, column) indices of a slice -> (n, 3) patient coordinates (LPS mm)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # spacing between rows, between columns
    return (np.asarray(ds.ImagePositionPatient, float) + np.outer(rc[:, 1] * dc, iop[:3])
            + np.outer(rc[:, 0] * dr, iop[3:]))


def _image_ref(ds: pydicom.Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref


def _contour_sequence(series: SourceSeries, mask: np.ndarray, box: tuple[slice, ...]) -> Sequence:
    """Contours of `mask`, the (X, Y, Z) voxels inside `box` of the series grid."""
    seq = Sequence()
    offset = np.array([box[1].start or 0, box[0].start or 0], float)  # (row, column) of the box corner
    z0 = box[2].start or 0
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        ds = series.datasets[z0 + k]
        for rc in slice_contours(frame(mask, k)):
            item = Dataset()
            item.ContourImageSequence = Sequence([_image_ref(ds)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(rc)
            item.ContourNumber = len(seq) + 1
            item.ContourData = [round(float(v), 4) for v in to_patient(rc + offset, ds).ravel()]
            seq.append(item)
    return seq


def _base(series: SourceSeries, provenance: Provenance, site: str) -> Dataset:
    src = source_reference(series.datasets[0])  # what the structure set may copy, and nothing else
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for key in SOURCE_PATIENT_STUDY:  # Patient and General Study: the structure set belongs to the source's study
        ds[key] = src[key]
    for key in (k for k in SOURCE_DEIDENTIFICATION if k in src):  # a de-identified source's outputs say so too
        ds[key] = src[key]
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID  # Frame of Reference module: the source's
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), SERIES_NUMBER
    ds.SeriesDescription = f"LNFM lymph nodes ({site})"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, provenance.model[:64]
    ds.SoftwareVersions = provenance.software_version
    ds.DeviceSerialNumber = provenance.export_sha256[:16]
    ds.StructureSetLabel = "LNFM"
    ds.StructureSetName = f"LNFM {site}"[:64]
    ds.StructureSetDescription = "Lymph nodes segmented by LNFM (automatic; not reviewed)"
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = src.SeriesInstanceUID
    ref_series.ContourImageSequence = Sequence([_image_ref(d) for d in series.datasets])
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = STUDY_COMPONENT
    ref_study.ReferencedSOPInstanceUID = src.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = src.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = Sequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    ds.ApprovalStatus = "UNAPPROVED"  # automatic contours: a clinician reviews them before use
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = Sequence(), Sequence(), \
        Sequence()
    return ds


def _add_roi(ds: Dataset, series: SourceSeries, mask: np.ndarray, box: tuple[slice, ...], name: str,
             provenance: Provenance) -> None:
    number = len(ds.StructureSetROISequence) + 1
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = series.datasets[0].FrameOfReferenceUID
    roi.ROIName = name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"LNFM {provenance.software_version}"[:64]
    ds.StructureSetROISequence.append(roi)
    contour = Dataset()
    contour.ReferencedROINumber = number
    contour.ROIDisplayColor = roi_colour(number - 1)
    contour.ContourSequence = _contour_sequence(series, mask, box)
    ds.ROIContourSequence.append(contour)
    obs = Dataset()
    obs.ObservationNumber = number
    obs.ReferencedROINumber = number
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = LYMPH_NODE.value, LYMPH_NODE.scheme_designator, \
        LYMPH_NODE.meaning
    obs.RTROIIdentificationCodeSequence = Sequence([code])
    obs.RTROIInterpretedType = ""  # automatic contours claim no clinical role (target or organ at risk)
    obs.ROIInterpreter = ""
    ds.RTROIObservationsSequence.append(obs)


def build_rtstruct(series: SourceSeries, labels: np.ndarray, affine: np.ndarray, site: str,
                   provenance: Provenance, all_nodes: bool = False) -> Dataset | None:
    """The structure set of `labels` (X, Y, Z) on the source grid; None when no node was found
    (a structure set needs at least one ROI)."""
    series.check_grid(labels.shape, affine, "RTSTRUCT")
    nodes = find_nodes(labels, affine)
    if not nodes:
        return None
    ds = _base(series, provenance, site)
    for n, node in enumerate(nodes, start=1):
        _add_roi(ds, series, node.mask, node.box, node_name(site, n), provenance)
    if all_nodes:
        _add_roi(ds, series, np.asarray(labels) > 0, (slice(None),) * 3, f"LN_{site}_all", provenance)
    return ds


def write_rtstruct(path: str | Path, ds: Dataset) -> None:
    ds.save_as(str(path), enforce_file_format=True)
