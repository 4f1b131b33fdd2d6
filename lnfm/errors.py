"""The two kinds of expected failure; anything else raised is a bug and keeps its traceback.

`python -m lnfm <job>` (lnfm/cli.py) is the one place that turns them into exit codes:
an `LnfmError` prints its one-line message and exits 2, a `NonFiniteLoss` exits 3. A write
that finds the disk full (`disk_full`) is the user's environment, not a bug: exit 2 as well, and
so is a path the user gave that no file operation can follow (`unusable_path`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator


class LnfmError(Exception):
    """A user error (bad input file, option or folder). The message is one line that names the
    file or option and the problem, e.g. 'scan.nii.gz: not a 3-D image'."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or Inf; the job stops and keeps its last good checkpoint."""


class DataError(LnfmError, ValueError):
    """A dataset (store, manifest, mask folder) that is missing, empty, unreadable or unfit for the job."""


class WeightsMismatch(LnfmError, ValueError):
    """Saved weights (an export, a MONAI state dict) that do not fit the architecture they are loaded into."""


class DiskFull(LnfmError, OSError):
    """A write failed for want of room (a full disk, a quota, a file-size limit); one line naming
    what could not be written. What was written before is intact."""


FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# TensorStore (under Orbax and the store) wraps the OSError in a ValueError that keeps only its code.
_WRAPPED_CODE = re.compile(r"os_error_code='(\d+)'")


DENIED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _chain(exc: BaseException | None):
    """`exc` and the exceptions it was raised from, newest first."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def access_denied(exc: BaseException | None) -> str | None:
    """The reason ('Permission denied', 'Read-only file system') when `exc`, or an exception it was raised
    from, is a file operation the system refused: the user's paths, not a bug; else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DENIED_ERRNOS:
            return os.strerror(e.errno)
    return None


NAME_MAX = 255  # bytes in one file or folder name on ext4, XFS, btrfs, APFS and NTFS


def _shown(path: str, keep: int = 24) -> str:
    """`path` for a one-line message: a name too long to read is cut to its two ends, and so is a path of
    too many names."""
    short = "/".join(n if len(n) <= 2 * keep + 3 else f"{n[:keep]}...{n[-keep:]}" for n in path.split("/"))
    return short if len(short) <= 8 * keep else f"{short[:3 * keep]}...{short[-4 * keep:]}"


def unusable_path(exc: BaseException | None) -> str | None:
    """'PATH: problem' when `exc`, or an exception it was raised from, met a path no file operation can
    follow: a name too long for the file system (ENAMETOOLONG) or a loop of symbolic links (ELOOP; Python
    3.11's `Path.resolve` raises RuntimeError from it). Any `is_file()` or `resolve()` on a user's path
    can meet one, so the job's boundary reports it; else None."""
    for e in _chain(exc):
        if not isinstance(e, OSError) or e.errno not in (errno.ENAMETOOLONG, errno.ELOOP) or not e.filename:
            continue
        path = os.fsdecode(e.filename)
        if e.errno == errno.ELOOP:
            return (f"{_shown(path)}: {os.strerror(e.errno)} (a symbolic link on the way leads back to itself); "
                    f"fix the link or choose another path")
        longest = max(len(os.fsencode(name)) for name in path.split("/"))
        size = (f"a name in it has {longest} bytes, over the {NAME_MAX} a name may have" if longest > NAME_MAX
                else f"it has {len(os.fsencode(path))} bytes in all")
        return f"{_shown(path)}: {os.strerror(e.errno)} ({size}); choose a shorter path"
    return None


def disk_full(exc: BaseException | None) -> str | None:
    """The reason ('No space left on device', 'File too large', 'Disk quota exceeded') when `exc`,
    or an exception it was raised from, is a write that found no room; else None."""
    for e in _chain(exc):
        code = e.errno if isinstance(e, OSError) else None
        match = _WRAPPED_CODE.search(str(e)) if code is None else None
        code = int(match.group(1)) if match else code
        if code in FULL_ERRNOS:
            return os.strerror(code)
    return None


class FolderMoved(LnfmError):
    """A folder a running job writes into (its workdir, its checkpoints) was moved, renamed or removed: the
    user's doing, not a bug; one line naming it."""


class Terminated(BaseException):
    """SIGTERM arrived. `lnfm.cli` raises it in the main thread (past `except Exception`, like
    KeyboardInterrupt), so the job's cleanups run; exit 143."""


_deferring = 0  # depth of `deferred_termination` blocks
_pending: type[BaseException] | None = None  # what a signal that arrived inside one will raise


def _stop(exc: type[BaseException]) -> None:
    global _pending
    if _deferring:
        _pending = _pending or exc
        return
    raise exc


def on_sigterm(signum: int, frame: object) -> None:
    """The SIGTERM handler `lnfm.cli` installs for a job."""
    _stop(Terminated)


def on_sigint(signum: int, frame: object) -> None:
    """The SIGINT (Ctrl-C) handler `lnfm.cli` installs for a job: KeyboardInterrupt, deferred as SIGTERM is."""
    _stop(KeyboardInterrupt)


@contextlib.contextmanager
def deferred_termination() -> Iterator[None]:
    """SIGTERM and Ctrl-C wait until the block is done: a library writing in threads of its own (Orbax,
    TensorStore) must not be interrupted halfway, or its threads go on writing into the folder
    the job's cleanup is removing; a job's final renames must all happen or none. A pending
    signal is raised as the block ends."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None:
        exc, _pending = _pending, None
        raise exc
