"""Tiny raw cases written with nibabel for the data tests: a body ellipsoid in air with
a few cubic 'nodes' in the label."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np


def phantom(shape=(40, 36, 24), nodes=((20, 18, 12, 3),), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU image and uint8 label: air -1000, body ~40 HU, node boxes (cx, cy, cz, half) of label 1."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [(s - 1) / 2 for s in shape]
    body = ((x - c[0]) / (0.35 * shape[0])) ** 2 + ((y - c[1]) / (0.35 * shape[1])) ** 2 <= 1
    image = np.where(body, 40, -1000).astype(np.int16) + rng.integers(-5, 5, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    for cx, cy, cz, h in nodes:
        label[cx - h:cx + h + 1, cy - h:cy + h + 1, cz - h:cz + h + 1] = 1
    image[label > 0] = 70
    return image, label


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def affine_lps(spacing=(1.0, 1.2, 2.0), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def nnunet_folder(root: Path, n: int = 3, pet: bool = False) -> Path:
    """nnU-Net raw layout with n labelled cases (LPS affines) and dataset.json (site 'testsite')."""
    channels = {"0": "CT", "1": "PET"} if pet else {"0": "CT"}
    for i in range(n):
        img, lab = phantom(nodes=((14 + i, 18, 12, 2), (28, 20, 8, 1)), seed=i)
        aff = affine_lps(origin=(10.0 * i, -20.0, 5.0))
        save(root / "imagesTr" / f"case{i:03d}_0000.nii.gz", img, aff)
        if pet:
            save(root / "imagesTr" / f"case{i:03d}_0001.nii.gz", (lab * 5.0 + 1.0).astype(np.float32), aff)
        save(root / "labelsTr" / f"case{i:03d}.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": {"background": 0, "ln": 1},
                                                   "file_ending": ".nii.gz", "site": "testsite",
                                                   "numTraining": n}))
    return root


def write_csv(path: Path, rows: list[dict]) -> Path:
    keys = ["case_id", "image", "label", "site", "pet", "split"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    return path
