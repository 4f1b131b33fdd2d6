"""DICOM-SEG and RTSTRUCT written onto their source series and read back with independent code:
highdicom for the SEG, pydicom + highdicom's patient->image transform + skimage's polygon fill
(even-odd) for the RTSTRUCT, rt-utils' own reader, and dciodvfy (dicom3tools) when installed.
The expected masks are placed by each source file's own ImagePositionPatient, not by the writers'
slice ordering."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dicom_phantoms import (PATIENT_ID, PATIENT_NAME, REAL_SERIES, add_canaries, assert_no_canaries, expected_frame,
                            rasterise_rtstruct, read_sources, restored_real_series, seg_frames, slice_index,
                            write_series)

from lnfm.io import ImageReadError, read_image
from lnfm.io.dicom_seg import write_dicom_seg
from lnfm.io.dicom_source import Provenance, find_nodes, node_map, read_source_series
from lnfm.io.rtstruct import build_rtstruct, write_rtstruct

PROV = Provenance("0.1.0", "0123456789abcdef" * 4, "vit-tiny")
SITE = "pelvis"


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _oblique():
    """Rows along a direction rotated 25 deg about z and tilted; columns orthogonal to it."""
    row = _unit([np.cos(0.44), np.sin(0.44), 0.15])
    col = _unit(np.cross(_unit([0.1, -0.2, 1.0]), row))
    return row, col


GEOMETRIES = {  # name: (row_dir, col_dir, spacing (between rows, between columns), slice step sign)
    "oblique": (*_oblique(), (0.8, 1.1), 1.0),
    "flipped": ([-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], (0.9, 0.7), -1.0),  # feet-first-like, slices run down
    "coronal": ([1.0, 0.0, 0.0], [0.0, 0.0, -1.0], (1.0, 1.0), 1.0),
}


def _phantom_labels(shape) -> np.ndarray:
    """Class-1 and class-2 nodes: a ball, a hollow ball (a hole on its middle slices), two balls one
    voxel apart in the same slices, and a node touching the ball only through a voxel corner."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    lab = np.zeros(shape, np.uint8)
    ball = lambda c, r: (x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 1.5) ** 2 <= r * r
    lab[ball((12, 12, 5), 5)] = 1
    lab[ball((34, 12, 5), 7) & ~ball((34, 12, 5), 3)] = 1  # hollow
    lab[ball((12, 30, 5), 3.5)] = 2
    lab[ball((20, 30, 5), 3.5) & (x >= 17)] = 2  # a 1-voxel gap from the previous one
    lab[36:39, 30:33, 3:6] = 1
    lab[39:41, 33:35, 6:8] = 1  # touches the block above through a voxel corner only: the same node
    return lab


def _hu(shape) -> np.ndarray:
    return (np.random.default_rng(0).normal(30, 20, shape)).astype(np.int16)


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def phantom(request, tmp_path_factory):
    row, col, spacing, sign = GEOMETRIES[request.param]
    shape = (48, 40, 11)
    normal = np.cross(row, col)
    folder = tmp_path_factory.mktemp(request.param) / "series"
    write_series(folder, _hu(shape), row, col, spacing, sign * 2.5 * normal, [-30.0, 12.0, 80.0])
    vol = read_image(folder)
    # read_dicom_series sorts slices along the normal: the phantom's labels follow that order
    labels = _phantom_labels(shape) if sign > 0 else _phantom_labels(shape)[:, :, ::-1]
    return folder, vol, np.ascontiguousarray(labels)


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _check_rtstruct(path, sources, vol, labels, all_nodes: bool):
    found = find_nodes(labels, vol.affine)
    nodes = node_map(found, vol.shape3)
    masks = rasterise_rtstruct(path, sources, vol.affine, vol.shape3)
    expected = [f"LN_{SITE}_{n:02d}" for n in range(1, len(found) + 1)] + ([f"LN_{SITE}_all"] if all_nodes else [])
    assert list(masks) == expected
    for n in range(1, len(found) + 1):
        got, want = masks[f"LN_{SITE}_{n:02d}"], nodes == n
        assert _dice(got, want) >= 0.95
        assert np.abs(np.subtract(ndimage.center_of_mass(got), ndimage.center_of_mass(want))).max() <= 1.0
        assert np.array_equal(got, want)  # the 0.5 iso-contour encloses exactly the node's voxel centres
    comps, count = ndimage.label(labels > 0, np.ones((3, 3, 3), bool))  # independent of find_nodes
    sizes = [int(masks[f"LN_{SITE}_{n:02d}"].sum()) for n in range(1, count + 1)]
    assert len(found) == count and sizes == sorted(sizes, reverse=True)
    assert sorted(sizes) == sorted(np.bincount(comps.ravel())[1:].tolist())
    if all_nodes:
        assert np.array_equal(masks[f"LN_{SITE}_all"], labels > 0)


def test_phantom_seg_equals_mask(phantom, tmp_path):
    folder, vol, labels = phantom
    sources = read_sources(folder)
    path = tmp_path / "seg.dcm"
    write_dicom_seg(path, read_source_series(folder), labels, vol.affine, ["background", "node", "station"], SITE,
                    PROV)
    frames = seg_frames(path, sources)
    for uid, ds in sources.items():
        assert np.array_equal(frames[uid], expected_frame(labels, ds, vol.affine)), uid
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["node", "station"]
    for s in seg.SegmentSequence:
        code = s.SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("59441001", "SCT")
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "LNFM" and PROV.export_sha256[:16] in algo.AlgorithmVersion
        assert PROV.export_sha256 in str(algo.AlgorithmParameters)
    src = next(iter(sources.values()))
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (str(seg.PatientName), seg.PatientID) == (PATIENT_NAME, PATIENT_ID)
    for f in seg.PerFrameFunctionalGroupsSequence:  # each frame names its source instance and lies on it
        ref = sources[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(f.PlanePositionSequence[0].ImagePositionPatient, ref.ImagePositionPatient, atol=1e-3)


def test_phantom_seg_per_node(phantom, tmp_path):
    folder, vol, labels = phantom
    sources = read_sources(folder)
    path = tmp_path / "seg_nodes.dcm"
    write_dicom_seg(path, read_source_series(folder), labels, vol.affine, ["background", "node", "station"], SITE,
                    PROV, per_node=True)
    comps, count = ndimage.label(labels > 0, np.ones((3, 3, 3), bool))
    assert count == 5  # the corner-touching block is one node with its neighbour
    got = np.zeros(labels.shape, np.int64)
    frames = seg_frames(path, sources)
    for uid, ds in sources.items():
        got[:, :, slice_index(ds, vol.affine)] = frames[uid].T
    sizes = [int((got == n).sum()) for n in range(1, count + 1)]
    assert sizes == sorted(sizes, reverse=True)  # numbered largest first, as in the report
    for n in range(1, count + 1):  # each segment is exactly one connected component
        assert len(np.unique(comps[got == n])) == 1 and (comps == comps[got == n][0]).sum() == sizes[n - 1]
    segments = pydicom.dcmread(path).SegmentSequence
    assert [s.SegmentLabel for s in segments] == [f"LN_{SITE}_{n:02d}" for n in range(1, 6)]
    rt = build_rtstruct(read_source_series(folder), labels, vol.affine, SITE, PROV)
    for s, roi in zip(segments, rt.ROIContourSequence):  # node n has one colour in both objects
        lab = hd.color.CIELabColor(*(v / 65535 * r - o for v, r, o in zip(s.RecommendedDisplayCIELabValue,
                                                                          (100, 255, 255), (0, 128, 128))))
        assert np.abs(np.subtract(lab.to_rgb(), roi.ROIDisplayColor)).max() <= 2


def test_phantom_rtstruct_round_trip(phantom, tmp_path):
    folder, vol, labels = phantom
    path = tmp_path / "rt.dcm"
    write_rtstruct(path, build_rtstruct(read_source_series(folder), labels, vol.affine, SITE, PROV, all_nodes=True))
    _check_rtstruct(path, read_sources(folder), vol, labels, all_nodes=True)
    rt = pydicom.dcmread(path)
    colours = [tuple(r.ROIDisplayColor) for r in rt.ROIContourSequence]
    assert len(set(colours)) == len(colours)
    hollow = [r for r in rt.ROIContourSequence if r.ReferencedROINumber == 1][0]  # the largest node: hollow
    slices = [c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in hollow.ContourSequence]
    assert max(slices.count(u) for u in set(slices)) == 2  # outer contour and hole on the middle slices


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real series (UIDs restored) and a mask on its grid from the organ labels shipped with it:
    small organs stand in for nodes (real, irregular shapes)."""
    if not REAL_SERIES.is_dir():
        pytest.skip("../shared/data is absent")
    folder = restored_real_series(tmp_path_factory.mktemp("real") / "series")
    vol = read_image(folder)
    seg = nib.load(REAL_SERIES.parent / "example_seg_dicom.nii.gz")
    # The NIfTI labels share the grid up to axis flips: look each voxel centre up through the affines.
    ijk = np.indices(vol.shape3).reshape(3, -1)
    src = np.linalg.solve(seg.affine, vol.affine @ np.vstack([ijk, np.ones((1, ijk.shape[1]))]))[:3]
    assert np.allclose(src, np.round(src), atol=1e-3)
    organs = np.asarray(seg.dataobj)[tuple(np.round(src).astype(int))].reshape(vol.shape3)
    present = [v for v in np.unique(organs) if v]
    sizes = {v: int((organs == v).sum()) for v in present}
    small = sorted(present, key=sizes.get)[:4]
    labels = np.isin(organs, small).astype(np.uint8)
    assert labels.any()
    return folder, vol, labels


def test_real_series_round_trip(real, tmp_path):
    folder, vol, labels = real
    sources = read_sources(folder)
    series = read_source_series(folder)
    seg_path, rt_path = tmp_path / "seg.dcm", tmp_path / "rt.dcm"
    write_dicom_seg(seg_path, series, labels, vol.affine, ["background", "lymph_node"], SITE, PROV)
    frames = seg_frames(seg_path, sources)
    for uid, ds in sources.items():
        assert np.array_equal(frames[uid], expected_frame(labels, ds, vol.affine))
    assert pydicom.dcmread(seg_path).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    write_rtstruct(rt_path, build_rtstruct(series, labels, vol.affine, SITE, PROV))
    _check_rtstruct(rt_path, sources, vol, labels, all_nodes=False)


def test_real_series_rt_utils_reads_it(real, tmp_path):
    """rt-utils' reader finds every ROI; it fills polygons with their boundary pixels after rounding
    the vertices to pixel centres, so it gives each node back grown by at most one pixel in-plane
    (its own writer traces boundary pixel centres instead, which point-in-polygon readers shrink)."""
    rt_utils = pytest.importorskip("rt_utils")
    folder, vol, labels = real
    path = tmp_path / "rt.dcm"
    write_rtstruct(path, build_rtstruct(read_source_series(folder), labels, vol.affine, SITE, PROV))
    rt = rt_utils.RTStructBuilder.create_from(str(folder), str(path))
    found = find_nodes(labels, vol.affine)
    nodes = node_map(found, vol.shape3)
    for n in range(1, len(found) + 1):
        # (rows, columns, slices), slices ascending along the normal as read_dicom_series stacks them
        got = np.transpose(rt.get_roi_mask_by_name(f"LN_{SITE}_{n:02d}"), (1, 0, 2))
        want = nodes == n
        assert np.array_equal(got & want, want)
        assert not (got & ~ndimage.binary_dilation(want, np.ones((3, 3, 1), bool))).any()
        assert np.abs(np.subtract(ndimage.center_of_mass(got), ndimage.center_of_mass(want))).max() <= 1.0


@pytest.fixture(scope="module")
def canaries(real, tmp_path_factory):
    """The real series with a value to trace in each optional patient, study, series and equipment attribute
    (clinical free text, other names and IDs, physicians, the site and its scanner), its source datasets, and
    its series as the writers read it."""
    source = restored_real_series(tmp_path_factory.mktemp("canaries") / "series")
    add_canaries(source)
    return read_sources(source), read_source_series(source)


def _copies_only_references(path, sources):
    """No canary in the output at any level or anywhere in its bytes; the patient and study attributes the IOD
    requires equal the source's; the equipment is LNFM's."""
    src = next(iter(sources.values()))
    assert_no_canaries(path)
    ds = pydicom.dcmread(path)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        assert ds[key].value == src[key].value, key
    assert (ds.Manufacturer, ds.SoftwareVersions) == ("LNFM", PROV.software_version)
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    return ds, src


def test_seg_copies_only_the_references_the_standard_requires(real, canaries, tmp_path):
    """highdicom copies every Patient and Study module attribute of its source images, and makes the scanner's
    manufacturer, institution, address, department, station and serial number a Contributing Equipment item:
    the SEG carried them all. Now only highdicom itself is contributing equipment."""
    _, vol, labels = real
    sources, series = canaries
    path = tmp_path / "seg.dcm"
    write_dicom_seg(path, series, labels, vol.affine, ["background", "lymph_node"], SITE, PROV, per_node=True)
    seg, src = _copies_only_references(path, sources)
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} == set(sources)
    derived = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
               for f in seg.PerFrameFunctionalGroupsSequence}
    assert derived and derived <= set(sources)
    assert [e.ManufacturerModelName for e in seg.ContributingEquipmentSequence] == ["highdicom"]
    frames = seg_frames(path, sources)  # the frames still lie on their slices
    found = find_nodes(labels, vol.affine)
    nodes = node_map(found, vol.shape3)
    for uid, ds in sources.items():
        assert np.array_equal(frames[uid], expected_frame(nodes, ds, vol.affine))


def test_rtstruct_copies_only_the_references_the_standard_requires(real, canaries, tmp_path):
    """The structure set copied the source's patient age, size and weight, other patient IDs, issuer, study
    description and de-identification method besides the required references."""
    _, vol, labels = real
    sources, series = canaries
    path = tmp_path / "rt.dcm"
    write_rtstruct(path, build_rtstruct(series, labels, vol.affine, SITE, PROV))
    rt, src = _copies_only_references(path, sources)
    (frame_ref,) = rt.ReferencedFrameOfReferenceSequence
    assert frame_ref.FrameOfReferenceUID == src.FrameOfReferenceUID
    (study_ref,) = frame_ref.RTReferencedStudySequence
    (series_ref,) = study_ref.RTReferencedSeriesSequence
    assert (study_ref.ReferencedSOPInstanceUID, series_ref.SeriesInstanceUID) == (src.StudyInstanceUID,
                                                                                 src.SeriesInstanceUID)
    assert {r.ReferencedSOPInstanceUID for r in series_ref.ContourImageSequence} == set(sources)
    _check_rtstruct(path, sources, vol, labels, all_nodes=False)  # the contours still lie on their slices


def test_anonymised_series_without_uids_is_refused():
    if not REAL_SERIES.is_dir():
        pytest.skip("../shared/data is absent")
    with pytest.raises(ImageReadError, match="lacks StudyInstanceUID"):
        read_source_series(REAL_SERIES)


def test_no_nodes(phantom, tmp_path):
    folder, vol, labels = phantom
    series = read_source_series(folder)
    assert build_rtstruct(series, np.zeros_like(labels), vol.affine, SITE, PROV) is None
    path = tmp_path / "empty.dcm"
    write_dicom_seg(path, series, np.zeros_like(labels), vol.affine, ["background", "node"], SITE, PROV)
    frames = seg_frames(path, read_sources(folder))
    assert not any(f.any() for f in frames.values())


def test_wrong_grid_is_refused(phantom):
    folder, vol, labels = phantom
    with pytest.raises(ValueError, match="not the source series grid"):
        build_rtstruct(read_source_series(folder), labels[:, :, 1:], vol.affine, SITE, PROV)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_finds_no_error(real, phantom, tmp_path):
    """dicom3tools' IOD checker on each kind of output, real series and phantom; CI machines
    without dicom3tools skip this (the highdicom/pydicom read-backs above still run)."""
    outputs = []
    for n, (folder, vol, labels) in enumerate((real, phantom)):
        series = read_source_series(folder)
        for per_node, compression in ((True, "jpeg2000"), (False, "none")):
            outputs.append(tmp_path / f"seg{n}_{per_node}_{compression}.dcm")
            write_dicom_seg(outputs[-1], series, labels, vol.affine, ["background", "node", "station"], SITE, PROV,
                            per_node=per_node, compression=compression)
        outputs.append(tmp_path / f"rt{n}.dcm")
        write_rtstruct(outputs[-1], build_rtstruct(series, labels, vol.affine, SITE, PROV, all_nodes=True))
    for path in outputs:
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        report = res.stdout + res.stderr
        assert "Error" not in report, (path.name, report)


def test_sop_uids_missing_from_the_dataset_come_from_the_file_meta(phantom, tmp_path):
    folder, vol, labels = phantom
    copy = tmp_path / "series"
    copy.mkdir()
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        del ds.SOPInstanceUID
        ds.save_as(copy / f.name)
    series = read_source_series(copy)
    assert [d.SOPInstanceUID for d in series.datasets] == [
        d.file_meta.MediaStorageSOPInstanceUID for d in series.datasets]
    assert np.allclose(series.affine, vol.affine)


def test_outputs_of_a_de_identified_series_say_so(real, tmp_path):
    """A series whose PatientIdentityRemoved is YES: both outputs carry it and its method (type 1C then), as
    the source does; a source that says NO passes neither (the canary tests above)."""
    _, vol, labels = real
    source = restored_real_series(tmp_path / "series")
    for f in source.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "pseudonymised at the archive"
        ds.save_as(f)
    series = read_source_series(source)
    write_dicom_seg(tmp_path / "seg.dcm", series, labels, vol.affine, ["background", "lymph_node"], SITE, PROV)
    write_rtstruct(tmp_path / "rt.dcm", build_rtstruct(series, labels, vol.affine, SITE, PROV))
    for path in (tmp_path / "seg.dcm", tmp_path / "rt.dcm"):
        ds = pydicom.dcmread(path)
        assert (ds.PatientIdentityRemoved, ds.DeidentificationMethod) == ("YES", "pseudonymised at the archive")
