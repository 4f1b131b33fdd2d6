"""Per-node report and preview image of a predicted lymph-node mask on the scan's own grid.

Nodes are the 26-connected components of the mask. Coordinates are RAS+ world
millimetres (nibabel's convention: x grows towards the patient's right, y
anterior, z superior). Axial short/long axes are measured in the axial slices of the grid
reoriented to RAS (flips and axis swaps only, no interpolation), so a scan stored
LPS or sagittally measures the same as its RAS copy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from lnfm.data.geometry import axial_diameters, spacing_of, to_canonical
from lnfm.io import Volume
from lnfm.workdir import temp_file

COLUMNS = ("node", "label", "centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm", "volume_ml",
           "short_axis_mm", "long_axis_mm", "mean_hu", "max_probability", "voxels")
OVERLAY_SOFTWARE = "lnfm predict"  # the PNG text chunk that marks an overlay as predict's own
OVERLAY_DIGEST = "LNFM digest"  # and the digest of its pixels: an edited copy that kept the text chunks is not
HEADER_COMMENT = ("# lnfm predict node report. Centroids are world coordinates in mm, RAS+ "
                  "(x increases towards the patient's right, y anterior, z superior; nibabel convention). "
                  "Short/long axis: axial diameters in mm. Volume in mL.")


def node_table(labels: np.ndarray, affine: np.ndarray, hu: np.ndarray, probability: np.ndarray,
               label_names: list[str] | None = None) -> list[dict]:
    """One row per connected component of `labels > 0`, largest first (see COLUMNS).

    `labels`, `hu` and `probability` (the foreground probability) share the grid `affine`."""
    labels = np.asarray(labels)
    canon = to_canonical(Volume(np.stack([labels.astype(np.float32), np.asarray(hu, np.float32),
                                          np.asarray(probability, np.float32)], axis=-1), affine))
    lab = canon.data[..., 0].astype(np.int64)
    hu_c, prob_c = canon.data[..., 1], canon.data[..., 2]
    spacing = spacing_of(canon.affine)
    voxel_ml = abs(float(np.linalg.det(canon.affine[:3, :3]))) / 1000.0
    comps, n = ndimage.label(lab > 0, structure=np.ones((3, 3, 3), bool))
    rows = []
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        mask = comps[box] == i
        idx = np.argwhere(mask) + np.array([s.start for s in box])
        centroid = canon.affine @ np.append(idx.mean(axis=0), 1.0)
        classes = np.bincount(lab[box][mask])
        cls = int(np.argmax(classes[1:]) + 1) if classes.size > 1 else 1
        short_mm, long_mm = axial_diameters(mask, spacing)
        rows.append({
            "label": label_names[cls] if label_names and cls < len(label_names) else str(cls),
            "centroid_ras_x_mm": float(centroid[0]), "centroid_ras_y_mm": float(centroid[1]),
            "centroid_ras_z_mm": float(centroid[2]),
            "volume_ml": float(mask.sum() * voxel_ml),
            "short_axis_mm": float(short_mm), "long_axis_mm": float(long_mm),
            "mean_hu": float(hu_c[box][mask].mean()), "max_probability": float(prob_c[box][mask].max()),
            "voxels": int(mask.sum()),
        })
    rows.sort(key=lambda r: (-r["voxels"], r["centroid_ras_x_mm"], r["centroid_ras_y_mm"], r["centroid_ras_z_mm"]))
    for k, row in enumerate(rows, start=1):
        row["node"] = k
    return [{c: r[c] for c in COLUMNS} for r in rows]


def _body_digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def report_csv(rows: list[dict]) -> str:
    """The report: a comment line (what the columns mean, and a digest of the rest, by which `--force`
    tells predict's own unchanged report from one a user has annotated), then the table."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
    body = buf.getvalue()
    return f"{HEADER_COMMENT} Content sha256:{_body_digest(body)}\n{body}"


def report_is_unchanged(text: str) -> bool:
    """Whether `text` is a report as `report_csv` wrote it: its comment line and the digest of the rest."""
    first, _, body = text.partition("\n")
    return first == f"{HEADER_COMMENT} Content sha256:{_body_digest(body)}"


def read_report(path: str | Path) -> list[dict]:
    """Rows of a report CSV (floats parsed; the header comment skipped)."""
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    rows = []
    for row in csv.DictReader(lines):
        rows.append({k: (v if k == "label" else int(v) if k in ("node", "voxels") else float(v))
                     for k, v in row.items()})
    return rows


def write_overlay(path: str | Path, hu: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                  window: tuple[float, float] = (-160.0, 240.0), title: str = "") -> None:
    """PNG with axial, coronal and sagittal slices through the largest predicted node
    (the volume centre when there is none), the mask outlined in red. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canon = to_canonical(Volume(np.stack([np.asarray(hu, np.float32), np.asarray(labels, np.float32)], -1), affine))
    img, mask = canon.data[..., 0], canon.data[..., 1] > 0
    sx, sy, sz = spacing_of(canon.affine)
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n:
        largest = int(np.argmax(np.bincount(comps.ravel())[1:]) + 1)
        centre = np.round(np.argwhere(comps == largest).mean(axis=0)).astype(int)
        note = f"largest of {n} predicted node(s)"
    else:
        centre = np.array(img.shape) // 2
        note = "no node predicted"
    x, y, z = (int(c) for c in centre)
    # Rows = the second array axis, drawn upwards (anterior / superior up); the x axis is
    # mirrored in axial and coronal views so the patient's right is on the image left (radiological).
    views = [("axial", img[::-1, :, z].T, mask[::-1, :, z].T, sy / sx),
             ("coronal", img[::-1, y, :].T, mask[::-1, y, :].T, sz / sx),
             ("sagittal", img[x, :, :].T, mask[x, :, :].T, sz / sy)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    lo, hi = window
    for ax, (name, im, m, aspect) in zip(axes, views):
        ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower", interpolation="nearest")
        if m.any() and min(m.shape) >= 2:  # a contour needs a 2x2 grid at least
            ax.contour(m.astype(float), levels=[0.5], colors="red", linewidths=1.0, origin="lower")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title} ({note})".strip())
    fig.tight_layout()
    path = Path(path)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=80, format="png")
    finally:
        plt.close(fig)
    from PIL import Image, PngImagePlugin

    with Image.open(buffer) as image:
        mark = PngImagePlugin.PngInfo()  # predict's mark, read by --force
        mark.add_text("Software", OVERLAY_SOFTWARE)
        mark.add_text(OVERLAY_DIGEST, overlay_digest(image))
        with temp_file(path.with_name(path.stem), ".png") as tmp:  # a full disk: no partial file is left behind
            image.save(tmp, format="png", pnginfo=mark)
            os.replace(tmp, path)


def overlay_digest(image) -> str:
    """The digest of a PIL image's pixels, as its mode and size decode them."""
    h = hashlib.sha256(f"{image.mode} {image.size}\n".encode())
    h.update(image.tobytes())
    return f"sha256:{h.hexdigest()}"
