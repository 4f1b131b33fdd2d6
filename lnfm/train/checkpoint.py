"""Orbax checkpoints of the train state, the Grain iterator position and the resolved config.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config,meta}`. Saves are async
(the train loop keeps running while arrays are written) and committed
atomically: a killed process leaves no half-visible checkpoint. Restores take
an abstract target carrying the *current* shardings, so a checkpoint written on
one mesh or device count loads onto another. A latest checkpoint that fails to
restore is moved aside to `corrupt_<step>` and the previous one is used.

`<step>/lnfm_checksums.sha256` lists the sha256 of every file of the step. It is written
into the step's temporary folder after Orbax has finished it and before the rename that
commits it, together with any small files the caller commits with the step (the finetuning
job's best.json), so a committed step always has its list: a kill at any moment leaves either
no step or a listed one. Restores verify the list first, so a checkpoint with a flipped bit
counts as unreadable (and falls back) instead of loading wrong weights. A step without a
list can only come from an older lnfm; it is restored with a warning, and counts as intact
(`intact`, the resume checks) only when it reads back whole.

The checkpointer reaches its folder through an open descriptor (`_following`): a save in flight
when the user moves the run commits where the folder went, and the job ends at its next write
(`FolderMoved`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lnfm.errors import DiskFull, LnfmError, deferred_termination, disk_full
from lnfm.workdir import FolderWatch, check_job_folder, temp_file
from lnfm.workdir import file_sha256 as _sha256  # a module name the tests count calls of

log = logging.getLogger("lnfm.train")


_watches: weakref.WeakSet[FolderWatch] = weakref.WeakSet()  # the folders of this process's Checkpointers


def _not_the_users(record: logging.LogRecord) -> bool:
    """Orbax's writer threads log a failed write with its traceback before the job sees it; a full disk or
    a checkpoint folder moved away is then reported once, in one line (`DiskFull`, `FolderMoved`), so
    those records are dropped."""
    return not (record.exc_info and (disk_full(record.exc_info[1]) or any(w.moved() for w in list(_watches))))


logging.getLogger("absl").addFilter(_not_the_users)


class CheckpointError(LnfmError, RuntimeError):
    """No checkpoint in the folder can be restored into the current train state."""


CHECKSUMS = "lnfm_checksums.sha256"  # inside each step folder


def committed_steps(directory: str | Path) -> list[int]:
    """The steps of `directory`'s committed step folders, ascending (none for a missing folder)."""
    directory = Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()) \
        if directory.is_dir() else []


def has_checkpoints(directory: str | Path) -> bool:
    """Whether `directory` holds at least one committed step folder."""
    return bool(committed_steps(directory))


def _step_files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: str | Path) -> None:
    """List the sha256 of every file of a step (atomically: temp file, then rename)."""
    step_dir = Path(step_dir)
    text = "".join(f"{_sha256(step_dir / rel)}  {rel}\n" for rel in _step_files(step_dir))
    with temp_file(step_dir / CHECKSUMS) as tmp:
        tmp.write_text(text)
        os.replace(tmp, step_dir / CHECKSUMS)


# (step folder, its list) -> the listed files' stat when this process last found them matching the list: a job
# that checks a step and then restores it (finetune --init, once per repeat; a resume's `newest_intact_step`)
# hashes it once.
_verified: dict[tuple[str, str], tuple] = {}
# File times tick coarser than the clock (and an NFS server's clock is not ours): a file changed within this
# long before a check could change again keeping its stat, so such a step is hashed at each check.
_SETTLED_NS = 2_000_000_000


def _stamp(step_dir: Path, rels: list[str]) -> tuple | None:
    """(size, ctime, inode) of each listed file (ctime: a write or a copy sets it and no tool can set it back),
    or None when one is missing or changed within `_SETTLED_NS`."""
    settled = time.time_ns() - _SETTLED_NS
    try:
        stats = [os.stat(step_dir / rel) for rel in rels]
    except OSError:
        return None
    if any(s.st_ctime_ns > settled for s in stats):
        return None
    return tuple((s.st_size, s.st_ctime_ns, s.st_ino, s.st_dev) for s in stats)


def verify_checksums(step_dir: str | Path) -> bool:
    """Raise CheckpointError naming the first file that is missing or differs from the step's list.
    Returns False (nothing checked) when the step has no list. A step found whole before in this process and
    unchanged since (`_stamp`) is not hashed again."""
    step_dir = Path(step_dir)
    listing = step_dir / CHECKSUMS
    if not listing.is_file():
        return False
    text = listing.read_text()
    entries = [line.partition("  ")[::2] for line in text.splitlines()]
    key, stamp = (str(step_dir.absolute()), text), _stamp(step_dir, [rel for _, rel in entries])  # before the reads
    if stamp is not None and _verified.get(key) == stamp:
        return True
    for digest, rel in entries:
        path = step_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {CHECKSUMS} but missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file changed or is corrupt)")
    if stamp is not None:
        _verified[key] = stamp
    return True


def intact(step_dir: str | Path) -> bool:
    """Whether a committed step would restore, as `restore_latest` finds (it falls back past one that does not):
    its checksum list verifies or, for a step without one, it reads back whole (`_reads_back`). A step folder
    named by its number is committed (an unfinished save carries Orbax's temporary suffix), so a step without
    a list is an older lnfm's, whose commit came before its list."""
    try:
        return verify_checksums(step_dir) or _reads_back(Path(step_dir))
    except CheckpointError:
        return False


_READ_BATCH = 1 << 28  # bytes of arrays `_reads_back` holds at once


def _reads_back(step_dir: Path) -> bool:
    """Whether every item of a step reads back: each array of a PyTree item onto the host (any devices; a batch
    of them at a time), each file of the others (JSON records) as JSON. A missing, truncated or garbled file
    fails here as it fails the restore; a flipped bit inside an array does not (only the list would tell)."""
    try:
        for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
            if (item / "_METADATA").is_file():
                _read_arrays(item)
            else:
                for path in (p for p in item.rglob("*") if p.is_file()):
                    json.loads(path.read_text())
    except Exception:  # any read failure: the restore would fail too
        return False
    return True


def _read_arrays(item: Path) -> None:
    """Read every array of a PyTree item onto the host, about `_READ_BATCH` bytes at a time (the rest skipped)."""
    path = epath.Path(item)
    reader = ocp.PyTreeCheckpointHandler()  # the item's own handler: a checkpointer's metadata read logs the path
    try:
        leaves, treedef = jax.tree.flatten(reader.metadata(path).tree)

        def read(batch: set[int]) -> None:
            def only(value: Any) -> Any:
                return treedef.unflatten([value if i in batch else ocp.PLACEHOLDER for i in range(len(leaves))])

            reader.restore(path, args=ocp.args.PyTreeRestore(
                item=only(np.zeros(0)), restore_args=only(ocp.RestoreArgs(restore_type=np.ndarray))))

        batch, size = set(), 0
        for i, leaf in enumerate(leaves):
            batch.add(i)
            size += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
            if size >= _READ_BATCH or i == len(leaves) - 1:
                read(batch)
                batch, size = set(), 0
    finally:
        reader.close()


def newest_intact_step(directory: str | Path, above: int = 0) -> int | None:
    """The newest committed step after `above` that is `intact`: where `restore_latest` would resume (None
    when every such step is corrupt or there is none). Steps up to `above` are not read (verifying hashes
    every file)."""
    return next((step for step in reversed(committed_steps(directory))
                 if step > above and intact(Path(directory) / str(step))), None)


def _sealed_commit(seal: Callable[[Path, Path], None]) -> type:
    """Orbax's commit by atomic rename, made by `seal(folder, final)`: it seals the finished step
    and renames it to `final`, which makes it visible. Orbax's own finalize (the step metadata's
    commit time, then the rename) goes to a second temporary name, so the seal sees every final byte."""
    base = ocp.path.atomicity.AtomicRenameTemporaryPath

    class SealedCommit(base):
        async def finalize(self) -> None:
            final = Path(self._final_path)
            sealing = final.parent / f"{final.name}{ocp.path.atomicity.TMP_DIR_SUFFIX}-sealing"
            self._final_path = type(self._final_path)(sealing)
            try:
                await super().finalize()
            finally:
                self._final_path = type(self._final_path)(final)
            await asyncio.to_thread(seal, sealing, final)

    return SealedCommit


def _following(fd: int, path: Path) -> Path:
    """A path to the open folder `fd` that leads wherever the folder is moved (Linux's /proc/self/fd), else
    `path`: a save in flight when the user moves the run commits where it went, and remakes nothing at the
    old path (TensorStore creates the folders it writes into)."""
    link = Path(f"/proc/self/fd/{fd}")
    try:
        return link if os.path.samestat(os.stat(link), os.fstat(fd)) else path
    except OSError:
        return path


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 1000  # save every N steps (and always at the end or on preemption)
    keep: int = 3  # number of most recent checkpoints kept
    async_save: bool = True  # write in a background thread while training continues


def _meta() -> dict:
    return {"process_count": jax.process_count(), "device_count": jax.device_count()}


class Checkpointer:
    """Save/restore (state, data iterator, config) under `directory` with Orbax."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()  # what messages name
        self.cfg = cfg
        check_job_folder(self.directory, "checkpoints")  # the mkdir would remake a moved workdir at its old path
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        self._close_fd = weakref.finalize(self, os.close, fd)
        self.root = _following(fd, self.directory)  # where it reads and writes
        self._watch = FolderWatch(self.directory)
        _watches.add(self._watch)
        self._files: dict[int, dict[str, str]] = {}  # per step: files committed with it
        self._saving: set[int] = set()  # steps whose save started and has not committed
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True, cleanup_tmp_directories=True,
                                               temporary_path_class=_sealed_commit(self._seal))
        self.manager = ocp.CheckpointManager(self.root, options=options)

    def _seal(self, folder: Path, final: Path) -> None:
        """The step's own files, then its checksum list, then the commit."""
        step = int(final.name)
        for name, text in self._files.pop(step, {}).items():
            (folder / name).write_text(text)
        write_checksums(folder)
        os.replace(folder, final)
        self._saving.discard(step)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any = None, config: dict | None = None,
             files: dict[str, str] | None = None) -> None:
        """Start an async save of `state` at `step` (no-op if that step is already saved). `files`
        ({name: text}) are written into the step folder and committed with it."""
        self._check_folder()  # a moved run stops: its other files do not follow the folder
        if step in self.manager.all_steps():
            return
        self._files[step] = dict(files or {})
        self._saving.add(step)
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(_meta())}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        try:
            with deferred_termination():  # a SIGTERM outside the training loop waits for the save's start
                self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # also an earlier async save's failure, reported here
            self._raise_if_users(e)
            raise

    def step_file(self, step: int, name: str) -> str | None:
        """The text of a file saved with step `step` (`save`'s `files`), or None when it has none."""
        path = self.root / str(step) / name
        return path.read_text() if path.is_file() else None

    def _check_folder(self) -> None:
        """`FolderMoved` once the folder was moved. A save in flight is waited for: it commits where the folder
        went (`_following`), unless the folder is gone (removed, or moved to another disk); the message then
        names that step as lost."""
        if not self._watch.moved():
            return
        with contextlib.suppress(Exception), deferred_termination():  # the save in flight commits or fails first
            self.manager.wait_until_finished()
        lost = ", ".join(str(s) for s in sorted(self._saving))
        self._watch.check("checkpoints", f"checkpoint {lost} was being saved and is lost: the rerun resumes from the "
                                         f"one before" if lost else "")

    def _raise_if_users(self, e: Exception) -> None:
        """A save's failure that is the user's folder, not a bug, in one line: a full disk, or a folder moved
        while a save was writing there."""
        self._check_folder()
        reason = disk_full(e)
        if reason is not None:
            raise DiskFull(f"{self.directory}: cannot write a checkpoint ({reason}); the checkpoints committed "
                           f"before are intact") from None

    def _restore_step(self, step: int, target: Any, data_iter: Any) -> Any:
        if not verify_checksums(self.root / str(step)):
            log.warning("checkpoint %d in %s/ has no %s (saved by an older lnfm): restored unverified", step,
                        self.directory.name, CHECKSUMS)  # log.txt names no path: the workdir's name can be a patient's
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        if data_iter is not None:
            saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if saved.get("process_count") == jax.process_count():
                self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
            else:
                log.warning("checkpoint %d was written by %s processes, this job has %d: the data order restarts",
                            step, saved.get("process_count"), jax.process_count())
        return out["state"]

    def restore_latest(self, target: Any, data_iter: Any = None) -> tuple[Any, int] | None:
        """Restore the newest readable checkpoint into `target` (abstract, with shardings).

        Returns (state, step), or None when there is no checkpoint. A checkpoint that
        fails to restore is skipped with a warning; once an older one restores, the
        failed newer ones are moved aside. If none restores (e.g. the model config
        changed), nothing is moved and the first error is raised.
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self._restore_step(step, target, data_iter)
            except Exception as e:  # any read failure means this checkpoint is unusable
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                first = first.replace(str(self.root), str(self.directory))
                log.warning("checkpoint %d in %s/ cannot be restored (%s); falling back to the previous one",
                            step, self.directory.name, first.replace(str(self.directory), self.directory.name))
                failed.append((step, first))
                continue
            for bad, _ in failed:
                self._move_aside(bad)
            return state, step
        if failed:
            raise CheckpointError(f"{self.directory}: no checkpoint could be restored; newest ({failed[0][0]}): "
                               f"{failed[0][1]}")
        return None

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.root / str(step)
            if src.exists():
                src.rename(self.root / f"corrupt_{step}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"lnfm_ckpt_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        try:
            with deferred_termination():
                self.manager.wait_until_finished()
        except Exception as e:
            self._raise_if_users(e)
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:
                if disk_full(e) is None and not self._watch.moved():  # both were reported by wait()
                    raise
            finally:
                self._close_fd()  # the descriptor's number may name another file from now on
                self.root = self.directory

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _unreadable(directory: Path, step: int) -> CheckpointError:
    return CheckpointError(f"{directory}: checkpoint step {step} cannot be read (a file of it is damaged, truncated "
                           f"or missing); it has no {CHECKSUMS} (saved by an older lnfm) to name which: copy the run "
                           f"again if it was copied")


def check_latest_step(directory: str | Path) -> None:
    """Refuse the step `restore_params` reads by default (the newest) when a file of it is damaged, in its words,
    so that a job refuses it before writing anything: its checksum list, or for a step without one (an older
    lnfm's) a read-back of its files (`_reads_back`). Nothing to check without a committed step."""
    directory = Path(directory).absolute()
    steps = committed_steps(directory)
    if steps and not verify_checksums(directory / str(steps[-1])) and not _reads_back(directory / str(steps[-1])):
        raise _unreadable(directory, steps[-1])


def restore_params(directory: str | Path, target: Any, step: int | None = None, key: str = "params") -> Any:
    """Read only `state[key]` (e.g. the pretrained params) of a checkpoint into `target` (abstract).

    Used to initialise finetuning from a pretraining run without its optimizer state.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise FileNotFoundError(f"{directory}: no checkpoint found")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that a read-only manager is read-only, naming the folder
    try:
        mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    finally:
        absl_log.setLevel(level)
    with mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint found")
        verified = verify_checksums(directory / str(step))  # a corrupt model must not be exported or finetuned from
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore({key: target}, partial_restore=True,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args({key: target}))))
        except Exception:
            if verified or _reads_back(directory / str(step)):
                raise  # its files are whole: the target does not fit them, or a bug
            raise _unreadable(directory, step) from None
    return restored["state"][key]
