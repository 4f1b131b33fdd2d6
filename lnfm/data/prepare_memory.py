"""Memory of converting one case, checked on the grids its files' headers give (`lnfm.io.grid`) before a voxel is
read: a scan (or a PET given as a second channel) this host cannot hold was otherwise read whole, then killed for
memory (exit 137, no message), taking the other cases of the batch with it.

Measured (2026-12-07, `prepare_dataset`, workers=0, one 512x512x300 int16 CT of 0.8x0.8x1.0 mm with a uint8 label,
peak RSS over the process before it): to 0.8 mm (98.3 M voxels on the target grid) 1640 MiB, to 1.5 mm (14.9 M)
822 MiB: 9.0 bytes per scan voxel and 10.3 per target-grid voxel. The estimate takes 16 per voxel of each channel
file (a float64 file reads 6 more than an int16's 2), counting a channel on a coarser grid at the first file's
voxels (it is resampled onto them), and 12 per target-grid voxel and channel; plus this process's memory now.

A DICOM series is not estimated: its slices hold the voxels they claim, so it is as large on disk as in memory (no
small file inflates), and its headers, read first, would make every slice be read twice (prepare's workers read each
once). A NIfTI or NRRD channel beside it is estimated on its own grid.
"""

from __future__ import annotations

import math

from lnfm.io import is_dicom_path
from lnfm.io.grid import grid_voxels, image_grid
from lnfm.io.host_memory import host_memory, memory_verdict, process_bytes

SCAN_BYTES = 16  # per voxel of each channel file (the read, float32 on the first file's grid, the stacked channels)
GRID_BYTES = 12  # per voxel of the target grid and channel (the resampled image and label, the crop, the stored)


def case_memory_problem(images: list[str], series: str | None, spacing: tuple[float, ...] | None,
                        memory: tuple[int, int] | None = None) -> tuple[str, str, bool] | None:
    """(the file to name, the sentence, whether it refuses) when converting the case of channel files `images`
    to `spacing` (None: kept) needs more than the host's memory (refused) or than is free now (a warning); None
    when it fits, or where no channel's headers give a grid (a DICOM series, see above; a bad file, which the read
    names) or the host's memory cannot be read. The file named is the one of most voxels (a huge PET beside its
    CT: the PET)."""
    grids = [None if is_dicom_path(p) else image_grid(p, series) for p in images]
    memory = memory or host_memory()
    known = [g for g in grids if g is not None]
    if not known or memory is None:
        return None
    shape, vox = grids[0] or max(known, key=lambda g: math.prod(g[0][:3]))  # a DICOM first channel: the largest
    first = math.prod(shape[:3])
    sizes = [math.prod(g[0][:3]) if g is not None else 0 for g in grids]
    grid = grid_voxels(shape, vox, spacing or vox)
    need = SCAN_BYTES * sum(max(n, first) for n in sizes) + GRID_BYTES * len(images) * grid
    big = max(range(len(images)), key=lambda i: sizes[i])
    found = memory_verdict(need, process_bytes(), memory, "converting this case",
                           f"{'x'.join(map(str, grids[big][0][:3]))} voxels in this file, {grid / 1e6:.1f} M on the "
                           f"{'x'.join(f'{t:g}' for t in spacing or vox)} mm grid")
    return None if found is None else (images[big], *found)
