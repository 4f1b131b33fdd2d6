"""RTSTRUCT contours: lnfm's writer (marching squares at 0.5, `lnfm.io.rtstruct`) vs rt-utils
(OpenCV contours through boundary pixel centres), side by side on the same nodes in one run.

Nodes: real lymph-node masks (ULS23 re-annotation of TCIA CT Lymph Nodes, ../shared/data/ln_masks)
resampled (nearest) onto the real CT series in ../shared/data (0.98 x 0.98 x 2 mm, 512 x 512 x 20)
and pasted at separate places. Each structure set is read back two ways:
- "centre-in-polygon": a voxel belongs to the ROI when its centre lies inside the slice's polygons
  (even-odd rule), the way a planning system voxelises a contour (skimage.draw.polygon2mask);
- rt-utils' reader (OpenCV fillPoly after rounding vertices to pixels; includes boundary pixels).
Also the ROI volume a planning system computes from the polygon areas (shoelace x slice spacing).

    python bench/rtstruct.py [--nodes 12]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy import ndimage
from skimage.draw import polygon2mask

from lnfm.io import read_image
from lnfm.io.dicom_source import Provenance, find_nodes, node_map, read_source_series
from lnfm.io.rtstruct import build_rtstruct, write_rtstruct

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SERIES = DATA / "ct" / "totalsegmentator" / "example_ct_dicom"


def series_with_uids(folder: Path) -> Path:
    """The real series with the Study/Series/SOP Instance UIDs its anonymisation blanked filled in."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for n, f in enumerate(sorted(SERIES.iterdir())):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, \
            ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / f"{n:03d}.dcm")
    return folder


def node_masks(vol, count: int) -> np.ndarray:
    """Label map of `count` real node masks resampled onto `vol`'s grid, on a 4 x 3 layout."""
    labels = np.zeros(vol.shape3, np.uint8)
    zips = sorted((DATA / "ln_masks" / "NIH_LN_ABD").glob("*.zip"))[:count]
    spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
    for n, zf in enumerate(zips):
        with zipfile.ZipFile(zf) as z, tempfile.TemporaryDirectory() as tmp:
            name = z.namelist()[0]
            z.extract(name, tmp)
            img = nib.load(Path(tmp) / name)
            mask = np.asarray(img.dataobj).reshape(img.shape[:3]) > 0.5
            src_spacing = np.asarray(img.header.get_zooms()[:3], float)
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        mask = ndimage.zoom(mask[box].astype(np.uint8), src_spacing / spacing, order=0).astype(bool)
        cx, cy = 60 + 100 * (n % 4), 80 + 120 * (n // 4)
        sx, sy, sz = (min(a, b) for a, b in zip(mask.shape, (90, 110, vol.shape3[2])))
        z0 = (vol.shape3[2] - sz) // 2
        region = labels[cx:cx + sx, cy:cy + sy, z0:z0 + sz]
        region[mask[:sx, :sy, :sz]] = 1
    return labels


def centre_in_polygon(path: Path, sources: dict, vol) -> dict[str, np.ndarray]:
    rt = pydicom.dcmread(path)
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    out = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(vol.shape3, bool)
        for c in roi.ContourSequence:
            src = sources[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
            tf = hd.spatial.ReferenceToImageTransformer(src.ImagePositionPatient, src.ImageOrientationPatient,
                                                        src.PixelSpacing)
            img = tf(np.asarray(c.ContourData, float).reshape(-1, 3))
            k = int(round(np.linalg.solve(vol.affine, np.append(
                [-src.ImagePositionPatient[0], -src.ImagePositionPatient[1], src.ImagePositionPatient[2]], 1))[2]))
            mask[:, :, k] ^= polygon2mask((int(src.Rows), int(src.Columns)), img[:, [1, 0]] - 0.5).T
        out[names[roi.ReferencedROINumber]] = mask
    return out


def polygon_volume_ml(path: Path, vol) -> dict[str, float]:
    """ROI volume from its polygons: |sum of signed shoelace areas| per slice x slice spacing."""
    rt = pydicom.dcmread(path)
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    dz = float(np.linalg.norm(vol.affine[:3, 2]))
    out = {}
    for roi in rt.ROIContourSequence:
        per_slice: dict[str, float] = {}
        for c in roi.ContourSequence:
            p = np.asarray(c.ContourData, float).reshape(-1, 3)[:, :2]  # axial slices: x, y in mm
            area = 0.5 * float(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))
            uid = c.ContourImageSequence[0].ReferencedSOPInstanceUID
            per_slice[uid] = per_slice.get(uid, 0.0) + area
        out[names[roi.ReferencedROINumber]] = sum(abs(a) for a in per_slice.values()) * dz / 1000.0
    return out


def dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=12)
    args = ap.parse_args()
    from rt_utils import RTStructBuilder

    tmp = Path(tempfile.mkdtemp())
    try:
        folder = series_with_uids(tmp / "series")
        vol = read_image(folder)
        found = find_nodes(node_masks(vol, args.nodes), vol.affine)
        nodes = node_map(found, vol.shape3)
        names = [f"LN_bench_{n:02d}" for n in range(1, len(found) + 1)]
        voxel_ml = abs(np.linalg.det(vol.affine[:3, :3])) / 1000.0
        sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                                                    for f in sorted(folder.iterdir()))}
        t0 = time.perf_counter()
        ds = build_rtstruct(read_source_series(folder), nodes, vol.affine, "bench", Provenance("bench", "0" * 64))
        write_rtstruct(tmp / "lnfm.dcm", ds)
        t_lnfm = time.perf_counter() - t0
        t0 = time.perf_counter()
        rt = RTStructBuilder.create_new(str(folder))
        for n, name in enumerate(names, start=1):  # rt-utils masks are (rows, columns, slices)
            rt.add_roi(mask=np.ascontiguousarray(np.transpose(nodes == n, (1, 0, 2))), name=name)
        rt.save(str(tmp / "rtutils.dcm"))
        t_rtutils = time.perf_counter() - t0
        print(f"machine: {platform.processor() or platform.machine()}, {len(found)} nodes, "
              f"median {np.median([(nodes == n).sum() for n in range(1, len(found) + 1)]) * voxel_ml:.2f} ml")
        print("| writer | reader | Dice mean | Dice min | voxel volume / true | polygon volume / true | write s |")
        print("|---|---|---|---|---|---|---|")
        for label, path, secs in (("lnfm", tmp / "lnfm.dcm", t_lnfm), ("rt-utils 1.2.7", tmp / "rtutils.dcm",
                                                                        t_rtutils)):
            poly = polygon_volume_ml(path, vol)
            readers = {"centre-in-polygon": centre_in_polygon(path, sources, vol)}
            back = RTStructBuilder.create_from(str(folder), str(path))
            readers["rt-utils reader"] = {n: np.transpose(back.get_roi_mask_by_name(n), (1, 0, 2)) for n in names}
            for reader, masks in readers.items():
                d = [dice(masks[name], nodes == n) for n, name in enumerate(names, start=1)]
                v = [masks[name].sum() / (nodes == n).sum() for n, name in enumerate(names, start=1)]
                pv = [poly[name] / ((nodes == n).sum() * voxel_ml) for n, name in enumerate(names, start=1)]
                print(f"| {label} | {reader} | {np.mean(d):.3f} | {np.min(d):.3f} | {np.mean(v):.3f} | "
                      f"{np.mean(pv):.3f} | {secs:.2f} |")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
