"""Digests of whole folder trees, to assert that a job changed none of its inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(*roots: str | Path) -> dict[str, str]:
    """sha256 of every file (and the set of folders) under each root, keyed by path."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        items = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in items:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def leftovers(folder: str | Path) -> list[str]:
    """Temporary or partial files a job left behind (hidden names, .tmp / .part pieces)."""
    return sorted(str(p) for p in Path(folder).rglob("*")
                  if p.name.startswith(".") or ".tmp" in p.name or ".part" in p.name)
