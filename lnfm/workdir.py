"""The job workdir: lock, resolved config, metrics.jsonl, TensorBoard events, log file, progress.

Every job holds `lock_folder(DIR)` while it runs (an exclusive lock that the kernel
releases when the job ends, even by kill -9), checks a resumed run with `check_resume`
before it writes anything, then calls `open_workdir(path, cfg)`: it writes `config.yaml`,
sends `logging` to `DIR/log.txt` and the console, and returns a `MetricsWriter` (closing it ends DIR/log.txt).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

from lnfm.config import dump_yaml, read_yaml, to_dict
from lnfm.errors import FolderMoved, LnfmError

log = logging.getLogger("lnfm")


# A temporary file of lnfm's writers (`temp_file`): hidden, `.tmp<pid>-<token>` or `.part<pid>-<token>` after the
# final name. The token keeps apart two writers with one pid (in two PID namespaces sharing a folder).
_TEMP_FILE = re.compile(r"^\..+\.(?:tmp|part)\d+-[0-9a-f]{8}(?:\.[A-Za-z.]+)?$")
# The same of lnfm before `temp_file`: `.tmp<pid>` or `.part<pid>`, no token, never locked. Its writer leaves no sign
# of life (a pid says nothing across PID namespaces), but each renamed it within the write of one output (a
# predict's outputs of one scan: minutes), so one not written to for LEGACY_TEMP_AGE_S was left by a killed writer.
_LEGACY_TEMP_FILE = re.compile(r"^\..+\.(?:tmp|part)\d+(?:\.[A-Za-z.]+)?$")
LEGACY_TEMP_AGE_S = 24 * 3600  # a day: far past any one write, on any disk
_held = threading.local()  # .fds: the locks a `hold_temps` block keeps (None outside one)


@contextlib.contextmanager
def temp_file(path: str | Path, suffix: str = "", kind: str = "tmp") -> Iterator[Path]:
    """A new empty temporary file beside `path`, `.NAME.KIND<pid>-<token>SUFFIX`, flocked for the block (inside a
    `hold_temps` block, until that ends): the kernel drops the lock when its writer dies, so `remove_stale_temps`
    of any process, in whatever PID namespace or host shares the folder, removes only a dead writer's files. The
    block writes it and renames it into place; a failed block removes it."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{kind}{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with contextlib.suppress(OSError):  # no locks on this file system: no remover can lock it either
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a remover that found it unlocked holds it
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)  # a remover took it in the instant before the lock: another name
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        held = getattr(_held, "fds", None)
        if held is None:
            os.close(fd)
        else:
            held.append(fd)


@contextlib.contextmanager
def hold_temps() -> Iterator[None]:
    """Keep the locks of the temporary files made in the block until it ends, though each is renamed meanwhile:
    predict's `.part` files, written one by one and renamed into place together, stay locked throughout."""
    outer, _held.fds = getattr(_held, "fds", None), []
    try:
        yield
    finally:
        for fd in _held.fds:
            os.close(fd)
        _held.fds = outer


def remove_stale_temps(folder: str | Path) -> None:
    """Delete the temporary files (`temp_file`) a killed writer left in `folder` (kill -9 runs no cleanup): those
    whose lock no process holds. A pid says nothing here: another PID namespace's writer looks dead. An earlier
    version's (`_LEGACY_TEMP_FILE`) goes once it is LEGACY_TEMP_AGE_S old as well."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        legacy = not _TEMP_FILE.match(name)
        if legacy and not _LEGACY_TEMP_FILE.match(name):
            continue
        path = Path(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not readable: left alone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the live writer; ours, no writer takes it
            st = os.fstat(fd)
            if os.stat(path).st_ino == st.st_ino and not (legacy and time.time() - st.st_mtime < LEGACY_TEMP_AGE_S):
                path.unlink()
        except OSError:  # held (BlockingIOError), gone meanwhile, or a file system without locks: kept
            pass
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary sibling then rename, so no half-written file is left."""
    path = Path(path)
    check_job_folder(path, path.name)  # the mkdir would remake a moved workdir at its old path
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(path) as tmp:  # a full disk: no partial file is left behind
        tmp.write_text(text)
        os.replace(tmp, path)


def atomic_write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows (dicts sharing the first row's keys) as a CSV with a header, written atomically;
    no rows, no file."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _identity(file: str | os.PathLike | int) -> tuple[int, int] | None:
    """(device, inode) of a path or an open descriptor; None for a path that names nothing."""
    try:
        st = os.fstat(file) if isinstance(file, int) else os.stat(file)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class FolderWatch:
    """`folder` as it is now. `check(what)`, before each write into it, raises `FolderMoved` once its path leads
    elsewhere or nowhere: Orbax would recreate the folder at the old path and split the run in two, and
    the other writers failed with a traceback (TensorStore's NOT_FOUND, a FileNotFoundError)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = folder
        self._made = _identity(folder)

    def moved(self) -> bool:
        now = _identity(self.folder)
        if self._made is None:  # not made yet (another host of the job makes it): watched from when it is
            self._made = now
            return False
        return now != self._made

    def check(self, what: str, lost: str = "") -> None:
        """`lost`: what the move cost, for the message (a checkpoint whose save it cut short)."""
        if self.moved():
            raise FolderMoved(f"{self.folder}: moved, renamed or removed while the job wrote {what} there; the job "
                              f"stopped, and what it wrote before is intact where the folder went (rerun with "
                              f"that folder to resume)" + (f"; {lost}" if lost else ""))


_jobs: list[FolderWatch] = []  # the workdirs of the jobs running in this process (`job_folder`)


@contextlib.contextmanager
def job_folder(folder: str | Path) -> Iterator[FolderWatch]:
    """Watch a running job's workdir for the block: lnfm's writers (`atomic_write_text`, `open_workdir`, the
    checkpointer, ...) call `check_job_folder` first, so a write after the user moved it (summary.json, the
    next repeat's folder) ends the job in one line instead of remaking the folder at the old path."""
    watch = FolderWatch(folder)
    _jobs.append(watch)
    try:
        yield watch
    finally:
        _jobs.remove(watch)


def check_job_folder(path: str | Path, what: str) -> None:
    """`FolderMoved` when `path` lies in (or is) the workdir of a running job (`job_folder`) that was moved."""
    path = os.path.abspath(path)
    for watch in list(_jobs):
        root = os.path.abspath(watch.folder)
        if path == root or path.startswith(root + os.sep):
            watch.check(what)


LOCK_FILE = ".lnfm.lock"


class WorkdirError(LnfmError, ValueError):
    """A workdir (or store) that another job holds, or that holds an incompatible run."""


@contextlib.contextmanager
def lock_folder(folder: str | Path, name: str = LOCK_FILE, enabled: bool = True, shared: bool = False,
                then: str = "wait for it to finish or choose another folder", wait: bool = False,
                names: str | Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the duration of the block.

    flock(2) on FOLDER/.lnfm.lock: the kernel drops it when the holder exits, however it dies,
    so a crashed job never blocks the next one. A second job gets a one-line `WorkdirError` naming
    `names` (default: `folder`; export names its `--out`, locked beside it), the holder (pid, host, start
    time) and `then` (what to do instead). The lock file is removed on release, and so is a folder this
    call created if the block left it empty: a refused job leaves nothing behind. With `wait`, a held lock
    is waited for instead (a short step every job of the folder takes in turn). `shared=True` is a reader's
    lock on a run (export, finetune --init): readers share it, and no job trains there while one reads; it
    names no holder, and the last reader out removes the lock file. A run in a folder this user may not
    write is read unlocked (no job of this user can be training there)."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WorkdirError(f"{folder}: exists and is not a folder")
    if shared:
        try:
            fd = _acquire(folder / name, names or folder, then, fcntl.LOCK_SH)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            fd = None
        if fd is None:
            yield  # a read-only run: no training job can be writing it
            return
        try:
            os.ftruncate(fd, 0)  # a killed job's line would name it as the holder to a job this reader refuses
            yield
        finally:
            try:  # the last reader out removes the lock file (a waiter then finds it gone and retries)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _identity(folder / name) == _identity(fd):  # not another's, at a moved run's old path
                    (folder / name).unlink(missing_ok=True)
            except BlockingIOError:
                pass  # another reader still holds it
            os.close(fd)
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    made = _identity(folder) if created else None
    path = folder / name
    fd = _acquire(path, names or folder, then, wait=wait)
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
        yield
    finally:
        # Only our own file and folder: once the user moved the folder, the old path may be another job's.
        if _identity(path) == _identity(fd):
            path.unlink(missing_ok=True)  # before the unlock: a waiter then finds the file gone and retries
        os.close(fd)  # closing the descriptor releases the lock
        if made is not None and _identity(folder) == made and not any(folder.iterdir()):
            folder.rmdir()


def _holder(fd: int) -> str:
    """The 'pid ... on host since ...' line a lock's holder wrote into its lock file `fd`."""
    return os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"


def lock_holder(path: str | Path) -> str | None:
    """Who holds the exclusive lock file `path` (its 'pid ... on host since ...' line); None when no one does
    (no file, or one a killed job left)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe, dropped by the close
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def _acquire(path: Path, folder: str | Path, then: str, mode: int = fcntl.LOCK_EX, wait: bool = False) -> int:
    """An fd holding the flock of `path`, retried while a releasing holder unlinks the file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirError(f"{folder}: in use by another lnfm job ({holder}); {then}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its holder had just removed: take the new one


def changed_leaves(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf of two nested dicts that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_leaves(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [(prefix, old, new)]


def differences(old: Any, new: Any, prefix: str) -> list[str]:
    """'prefix.key=old (new: new)' for every leaf of two nested dicts that differs."""
    return [f"{k}={json.dumps(a)} (new: {json.dumps(b)})" for k, a, b in changed_leaves(old, new, prefix)]


def check_resume(workdir: str | Path, cfg: Any, keys: tuple[str, ...], has_run: bool) -> None:
    """Refuse, before anything is written, to resume a run whose `keys` config sections (e.g.
    the model and head) differ from the recorded config.yaml; `has_run` says whether DIR holds
    checkpoints to resume from. The recorded config stays as it was."""
    path = Path(workdir) / "config.yaml"
    if not has_run or not path.is_file():
        return
    check_unchanged(path, read_yaml(path), cfg, keys)


def check_config_is_this_jobs(workdir: str | Path, cfg: Any) -> None:
    """Refuse, before anything is written, a DIR whose config.yaml another job wrote (a pretraining run's, a
    finetuning run's, a study's, or a user's own file): its top-level keys are not those of `cfg`; and a DIR
    holding files but no config.yaml (a user's folder: summary.json, log.txt would be replaced). The job
    would replace it, and the run it records could no longer be resumed, finetuned from or exported. A
    config.yaml of this job (a run stopped before its first checkpoint) is the job's to rewrite."""
    path = Path(workdir) / "config.yaml"
    if not path.is_file():
        # every run writes config.yaml before anything else: files without it are not a run's
        found = sorted(p.name for p in Path(workdir).iterdir() if not p.name.startswith(".")) \
            if Path(workdir).is_dir() else []
        if found:
            more = " and more" if len(found) > 1 else ""
            raise WorkdirError(f"{workdir}: holds {found[0]}{more} but no config.yaml: not a run's workdir (the job "
                               f"would write its records there); choose a new --workdir")
        return
    try:
        recorded = read_yaml(path)
    except Exception:  # any parser's error: not a record this job wrote
        recorded = None
    keys = set(json.loads(json.dumps(to_dict(cfg), default=list)))
    if not isinstance(recorded, dict) or set(recorded) != keys:
        raise WorkdirError(f"{path}: a config.yaml this job did not write (another job's run, or a file of yours); "
                           f"choose a new --workdir")


def check_resume_settings(workdir: str | Path, cfg: Any, may_change: tuple[str, ...], has_run: bool,
                          derived: Iterable[str] = ()) -> None:
    """Refuse, before anything is written, to resume a run under any config value other than the
    recorded config.yaml's, except the keys (or sections) in `may_change` (more steps, logging and
    checkpoint intervals, the device mesh): another learning rate, loss or augmentation would mix
    two runs in one set of checkpoints under a record that names only the second. `cfg` is the
    resolved config the run would record; `derived` keys follow others and are not compared (the
    refusal names the key the user set)."""
    path = Path(workdir) / "config.yaml"
    if not has_run or not path.is_file():
        return
    new = json.loads(json.dumps(to_dict(cfg), default=list))  # tuples -> lists, as the record holds them
    diffs = [(k, a, b) for k, a, b in changed_leaves(read_yaml(path), new, "")
             if k not in derived and not any(k == m or k.startswith(m + ".") for m in may_change)]
    if diffs:
        key, old, value = diffs[0]
        more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
        raise WorkdirError(f"{path}: the run to resume has {key}={json.dumps(old)} (new: {json.dumps(value)}){more}; "
                           f"a resumed run may change only {', '.join(may_change)}: resume with the same settings "
                           f"or choose a new --workdir")


def check_unchanged(path: Path, recorded: dict, cfg: Any, keys: Iterable[str], had: str = "has",
                    same: str = "settings") -> None:
    """Refuse to resume the run whose record `path` holds `recorded` when the `keys` sections of
    `cfg` differ from it: one line with the first difference and how many more. `had` and `same`
    word it for the record ("was trained with", "data and settings")."""
    new = json.loads(json.dumps(to_dict(cfg), default=list))  # tuples -> lists, as the record holds them
    diffs = [d for key in keys for d in differences(recorded.get(key), new.get(key), key)]
    if diffs:
        more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
        raise WorkdirError(f"{path}: the run to resume {had} {diffs[0]}{more}; resume with the same {same} or "
                           f"choose a new --workdir")


class _Console(logging.StreamHandler):
    """Console handler bound to whatever `sys.stderr` is when a record is emitted, not when the
    handler was made: a caller that swaps stderr (a notebook, a test capturing output) then never
    meets a handler writing to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(workdir: Path | None = None, level: int = logging.INFO) -> logging.Handler | None:
    """lnfm's console handler (once per process) and, with `workdir`, a handler appending to DIR/log.txt;
    returns that file handler when this call added it (its owner removes it: `MetricsWriter.close`)."""
    root = logging.getLogger("lnfm")
    root.setLevel(level)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_lnfm_console", False) for h in root.handlers):
        console = _Console()
        console.setFormatter(fmt)
        console.addFilter(lambda record: getattr(record, "console", True))  # extra={"console": False}: file only
        console._lnfm_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if workdir is not None:
        target = str(Path(workdir) / "log.txt")
        if not any(getattr(h, "baseFilename", None) == os.path.abspath(target) for h in root.handlers):
            fh = logging.FileHandler(target)
            fh.setFormatter(fmt)
            root.addHandler(fh)
            return fh
    return None


def _json_default(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _clean(v: Any) -> Any:
    """JSON has no NaN/Inf; write them as null so every line parses."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends one JSON object per call to metrics.jsonl (always with `step`) and
    mirrors scalars to TensorBoard. Only process 0 of a multi-host job writes."""

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 log_handler: logging.Handler | None = None, config: str | None = None):
        self.path = Path(workdir) / "metrics.jsonl"
        self._config = config  # config.yaml's text until `record_config` writes it
        self.enabled = enabled
        self._watch = FolderWatch(self.path.parent)
        self._tb = None
        self._log = log_handler  # DIR/log.txt's handler, removed on close: later runs of this process log elsewhere
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def record_config(self) -> None:
        """Write DIR/config.yaml (the first call; later ones and a writer without a config do nothing)."""
        if self._config is not None:
            atomic_write_text(self.path.parent / "config.yaml", self._config)
            self._config = None

    def write(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            if hasattr(v, "item") and getattr(v, "size", 1) == 1:
                v = v.item()
            row[k] = _clean(v)
        self._watch.check("metrics")
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def image(self, tag: str, step: int, image_hwc: Any) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # on an exception too: a failed run's log handler must not collect later runs' lines

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            logging.getLogger("lnfm").removeHandler(self._log)
            self._log.close()
            self._log = None


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def open_workdir(workdir: str | Path, cfg: Any, *, is_main: bool = True, tensorboard: bool = True,
                 write_config: bool = True) -> MetricsWriter:
    """Create DIR, write the resolved config.yaml and start logging into DIR/log.txt. With `write_config=False`
    config.yaml is written by the writer's `record_config()` (a resumed run: once its checkpoint restored)."""
    workdir = Path(workdir)
    check_job_folder(workdir, workdir.name)  # a repeat's folder inside a moved run: not remade at the old path
    workdir.mkdir(parents=True, exist_ok=True)
    config = dump_yaml(cfg) if is_main else None
    if write_config and config is not None:  # before the log: files without a config.yaml are not a run's
        atomic_write_text(workdir / "config.yaml", config)
        config = None
    handler = setup_logging(workdir if is_main else None)
    return MetricsWriter(workdir, enabled=is_main, tensorboard=tensorboard, log_handler=handler, config=config)


class progress:
    """tqdm bar on a TTY; plain log lines (about every 10% or 30 s) otherwise."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, disable: bool = False):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.n = initial
        self.disable = disable
        self._bar = None
        self._t0 = time.time()
        self._last_print = self._t0
        self._last_frac = -1.0
        self._postfix = ""
        if not disable and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, initial=initial, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.time()
        frac = self.n / self.total if self.total else 0.0
        if self.n == self.total or frac - self._last_frac >= 0.1 or now - self._last_print >= 30:
            self._last_frac, self._last_print = frac, now
            elapsed = now - self._t0
            eta = ""
            if self.total and self.n > 0:
                eta = f" eta {elapsed / self.n * (self.total - self.n):.0f}s"
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc} {self.n}{of} ({elapsed:.0f}s{eta}) {self._postfix}".rstrip(), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def recorded_digests(mark: Path) -> dict[str, str]:
    """The {relative path: sha256} a tool's mark file (a JSON object with "files") records for what it wrote;
    empty when there is no readable record."""
    try:
        files = json.loads(Path(mark).read_text(encoding="utf-8")).get("files", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder`, sorted, with '/' separators."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(out)
