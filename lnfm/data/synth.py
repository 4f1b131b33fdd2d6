"""Synthetic lymph-node CT phantoms (optionally PET/CT) in the nnU-Net raw layout.

A case is built on a RAS grid in a site frame (anatomy from `synth_anatomy`, nodes from
`synth_nodes`), turned into HU with tissue texture, partial-volume blur and scanner noise,
then stored in a randomly chosen orientation (RAS, LPS, LAS, permuted axes ...) with a
random origin: the array is flipped/permuted together with its affine, so the anatomy in
world space is unchanged. Case i depends only on (site, seed, i).

Two generator variants: "train" (the default, what every training set draws from) and
"heldout" (`heldout_config`), for benchmarks on phantoms no model has seen. The held-out
variant has its own voxel spacings, stored orientations, noise levels, scanner HU
calibration, real node masks (a pool training never uses) and placement of the
vessel-like distractors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from lnfm.config import ConfigError, parse_args_once, to_dict
from lnfm.data import synth_anatomy as A
from lnfm.data.geometry import axial_diameters
from lnfm.data.synth_nodes import REAL_SET, node_shape, real_mask_files
from lnfm.io.nifti import write_nifti
from lnfm.safety import check_apart
from lnfm.workdir import atomic_write_text, file_sha256, recorded_digests, temp_file

SITES: tuple[str, ...] = ("head_neck", "axilla", "mediastinum", "abdomen", "pelvis")

# Mean HU (non-contrast, contrast-enhanced) and texture amplitude per tissue id.
HU = {A.AIR: (-1000, -1000, 4), A.LUNG: (-850, -850, 45), A.FAT: (-100, -100, 10), A.MUSCLE: (50, 55, 9),
      A.BONE: (750, 750, 120), A.MARROW: (260, 270, 50), A.ARTERY: (42, 230, 8), A.VEIN: (40, 160, 8),
      A.ORGAN: (58, 105, 7), A.KIDNEY: (32, 170, 10), A.WATER: (8, 10, 4), A.THYROID: (95, 150, 10),
      A.BOWEL: (40, 70, 8), A.NODE: (40, 55, 9), A.HILUM: (-70, -70, 12)}
# PET SUV per tissue (background body ~1, nodes get their own uptake).
SUV = {A.AIR: 0.0, A.LUNG: 0.4, A.FAT: 0.5, A.MUSCLE: 0.9, A.BONE: 0.8, A.MARROW: 1.6, A.ARTERY: 1.6,
       A.VEIN: 1.5, A.ORGAN: 2.3, A.KIDNEY: 3.5, A.WATER: 1.0, A.THYROID: 1.8, A.BOWEL: 1.8, A.NODE: 1.0,
       A.HILUM: 1.0}
SLICE_CHOICES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPS", "LPI", "RAI", "ARS", "PLS", "SRA", "LIP")


@dataclass(frozen=True)
class Variant:
    """What a generator variant fixes beyond SynthConfig's ranges."""

    orientations: tuple[str, ...]  # stored orientations drawn from
    slice_choices: tuple[float, ...]  # slice spacings (mm) drawn from within cfg.slice_thickness
    mask_pool: str  # pool of real node masks (synth_nodes.mask_pool)
    hu_scale: tuple[float, float]  # scanner calibration HU' = scale * HU + offset (range per case)
    hu_offset: tuple[float, float]
    distractors: tuple[int, int]  # vessel-like soft-tissue tubes through fat per case (inclusive)
    oblique_distractors: bool  # tubes run in any direction (else craniocaudally, like the iliac branches)


VARIANTS = {
    "train": Variant(ORIENTATIONS, SLICE_CHOICES, "train", (1.0, 1.0), (0.0, 0.0), (1, 3), False),
    "heldout": Variant(("RPI", "LAI", "ASR", "PIL", "IRA", "SPL"), (0.8, 1.75, 3.5), "test", (1.02, 1.06),
                       (6.0, 14.0), (2, 4), True),
}
# SynthConfig ranges of the held-out variant, disjoint from the training defaults.
HELDOUT_RANGES = {"spacing_inplane": (1.05, 1.3), "slice_thickness": (0.8, 3.5), "noise_hu": (24.0, 32.0),
                  "real_shape_fraction": 0.8}


@dataclass
class SynthConfig:
    """Synthetic phantom generation (`data_prep/synth.py`)."""

    site: str = "pelvis"  # one of SITES, or "all"
    num_cases: int = 8  # cases per site
    seed: int = 0  # dataset seed; case i depends only on (site, seed, i)
    shape: tuple[int, int, int] | None = None  # voxel grid (X, Y, Z); None: 160x160 and 32-100 slices
    pet: bool = False  # also write a PET-like SUV channel (CASE_0001)
    stations: bool = False  # also write labelsTr_stations/ with per-station node ids
    use_real_shapes: bool = True  # use real node masks from ../shared/data/ln_masks when present
    gallery: bool = True  # write gallery/CASE.png (three slices through the largest node)
    spacing_inplane: tuple[float, float] = (0.6, 1.0)  # in-plane voxel size range, mm
    slice_thickness: tuple[float, float] = (1.0, 5.0)  # slice spacing range, mm
    nodes_per_case: tuple[int, int] = (3, 8)  # number of nodes per case (inclusive range)
    short_axis_mm: tuple[float, float] = (3.0, 30.0)  # node short-axis range, mm (log-uniform)
    contrast: float = 0.7  # probability a case is contrast-enhanced (bright vessels)
    real_masks_dir: str = ""  # folder holding NIH_LN_MED/ and NIH_LN_ABD/ zips; "" = ../shared/data/ln_masks
    real_shape_fraction: float = 0.5  # fraction of nodes that take a real mask shape when available
    noise_hu: tuple[float, float] = (6.0, 22.0)  # scanner noise standard deviation range, HU
    variant: Literal["train", "heldout"] = "train"  # generator variant (VARIANTS); "heldout" only for testing


def heldout_config(cfg: SynthConfig | None = None, **changes) -> SynthConfig:
    """`cfg` (default SynthConfig()) turned into the held-out variant: its own spacing, noise and
    real-shape ranges (HELDOUT_RANGES) plus the variant's orientations, HU calibration, mask pool
    and distractors."""
    return replace(cfg or SynthConfig(), variant="heldout", **{**HELDOUT_RANGES, **changes})


@dataclass
class SynthCase:
    case_id: str
    image: np.ndarray  # (X, Y, Z) int16 HU
    label: np.ndarray  # (X, Y, Z) uint8, 1 = lymph node
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    pet: np.ndarray | None = None  # (X, Y, Z) float32 SUV
    stations: np.ndarray | None = None  # (X, Y, Z) uint8 station ids (1-based index into station_names)
    nodes: list[dict] = field(default_factory=list)  # world centroid, short/long axis mm, volume, station
    station_names: list[str] = field(default_factory=list)
    tissue: np.ndarray | None = None  # (X, Y, Z) uint8 tissue ids (synth_anatomy.TISSUE_NAMES)
    info: dict = field(default_factory=dict)  # spacing, orientation, contrast, noise


def case_seed(seed: int, index: int) -> int:
    """Per-case seed from the dataset seed and case index."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _sample_grid(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    sxy = float(rng.uniform(*cfg.spacing_inplane))
    lo, hi = cfg.slice_thickness
    choices = [s for s in VARIANTS[cfg.variant].slice_choices if lo <= s <= hi]
    sz = float(rng.choice(choices)) if choices else float(rng.uniform(lo, hi))
    if cfg.shape is not None:
        shape = tuple(int(s) for s in cfg.shape)
    else:
        shape = (160, 160, int(np.clip(round(140 / sz), 32, 100)))
    return np.array([sxy, sxy, sz]), shape  # type: ignore[return-value]


def _place_nodes(rng, site, scene, painter, spacing, cfg, contrast):
    """Paint nodes into scene.tissue; returns the node label map, station map, per-node records."""
    shape = scene.tissue.shape
    label = np.zeros(shape, np.uint8)
    station = np.zeros(shape, np.uint8)
    hu_offset = np.zeros(shape, np.float32)
    origin = np.array([painter.x.ravel()[0], painter.y.ravel()[0], painter.z.ravel()[0]])
    pool = VARIANTS[cfg.variant].mask_pool
    files = real_mask_files(REAL_SET[site], cfg.real_masks_dir, pool) if cfg.use_real_shapes else ()
    lo, hi = cfg.short_axis_mm
    n = int(rng.integers(cfg.nodes_per_case[0], cfg.nodes_per_case[1] + 1))
    solid = np.isin(scene.tissue, A.SOLID)
    fat_vox = np.argwhere(ndimage.binary_erosion(scene.tissue == A.FAT, iterations=2))
    occupied = np.zeros(shape, bool)  # nodes grown by 2 voxels: neighbours stay separate components
    records, placed = [], []
    fallback_hi = max(lo, min(hi, 0.2 * float(np.min(np.array(shape) * spacing))))
    for k in range(n + 20):
        if k >= n and (records or len(fat_vox) == 0):
            break
        # Past the drawn count with nothing placed (a small grid): keep trying with nodes that fit.
        top = hi if k < n else fallback_hi
        short = float(np.exp(rng.uniform(np.log(lo), np.log(top))))
        pick = int(rng.integers(1 << 30))
        use_real = rng.random() < cfg.real_shape_fraction
        real = files[pick % len(files)] if (files and use_real) else None
        mask, kind = node_shape(rng, short, spacing, real, lo, hi)
        if mask.size == 0:
            continue
        cluster = placed and rng.random() < 0.3
        for _ in range(40):
            if cluster:
                ai, prev = placed[int(rng.integers(len(placed)))]
                d = rng.normal(0, 1, 3) * np.array([1, 1, 0.4])
                d /= np.linalg.norm(d) + 1e-9
                centre = prev + d * (short + rng.uniform(2, 6))
            elif k < n:
                ai = int(rng.integers(len(scene.anchors)))
                centre = scene.anchors[ai].propose(rng, short / 2)
            else:  # the stations lie outside a small grid: any fat voxel, named after the nearest station
                centre = origin + fat_vox[int(rng.integers(len(fat_vox)))] * spacing
                near = [np.linalg.norm(a.propose(rng, short / 2) - centre) for a in scene.anchors]
                ai = int(np.argmin(near))
            start = np.round((centre - origin) / spacing - np.array(mask.shape) / 2).astype(int)
            if np.any(start < 3) or np.any(start + mask.shape > np.array(shape) - 3):
                continue
            box = tuple(slice(s, s + m) for s, m in zip(start, mask.shape))
            if occupied[box][mask].any():
                continue
            if solid[box][mask].mean() > 0.08:
                continue
            break
        else:
            continue
        idx = len(records) + 1
        label[box][mask] = 1
        pbox = tuple(slice(s - 2, s + m + 2) for s, m in zip(start, mask.shape))
        occupied[pbox] |= ndimage.binary_dilation(np.pad(mask, 2), iterations=2)
        sid = scene.anchors[ai].station
        station_names = [a.station for a in scene.anchors]
        station[box][mask] = station_names.index(sid) + 1
        scene.tissue[box][mask] = A.NODE
        hilum = short >= 6 and rng.random() < 0.35
        if hilum:
            dist = ndimage.distance_transform_edt(mask, sampling=spacing)
            side = rng.normal(0, 1, 3) * np.array([1, 1, 0.3])
            coords = (np.argwhere(mask) - np.array(mask.shape) / 2) * spacing
            toward = coords @ (side / np.linalg.norm(side))
            fat = (toward > 0.2 * short) & (dist[mask] < 0.35 * short)
            local = scene.tissue[box]
            pts = np.argwhere(mask)[fat]
            local[tuple(pts.T)] = A.HILUM
        offset = rng.uniform(-12, 18)
        if short >= 15 and rng.random() < 0.3:  # necrotic centre: hypodense core
            dist = ndimage.distance_transform_edt(mask, sampling=spacing)
            core = dist > 0.55 * dist.max()
            hu_offset[box][core & mask] += rng.uniform(-35, -20)
        hu_offset[box][mask] += offset
        vox = np.argwhere(mask) + start
        centroid = origin + vox.mean(0) * spacing
        s_mm, l_mm = axial_diameters(mask, spacing, widest_of_ties=False)
        records.append({"id": idx, "station": sid, "shape": kind, "fatty_hilum": bool(hilum),
                        "centroid_site": centroid, "short_axis_mm": round(s_mm, 2), "long_axis_mm": round(l_mm, 2),
                        "volume_mm3": round(float(mask.sum() * np.prod(spacing)), 1),
                        "suv": round(float(rng.uniform(3, 15)), 2)})
        placed.append((ai, centroid))
    return label, station, hu_offset, records


def _distractors(rng, painter, tissue, label, variant: Variant) -> int:
    """Paint vessel-like soft-tissue tubes (3-7 mm wide) through fat, clear of the nodes: what a
    model must not call a node. Returns how many were painted."""
    lo, hi = variant.distractors
    fat = np.argwhere(ndimage.binary_erosion(tissue == A.FAT, iterations=3) & ~ndimage.binary_dilation(
        label > 0, iterations=4))
    if len(fat) == 0:
        return 0
    axes = [painter.x.ravel(), painter.y.ravel(), painter.z.ravel()]
    clear = ~ndimage.binary_dilation(label > 0, iterations=2)
    painted = 0
    for _ in range(int(rng.integers(lo, hi + 1))):
        c = np.array([a[i] for a, i in zip(axes, fat[int(rng.integers(len(fat)))])])
        d = rng.normal(0, 1, 3) if variant.oblique_distractors else np.array([*rng.normal(0, 0.25, 2), 1.0])
        d /= np.linalg.norm(d)
        r, half = rng.uniform(1.5, 3.5), rng.uniform(15, 40)
        rel = [painter.x - c[0], painter.y - c[1], painter.z - c[2]]
        t = np.clip(rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2], -half, half)
        dist2 = sum((q - t * dk) ** 2 for q, dk in zip(rel, d))
        tube = (dist2 <= r * r) & (tissue == A.FAT) & clear
        tissue[tube] = A.VEIN
        painted += int(tube.any())
    return painted


def _intensities(rng, tissue, hu_offset, spacing, contrast, noise_sd):
    mean = np.array([HU[t][1 if contrast else 0] for t in range(len(A.TISSUE_NAMES))], np.float32)
    spread = np.array([0, 15, 6, 5, 60, 25, 20, 15, 6, 10, 3, 8, 5, 4, 6], np.float32)
    mean += rng.normal(0, 1, mean.size).astype(np.float32) * spread
    amp = np.array([HU[t][2] for t in range(len(A.TISSUE_NAMES))], np.float32)
    field_ = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, np.float32), 1.5 / np.sqrt(spacing / spacing[0]))
    field_ /= field_.std() + 1e-6
    img = mean[tissue] + amp[tissue] * field_ + hu_offset
    # Fat carries thin fibrous septa and small vessels: soft-tissue streaks where a smooth field crosses zero.
    septa = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, np.float32), 3.0 / spacing)
    septa = np.abs(septa) < 0.04 * septa.std() * 3
    img[septa & (tissue == A.FAT)] = rng.uniform(-40, 10)
    lung = tissue == A.LUNG
    if lung.any():  # pulmonary vessels: small soft-tissue blobs in the lung
        vess = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, np.float32), 2.0 / spacing)
        img[lung & (vess > 2.2 * vess.std())] = 30.0
    img = ndimage.gaussian_filter(img, 0.6 * spacing.min() / spacing + 0.25)  # partial volume / scanner PSF
    noise = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, np.float32), 0.7)
    img += noise * (noise_sd / (noise.std() + 1e-6))
    return np.clip(np.round(img), -1024, 3071).astype(np.int16)


def _pet(rng, tissue, label, records, spacing):
    suv = np.array([SUV[t] for t in range(len(A.TISSUE_NAMES))], np.float32)[tissue]
    lab, _ = ndimage.label(label)
    for r in records:
        c = np.round(r["_vox"]).astype(int)
        comp = lab[tuple(c)]
        if comp:
            suv[lab == comp] = r["suv"]
    suv = ndimage.gaussian_filter(suv, 2.5 / spacing)  # ~6 mm FWHM PET resolution
    suv *= 1 + 0.12 * ndimage.gaussian_filter(rng.standard_normal(suv.shape, np.float32), 1.0) * 2.5
    return np.clip(suv, 0, None).astype(np.float32)


def generate_case(site: str, seed: int, cfg: SynthConfig, case_id: str | None = None) -> SynthCase:
    """One phantom; the same (site, seed, cfg) gives byte-identical arrays."""
    if site not in SITES:
        raise ConfigError(f"unknown site '{site}' (choices: {', '.join(SITES)})")
    rng = np.random.default_rng([SITES.index(site), int(seed)])
    spacing, shape = _sample_grid(rng, cfg)
    fov = np.array(A.FOV_CENTRE[site]) + rng.uniform(-8, 8, 3)
    axes = [(np.arange(n) - (n - 1) / 2) * s + c for n, s, c in zip(shape, spacing, fov)]
    painter = A.Painter(*axes)
    scene = A.BUILDERS[site](painter, rng)
    contrast = bool(rng.random() < cfg.contrast)
    label, station, hu_offset, records = _place_nodes(rng, site, scene, painter, spacing, cfg, contrast)
    # Variant-only draws come from their own stream, so the main stream (and every training phantom's
    # anatomy and nodes) does not depend on them.
    vrng = np.random.default_rng([SITES.index(site), int(seed), 0x5EED])
    variant = VARIANTS[cfg.variant]
    n_distractors = _distractors(vrng, painter, scene.tissue, label, variant)
    noise_sd = float(rng.uniform(*cfg.noise_hu))
    image = _intensities(rng, scene.tissue, hu_offset, spacing, contrast, noise_sd)
    scale, offset = vrng.uniform(*variant.hu_scale), vrng.uniform(*variant.hu_offset)
    if (scale, offset) != (1.0, 0.0):  # another scanner's calibration (air stays at the -1024 floor)
        image = np.clip(np.round(image * scale + offset), -1024, 3071).astype(np.int16)
    # RAS grid affine in the site frame, then a random world origin and a random stored orientation.
    world_shift = rng.uniform(-150, 150, 3)
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = np.array([axes[0][0], axes[1][0], axes[2][0]]) + world_shift
    for r in records:
        r["_vox"] = (r.pop("centroid_site") - ras[:3, 3] + world_shift) / spacing
    pet = _pet(rng, scene.tissue, label, records, spacing) if cfg.pet else None
    code = variant.orientations[int(rng.integers(len(variant.orientations)))]
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(code))
    affine = ras @ nib.orientations.inv_ornt_aff(ornt, shape)

    def orient(a):
        return None if a is None else np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt))

    nodes = []
    for r in records:
        vox = r.pop("_vox")
        world = ras[:3, :3] @ vox + ras[:3, 3]
        nodes.append({**r, "centroid_world": [round(float(v), 2) for v in world]})
    return SynthCase(
        case_id=case_id or f"{site}_{seed}", image=orient(image), label=orient(label), affine=affine,
        pet=orient(pet), stations=orient(station) if cfg.stations else None, nodes=nodes,
        station_names=[a.station for a in scene.anchors], tissue=orient(scene.tissue),
        info={"spacing": [round(float(s), 4) for s in spacing], "orientation": code, "contrast": contrast,
              "noise_hu": round(noise_sd, 2), "variant": cfg.variant, "hu_scale": round(float(scale), 4),
              "hu_offset": round(float(offset), 2), "distractors": n_distractors})


def save_gallery(case: SynthCase, path: str | Path, window: tuple[float, float] = (-160.0, 240.0)) -> None:
    """Axial, coronal and sagittal slices through the largest node (RAS display, radiological
    left-right), HU window `window`, node outlines in colour; written via a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ras = nib.orientations.io_orientation(case.affine)
    img = nib.orientations.apply_orientation(case.image, ras).astype(np.float32)
    lab = nib.orientations.apply_orientation(case.label, ras)
    sp = np.sqrt((case.affine[:3, :3] ** 2).sum(0))[np.argsort(ras[:, 0])]
    lab_cc, n = ndimage.label(lab)
    if n:
        sizes = ndimage.sum_labels(lab, lab_cc, range(1, n + 1))
        c = np.round(ndimage.center_of_mass(lab_cc == int(np.argmax(sizes)) + 1)).astype(int)
    else:
        c = np.array(img.shape) // 2
    views = [(img[::-1, ::-1, c[2]].T, lab[::-1, ::-1, c[2]].T, sp[0] / sp[1], "axial"),
             (img[::-1, c[1], ::-1].T, lab[::-1, c[1], ::-1].T, sp[2] / sp[0], "coronal"),
             (img[c[0], ::-1, ::-1].T, lab[c[0], ::-1, ::-1].T, sp[2] / sp[1], "sagittal")]
    fig, axs = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (im, lb, aspect, name) in zip(axs, views):
        ax.imshow(im, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        if lb.any():
            ax.contour(lb > 0, levels=[0.5], colors=["#ff3b30"], linewidths=0.8)
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case.case_id}  {case.info['orientation']}  spacing {case.info['spacing']}  "
                 f"{'contrast' if case.info['contrast'] else 'non-contrast'}  nodes {len(case.nodes)}",
                 color="white", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(path.with_name(path.stem), ".png") as tmp:
        fig.savefig(tmp, dpi=80, facecolor="black")
        plt.close(fig)
        tmp.replace(path)


def _summary(cases: list[SynthCase], sites: list[str]) -> dict:
    short = np.array([n["short_axis_mm"] for c in cases for n in c.nodes], float)
    hu = np.concatenate([c.image[c.tissue == t].ravel()[::97] for c in cases for t in (A.FAT, A.MUSCLE)]) \
        if cases else np.zeros(0)
    node_hu = np.concatenate([c.image[c.label > 0] for c in cases]) if cases else np.zeros(0)
    q = (lambda a: [round(float(v), 1) for v in np.percentile(a, [0, 25, 50, 75, 100])] if a.size else [])
    return {"sites": sites, "cases": len(cases), "nodes": int(short.size),
            "short_axis_mm_quantiles": q(short),
            "node_hu_mean": round(float(node_hu.mean()), 1) if node_hu.size else None,
            "fat_muscle_hu_quantiles": q(hu),
            "orientations": sorted({c.info["orientation"] for c in cases})}


GENERATOR = "lnfm.data.synth"  # dataset.json's "generator": the folder is synth's
# Written before the first case (dataset.json comes last), so a folder whose run was interrupted is still
# recognisably synth's and the same command finishes it.
MARK_FILE = ".lnfm-synth.json"
# The temporaries write_nifti, atomic_write_text and save_gallery write beside a file: a killed run leaves them.
_TEMP = re.compile(r"^\.(?P<name>.+?)\.tmp\d*(?:-[0-9a-f]+)?(\.nii\.gz|\.nii|\.png)?$")


def _sites(site: str) -> list[str]:
    return list(SITES) if site == "all" else [site]


def _case_files(cid: str, config: dict) -> set[str]:
    """Paths (relative to --out) of the files synth writes for case `cid` with settings `config`."""
    files = {f"imagesTr/{cid}_0000.nii.gz", f"labelsTr/{cid}.nii.gz"}
    files |= {f"imagesTr/{cid}_0001.nii.gz"} if config["pet"] else set()
    files |= {f"labelsTr_stations/{cid}.nii.gz"} if config["stations"] else set()
    return files | ({f"gallery/{cid}.png"} if config["gallery"] else set())


def _written_files(config: dict) -> set[str]:
    """Paths (relative to --out) of every file synth writes with settings `config` (a to_dict(SynthConfig))."""
    files = {MARK_FILE, "dataset.json"}
    for site in _sites(str(config["site"])):
        for i in range(int(config["num_cases"])):
            files |= _case_files(f"{site}_{i:03d}", config)
    return files


def _recorded_config(out: Path) -> dict | None:
    """The settings synth recorded in folder `out` (its mark file, or the dataset.json of a folder written
    before synth wrote the mark file); None when synth did not make the folder."""
    for name in (MARK_FILE, "dataset.json"):
        path = out / name
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("generator") == GENERATOR and isinstance(data.get("config"), dict):
                _written_files(data["config"])  # settings synth could have written, or not synth's
                return data["config"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
    return None


def _mark(config: dict, files: dict[str, str]) -> str:
    return json.dumps({"generator": GENERATOR, "config": config, "files": dict(sorted(files.items()))}, indent=1)


def _files_under(out: Path) -> list[str]:
    """Every file and link under folder `out`, relative and sorted (folders themselves are not listed)."""
    found = []
    for top, dirs, files in os.walk(out):
        rel = Path(top).relative_to(out)
        found += [(rel / n).as_posix() for n in files]
        found += [(rel / d).as_posix() for d in dirs if (Path(top) / d).is_symlink()]
    return sorted(found)


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _temp_of(rel: str, ours: set[str]) -> bool:
    """Whether `rel` is a temporary a killed synth run left beside one of the files `ours`."""
    m = _TEMP.match(Path(rel).name)
    if not m:
        return False
    parent = Path(rel).parent
    return bool({(parent / m.group("name")).as_posix(), (parent / f"{m.group('name')}.png").as_posix()} & ours)


def _claim_folder(cfg: SynthConfig, out: Path, force: bool) -> list[str]:
    """Check that synth may write into `out`, before anything is written (ConfigError otherwise); returns
    the files to remove first: the replaced dataset's (with `force`) and a killed run's temporaries.

    A folder synth did not make must hold no file (hidden ones aside: .DS_Store, .git). One it made must
    record the same settings, or `force` replaces it whole, so no case of the old dataset outlives its
    dataset.json. Either way a file synth would not write there is refused: prepare would take it for
    one of the phantoms."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder (--out names the dataset folder)")
    if not out.is_dir():
        return []
    present = _files_under(out)
    recorded = _recorded_config(out)
    if recorded is None:
        visible = sorted({rel.split("/")[0] for rel in present if not _is_hidden(rel)})
        if visible:
            more = f" and {len(visible) - 3} more" if len(visible) > 3 else ""
            raise ConfigError(f"{out}: holds files synth did not make ({', '.join(visible[:3])}{more}); synth writes "
                              f"only into a new or empty folder or one it made: choose another --out")
        return []
    now = json.loads(json.dumps(to_dict(cfg)))  # as dataset.json records it (tuples as lists)
    diff = [f"{k}: {recorded.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(recorded) | set(now))
            if recorded.get(k) != now.get(k)]
    ours = _written_files(recorded)
    foreign = [rel for rel in present if rel not in ours and not _is_hidden(rel)]
    if foreign:
        raise ConfigError(f"{out / foreign[0]}: not a file of the phantoms synth recorded in {out} ({len(foreign)} "
                          f"such file(s)); prepare would take it for one of them: move it away or choose another "
                          f"--out")
    if diff and not force:
        raise ConfigError(f"{out}: holds phantoms synth made with other settings ({'; '.join(diff)}); pass --force "
                          f"to replace them, or choose another --out")
    # Synth rewrites (same settings) or removes (--force) every file it made: one changed since, a corrected
    # label or an annotated dataset.json, is no longer synth's to replace.
    digests = recorded_digests(out / MARK_FILE)
    for rel in (r for r in present if r in digests and r != MARK_FILE and not (out / r).is_symlink()):
        if file_sha256(out / rel) != digests[rel]:
            raise ConfigError(f"{out / rel}: changed since synth wrote it, and synth would "
                              f"{'replace' if diff else 'rewrite'} it: move it away, or choose another --out")
    temps = [rel for rel in present if _temp_of(rel, ours)]
    if not diff:
        return temps
    # The marks go last: a replacement killed half-way leaves a folder still recognisably synth's.
    marks = [rel for rel in ("dataset.json", MARK_FILE) if rel in present]
    return temps + [rel for rel in present if rel in ours and rel not in marks] + marks


def write_dataset(cfg: SynthConfig, out: str | Path, force: bool = False) -> dict:
    """Generate cfg.num_cases per site into `out` (nnU-Net v2 raw layout); returns a summary.

    `out` must be new, empty, or a folder synth made with the same settings (the same command run again,
    or finishing an interrupted run); `force` replaces a folder synth made with other settings. A folder
    holding a file synth would not write is refused (ConfigError) before anything is written."""
    out = Path(out)
    check_apart({"--out": out}, {})  # a broken link on the way is refused in one line, not met by mkdir
    sites = _sites(cfg.site)
    for s in sites:
        if s not in SITES:
            raise ConfigError(f"unknown site '{s}' (choices: {', '.join(SITES)}, all)")
    for rel in _claim_folder(cfg, out, force):
        (out / rel).unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr", "labelsTr_stations", "gallery"):  # folders a replaced dataset left empty
        if (out / sub).is_dir() and not (out / sub).is_symlink() and not any((out / sub).iterdir()):
            (out / sub).rmdir()
    # The mark records each file's digest as its case is written, so that a rerun or --force replaces
    # only files still as synth wrote them (an interrupted run's records stay with the files it finished).
    config = to_dict(cfg)
    written = {rel: d for rel, d in recorded_digests(out / MARK_FILE).items() if (out / rel).is_file()}
    atomic_write_text(out / MARK_FILE, _mark(config, written))
    cases, entries, station_names = [], [], {}
    for site in sites:
        for i in range(cfg.num_cases):
            cid = f"{site}_{i:03d}"
            case = generate_case(site, case_seed(cfg.seed, i), cfg, case_id=cid)
            write_nifti(out / "imagesTr" / f"{cid}_0000.nii.gz", case.image, case.affine)
            if case.pet is not None:
                write_nifti(out / "imagesTr" / f"{cid}_0001.nii.gz", case.pet, case.affine)
            write_nifti(out / "labelsTr" / f"{cid}.nii.gz", case.label, case.affine)
            if case.stations is not None:
                write_nifti(out / "labelsTr_stations" / f"{cid}.nii.gz", case.stations, case.affine)
            if cfg.gallery:
                save_gallery(case, out / "gallery" / f"{cid}.png")
            written |= {rel: file_sha256(out / rel) for rel in sorted(_case_files(cid, config))}
            atomic_write_text(out / MARK_FILE, _mark(config, written))
            station_names[site] = {str(k + 1): n for k, n in enumerate(case.station_names)}
            entries.append({"case": cid, "site": site, **case.info, "nodes": case.nodes})
            cases.append(case)
    channels = {"0": "CT"} | ({"1": "PET"} if cfg.pet else {})
    dataset = {"channel_names": channels, "labels": {"background": 0, "lymph_node": 1},
               "numTraining": len(entries), "file_ending": ".nii.gz",
               "site": cfg.site, "seed": cfg.seed, "generator": GENERATOR, "config": config,
               "stations": station_names, "cases": entries}
    atomic_write_text(out / "dataset.json", json.dumps(dataset, indent=1))
    atomic_write_text(out / MARK_FILE, _mark(config, written | {"dataset.json": file_sha256(out / "dataset.json")}))
    return _summary(cases, sites)


def _triple(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"--shape wants X,Y,Z with each >= 16, got '{text}'")
    return tuple(parts)  # type: ignore[return-value]


def _seed(text: str) -> int:
    """A phantom set's seed: a whole number >= 0 (numpy's seed sequence takes no negative)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; a seed is a whole number >= 0")
    return value


def _count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--num-cases wants at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write synthetic lymph-node CT phantoms in the nnU-Net raw layout.")
    ap.add_argument("--site", default="pelvis", choices=[*SITES, "all"])
    ap.add_argument("--num-cases", type=_count, default=8)
    ap.add_argument("--seed", type=_seed, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pet", action="store_true", help="also write a PET-like SUV channel")
    ap.add_argument("--stations", action="store_true", help="also write labelsTr_stations/")
    ap.add_argument("--shape", type=_triple, default=None, help="grid X,Y,Z (default 160,160,32-100)")
    ap.add_argument("--no-gallery", action="store_true")
    ap.add_argument("--no-real-shapes", action="store_true", help="ellipsoid/lobulated nodes only")
    ap.add_argument("--heldout", action="store_true",
                    help="the held-out generator variant (test phantoms no training set draws from)")
    ap.add_argument("--force", action="store_true",
                    help="replace the phantoms synth made in --out with other settings (never files it did not make "
                         "or a user changed since)")
    args = parse_args_once(ap, argv)
    cfg = SynthConfig(site=args.site, num_cases=args.num_cases, seed=args.seed, shape=args.shape, pet=args.pet,
                      stations=args.stations, gallery=not args.no_gallery, use_real_shapes=not args.no_real_shapes)
    if args.heldout:
        cfg = heldout_config(cfg)
    summary = write_dataset(cfg, args.out, force=args.force)
    print(f"wrote {summary['cases']} cases ({', '.join(summary['sites'])}) to {args.out}")
    print(f"nodes: {summary['nodes']}, short axis mm [min q1 median q3 max]: {summary['short_axis_mm_quantiles']}")
    print(f"node HU mean: {summary['node_hu_mean']}, fat+muscle HU quantiles: {summary['fat_muscle_hu_quantiles']}")
    print(f"orientations: {', '.join(summary['orientations'])}")
    return 0
