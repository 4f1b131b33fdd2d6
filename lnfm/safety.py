"""Outputs never touch inputs: the path rule every job checks before it writes anything.

No output path may equal, contain or lie inside an input, the model or a workdir the
job reads, and no two outputs may share a path. Paths are compared after resolving
symlinks (`..`, links to the same file or folder count as the same path), and an
existing file reached through a hard link counts as the same file. URLs (gs://, s3://)
are not local paths and are left to their store.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterable, Mapping

from lnfm.errors import LnfmError


class PathClash(LnfmError, ValueError):
    """An output that would overwrite or write inside an input (one line naming both paths)."""


def _local(path: str | os.PathLike | None) -> Path | None:
    if path is None or str(path) == "" or "://" in str(path):
        return None
    return Path(os.path.expanduser(str(path))).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def broken_link(path: str | os.PathLike) -> Path | None:
    """`path` itself or the nearest folder above it that is a symbolic link to nothing: a job can neither
    create it (mkdir and rename meet the link) nor write through it."""
    p = Path(os.path.expanduser(str(path))).absolute()
    return next((q for q in (p, *p.parents) if q.is_symlink() and not q.exists()), None)


def relation(output: Path, other: Path) -> str | None:
    """How resolved `output` clashes with resolved `other`: 'is', 'lies inside', 'contains' or None."""
    if output == other or _same_file(output, other):
        return "is"
    if output.is_relative_to(other):
        return "lies inside"
    if other.is_relative_to(output):
        return "contains"
    return None


def check_apart(outputs: Mapping[str, str | os.PathLike | None],
                inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike] | None],
                distinct: bool = True) -> None:
    """Raise `PathClash` when an output equals, contains or lies inside an input, or (with
    `distinct`) two outputs share a path. Keys name the options (e.g. '--output', '--input'); an
    input may list several paths. Call it before anything is written."""
    outs = [(name, str(p), _local(p)) for name, p in outputs.items() if _local(p) is not None]
    for name, text, _ in outs:
        link = broken_link(text)
        if link is not None:
            where = "is" if link == Path(os.path.expanduser(text)).absolute() else "lies under"
            raise PathClash(f"{text}: {name} {where} {link}, a link to {os.readlink(link)}, which does not exist; "
                            f"create its target or choose another path")
    ins = []
    for name, value in inputs.items():
        values = [value] if value is None or isinstance(value, (str, os.PathLike)) else list(value)
        ins += [(name, str(p), _local(p)) for p in values if _local(p) is not None]
    for out_name, out_text, out in outs:
        for in_name, in_text, src in ins:
            rel = relation(out, src)
            if rel is not None:
                raise PathClash(f"{out_text}: {out_name} {rel} {in_name} {in_text}; an output must stay apart from "
                                f"every input, model and workdir the job reads (choose another path)")
    for i, (a_name, a_text, a) in enumerate(outs if distinct else []):
        for b_name, _, b in outs[i + 1:]:
            if a == b or _same_file(a, b):
                raise PathClash(f"{a_text}: {a_name} and {b_name} name the same path; each output needs its own")


__all__ = ["PathClash", "broken_link", "check_apart", "relation"]
