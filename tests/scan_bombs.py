"""A NIfTI whose header claims a huge grid in a 1 kB file: what a scan too large for the host looks like to the
checks that read only headers (predict, prepare); nothing here reads its voxels."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_bomb(path: Path, shape=(4000, 4000, 2000), zooms=(0.5, 0.5, 1.0)) -> str:
    """`shape` int16 voxels of `zooms` mm claimed by the header (4000x4000x2000: 64 GB), 1 kB of data after it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_qform(np.diag([*zooms, 1.0]), 1)
    header.set_sform(np.diag([*zooms, 1.0]), 1)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + bytes(4 + 1024))
    return str(path)
