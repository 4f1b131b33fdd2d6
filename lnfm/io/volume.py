"""The in-memory image type shared by every reader and writer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lnfm.errors import LnfmError


class ImageReadError(LnfmError, ValueError):
    """An image that cannot be read; the message is one line: 'PATH: reason'."""


@dataclass
class Volume:
    """A 3D (X, Y, Z) or multi-channel (X, Y, Z, C) array with its voxel->world RAS mm affine."""

    data: np.ndarray  # (X, Y, Z) or (X, Y, Z, C), nibabel axis order
    affine: np.ndarray  # 4x4 float64, voxel index -> RAS+ world millimetres

    @property
    def shape3(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])  # type: ignore[return-value]


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_affine(affine: np.ndarray, path: str) -> np.ndarray:
    """A finite, invertible 4x4 affine, or ImageReadError."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(f"{path}: invalid voxel-to-world affine")
    return affine
