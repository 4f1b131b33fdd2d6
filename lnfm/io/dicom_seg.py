"""DICOM-SEG of a predicted label map on its source series, written by highdicom.

Binary segmentation, one segment per foreground class (or per node), coded SCT 59441001
"Structure of lymph node"; frames reference their source instances; JPEG 2000 Lossless by default
(uncompressed for frames under 32 pixels, which the codec does not take).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from pydicom.sr.coding import Code
from pydicom.uid import JPEG2000Lossless, generate_uid

from lnfm.io.dicom_source import (MANUFACTURER, Provenance, SourceSeries, find_nodes, frame, node_map,
                                 source_reference)

LYMPH_NODE = Code("59441001", "SCT", "Structure of lymph node")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical structure")
SERIES_NUMBER = 9101  # a fixed, recognisable number, away from a scanner's usual 1-100
COMPRESSION = {"jpeg2000": JPEG2000Lossless, "none": hd.UID("1.2.840.10008.1.2.1")}  # Explicit VR Little Endian


def node_name(site: str, node: int) -> str:
    return f"LN_{site}_{node:02d}"


def roi_colour(index: int) -> list[int]:
    """RGB of the index-th segment or ROI (0-based): the same in the DICOM-SEG and the RTSTRUCT."""
    rgb = colormaps["tab20"](index % 20)[:3]
    return [int(round(255 * v)) for v in rgb]


def _segment(number: int, label: str, provenance: Provenance) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="LNFM", family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"),
        version=provenance.software_version, parameters={"export_sha256": provenance.export_sha256,
                                                         "model": provenance.model})
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label[:64], segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=LYMPH_NODE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=generate_uid(), tracking_id=label[:64],
        display_color=hd.color.CIELabColor.from_rgb(*roi_colour(number - 1)))


def build_dicom_seg(series: SourceSeries, labels: np.ndarray, affine: np.ndarray, label_names: list[str],
                    site: str, provenance: Provenance, per_node: bool = False,
                    compression: str = "jpeg2000") -> hd.seg.Segmentation:
    """`labels` (X, Y, Z) on the source grid: 0 background, c the c-th name of `label_names`.

    One segment per foreground class, or with `per_node` one per node (named and numbered as in
    the node report)."""
    series.check_grid(labels.shape, affine, "DICOM-SEG")
    labels = np.asarray(labels)
    if per_node:
        nodes = find_nodes(labels, affine)
        segmap = node_map(nodes, labels.shape)
        names = [node_name(site, n) for n in range(1, len(nodes) + 1)]
    else:
        segmap = labels
        names = [str(n) for n in label_names[1:]] or ["lymph_node"]
    if not names:  # per node, nothing found: one empty segment keeps the object valid and says so
        names = [f"LN_{site}_none"]
    if min(segmap.shape[:2]) < 32:  # openjpeg encodes no smaller frame
        compression = "none"
    # (slices, rows, columns) segment numbers: highdicom splits a label map into binary segment frames
    pixels = np.ascontiguousarray(np.stack([frame(segmap, k) for k in range(segmap.shape[2])]), np.uint16)
    return hd.seg.Segmentation(
        source_images=_source_headers(series), pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(i, name, provenance) for i, name in enumerate(names, start=1)],
        series_instance_uid=generate_uid(), series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=provenance.model[:64],
        software_versions=provenance.software_version, device_serial_number=provenance.export_sha256[:16],
        transfer_syntax_uid=COMPRESSION[compression], omit_empty_frames=bool(pixels.any()),
        series_description=f"LNFM lymph nodes ({site})"[:64], content_label="LNFM",
        content_description="Lymph nodes segmented by LNFM (automatic; not reviewed)")


def _source_headers(series: SourceSeries) -> list:
    """The source slice headers as highdicom is given them: `source_reference` copies, so highdicom, which
    copies every Patient and Study module attribute it finds and the source's equipment and site into a
    Contributing Equipment item, finds only what the SEG must copy and the references and geometry it reads
    (a missing type 2 attribute empty, as the standard allows: highdicom raised an AttributeError after the
    prediction), and a missing SliceThickness the series' slice spacing (the SEG's pixel measures need one)."""
    spacing = float(np.linalg.norm(series.affine[:3, 2]))
    out = []
    for ds in series.datasets:
        ds = source_reference(ds)
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = round(spacing, 6)
        out.append(ds)
    return out


def write_dicom_seg(path: str | Path, *args, **kwargs) -> None:
    """`build_dicom_seg(*args, **kwargs)` saved as a Part-10 file at `path`."""
    build_dicom_seg(*args, **kwargs).save_as(str(path))
