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
import re
from pathlib import Path

from lnfm.train.memory import GIB, host_memory

SCAN_BYTES = 9  # per voxel of the scan, all channels (the read scan, labels back on its grid, the mask written)
GRID_BYTES = 15  # per voxel of the model's grid with 2 classes (image, window weights, blended probabilities)
CLASS_BYTES = 4  # per grid voxel and class beyond two
PROBABILITY_BYTES = 8  # per scan voxel when --probabilities is written (float32 back on the scan's grid)


def grid_voxels(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> int:
    """Voxels of the scan's extent on the model's grid, before the body crop (an upper bound)."""
    return math.prod(math.ceil(n * s / t) for n, s, t in zip(shape[:3], spacing, target))


def prediction_bytes(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...], classes: int,
                     probabilities: bool) -> int:
    scan = math.prod(shape[:3])
    grid = grid_voxels(shape, spacing, target)
    return (scan * (SCAN_BYTES + (PROBABILITY_BYTES if probabilities else 0))
            + grid * (GRID_BYTES + CLASS_BYTES * max(0, classes - 2)))


def process_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's resident memory now (0 where it cannot be read)."""
    try:
        found = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.M)
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def memory_problem(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...], classes: int,
                   probabilities: bool, memory: tuple[int, int] | None = None) -> tuple[str, bool] | None:
    """(the sentence, whether it refuses) when this prediction needs more than the host's memory (refused) or
    more than is free now (a warning); None when it fits or the host's memory cannot be read."""
    memory = memory or host_memory()
    if memory is None:
        return None
    total, available = memory
    own = process_bytes()
    need = prediction_bytes(shape, spacing, target, classes, probabilities)
    grid = grid_voxels(shape, spacing, target)
    size = (f"segmenting it needs about {(need + own) / GIB:.1f} GiB ({'x'.join(map(str, shape[:3]))} voxels, "
            f"{grid / 1e6:.1f} M on the model's {'x'.join(f'{t:g}' for t in target)} mm grid"
            f"{', with the probabilities' if probabilities else ''})")
    if need + own > total:
        return f"{size}, more than this host's {total / GIB:.1f} GiB", True
    if need > available:
        return f"{size}, more than the {available / GIB:.1f} GiB free now: it may be killed for memory", False
    return None
