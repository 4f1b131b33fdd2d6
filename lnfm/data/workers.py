"""Worker processes for per-case jobs (prepare's `--workers N`): no orphans, no collateral failures.

- Every worker watches its parent and exits as soon as the parent is gone (kill -9
  included), so it never keeps writing into a store nobody owns. On Linux the kernel
  also sends it SIGKILL when the parent dies (PR_SET_PDEATHSIG).
- A worker that dies (killed for memory, a crash in native code) breaks a
  `ProcessPoolExecutor` and fails every case still queued. Here the cases it had not
  finished are rerun one per process, so only the case that kills its process again fails,
  with the way it died, and every other case converts.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

PARENT_POLL_S = 0.5


def _exit_when_orphaned(parent: int) -> None:
    """Worker initializer: die with the parent (prctl on Linux, a polling thread everywhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lnfm-parent-watch").start()


def _child(conn: Any, parent: int, fn: Callable, item: Any, args: tuple) -> None:
    _exit_when_orphaned(parent)
    conn.send(fn(item, *args))
    conn.close()


def died(exitcode: int | None) -> str:
    """'killed by SIGKILL' / 'exit code 1' for a process's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def run_alone(fn: Callable, item: Any, args: tuple) -> Any:
    """fn(item, *args) in a process of its own; raises `WorkerDied` if that process dies."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, os.getpid(), fn, item, args), daemon=True)
    proc.start()
    send.close()
    try:
        multiprocessing.connection.wait([recv, proc.sentinel])
        try:
            result = recv.recv()
        except EOFError:  # the process died before sending
            proc.join()
            raise WorkerDied(died(proc.exitcode)) from None
        proc.join()
        return result
    finally:
        recv.close()


class WorkerDied(RuntimeError):
    """The process converting one item died; the message says how."""


def map_in_workers(fn: Callable, items: Sequence, args: tuple, workers: int,
                   on_result: Callable[[Any, Any], None], on_death: Callable[[Any, str], None]) -> None:
    """Call `on_result(item, fn(item, *args))` for every item, computed in `workers` spawned
    processes (in completion order). An item whose own process dies gets `on_death(item, how)`."""
    ctx = multiprocessing.get_context("spawn")  # no fork after TensorStore/JAX threads start
    unfinished: list = []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_when_orphaned,
                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(fn, item, *args): item for item in items}
        for fut in cf.as_completed(futures):
            try:
                result = fut.result()
            except cf.process.BrokenProcessPool:  # some worker died: which one is found below
                unfinished.append(futures[fut])
                continue
            on_result(futures[fut], result)
    for item in unfinished:  # rerun each alone: only the culprit dies again
        try:
            result = run_alone(fn, item, args)
        except WorkerDied as e:
            on_death(item, str(e))
            continue
        on_result(item, result)


__all__ = ["map_in_workers", "run_alone", "WorkerDied", "died"]
