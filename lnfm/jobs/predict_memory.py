"""Memory of one prediction on this host, checked on the grid the scan's headers give before it is read, and
again once it is read, before the network runs: a scan this host cannot segment otherwise ends in the kernel's OOM
kill (exit 137, no message).

Measured (2026-12-06, `python -m lnfm predict`, the pelvis preset's ONNX export, ONNX Runtime, 2 classes,
peak RSS from `/usr/bin/time -v`, docs/benchmarks.md "Predict's memory"): over a 0.79 GiB process
(a 128x128x40 scan), 7.9 bytes per voxel of the scan and 13.3 per voxel of the model's grid, and 6-8 more
per scan voxel when the probabilities are written. The estimate takes these rounded up, plus 4 bytes per
grid voxel for each class beyond two (the blended probabilities), plus this process's memory now.
"""

from __future__ import annotations

import math

from lnfm.io.grid import grid_voxels
from lnfm.io.host_memory import GIB, host_memory, memory_verdict, process_bytes  # noqa: F401 (GIB: tests)

SCAN_BYTES = 9  # per voxel of the scan, all channels (the read scan, labels back on its grid, the mask written)
GRID_BYTES = 15  # per voxel of the model's grid with 2 classes (image, window weights, blended probabilities)
CLASS_BYTES = 4  # per grid voxel and class beyond two
PROBABILITY_BYTES = 8  # per scan voxel when --probabilities is written (float32 back on the scan's grid)


def prediction_bytes(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...], classes: int,
                     probabilities: bool) -> int:
    scan = math.prod(shape[:3])
    grid = grid_voxels(shape, spacing, target)
    return (scan * (SCAN_BYTES + (PROBABILITY_BYTES if probabilities else 0))
            + grid * (GRID_BYTES + CLASS_BYTES * max(0, classes - 2)))


def memory_problem(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...], classes: int,
                   probabilities: bool, memory: tuple[int, int] | None = None) -> tuple[str, bool] | None:
    """(the sentence, whether it refuses) when this prediction needs more than the host's memory (refused) or
    more than is free now (a warning); None when it fits or the host's memory cannot be read."""
    memory = memory or host_memory()
    if memory is None:
        return None
    grid = grid_voxels(shape, spacing, target)
    return memory_verdict(prediction_bytes(shape, spacing, target, classes, probabilities), process_bytes(), memory,
                          "segmenting it", f"{'x'.join(map(str, shape[:3]))} voxels, {grid / 1e6:.1f} M on the "
                          f"model's {'x'.join(f'{t:g}' for t in target)} mm grid"
                          f"{', with the probabilities' if probabilities else ''}")
