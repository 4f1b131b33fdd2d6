"""This host's memory, and the verdict on a job that would need `need` bytes of it: read by predict (a scan to
segment) and prepare (a case to convert) from the scan's headers, before a voxel is read, and by the training jobs'
step estimate (lnfm.train.memory). Here, below them all, as no JAX is imported: predict must start without it."""

from __future__ import annotations

import re
from pathlib import Path

GIB = 1024**3
CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) has no limit


def host_memory(meminfo: Path = Path("/proc/meminfo"), cgroups: Path = Path("/proc/self/cgroup"),
                root: Path = CGROUP) -> tuple[int, int] | None:
    """(total, available) bytes for this process: `meminfo`, capped by its cgroup's limit (a container's
    or a SLURM job's, v1 or v2, under `root`); None where `meminfo` cannot be read."""
    try:
        info = dict(re.findall(r"^(\w+):\s+(\d+) kB", meminfo.read_text(), re.M))
        total, available = int(info["MemTotal"]) * 1024, int(info["MemAvailable"]) * 1024
    except (OSError, KeyError):
        return None
    try:
        groups = cgroups.read_text().splitlines()
    except OSError:
        groups = []
    for line in groups:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            folder = root / path.lstrip("/")
            limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        elif "memory" in controllers.split(","):  # v1
            folder = root / "memory" / path.lstrip("/")
            limit, used = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
        else:
            continue
        if limit is not None and limit < total:
            total, available = limit, min(available, limit - (used or 0))
    return total, available


def process_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's resident memory now (0 where it cannot be read)."""
    try:
        found = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.M)
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def memory_verdict(need: int, own: int, memory: tuple[int, int], what: str, detail: str) -> tuple[str, bool] | None:
    """(the sentence, whether it refuses) when `what` needs `need` bytes beside this process's `own`: more than the
    host's total `memory[0]` (refused) or than the `memory[1]` free now (a warning); None when it fits."""
    total, available = memory
    size = f"{what} needs about {(need + own) / GIB:.1f} GiB ({detail})"
    if need + own > total:
        return f"{size}, more than this host's {total / GIB:.1f} GiB", True
    if need > available:
        return f"{size}, more than the {available / GIB:.1f} GiB free now: it may be killed for memory", False
    return None
