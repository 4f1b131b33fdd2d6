"""`lnfm <job> ...` (also `python -m lnfm <job>`): one entry point for every job, one error boundary.

An `LnfmError` (a user error: bad input, option or folder) prints its one-line message
on stderr and exits 2; so does a write that finds the disk full (`lnfm.errors.disk_full`) and a
path no file operation can follow (`lnfm.errors.unusable_path`: a name too long, a link loop);
a `NonFiniteLoss` exits 3; anything else is a bug and keeps its traceback. SIGTERM (outside
the training loop, which saves and exits 0) and Ctrl-C stop the job like an exception, so
its cleanups remove what it had half-written: one line, exit 128 + the signal number (143,
130), as a shell reports a job killed by that signal. Library noise after a failed write
(TensorStore's callbacks to Orbax's closed event loop) goes to the debug log, so the one line
stands alone. The entry scripts (data_prep/*.py, pretrain/pretrain.py, finetune/*.py,
launch/plan.py) are shims over `run_job`.
"""

from __future__ import annotations

import importlib
import logging
import re
import signal
import sys
import threading
import traceback
from typing import NamedTuple

from lnfm import __version__
from lnfm.errors import (LnfmError, NonFiniteLoss, Terminated, access_denied, deferred_termination, disk_full,
                         on_sigint, on_sigterm, unusable_path)


class Job(NamedTuple):
    module: str  # module with main(argv) -> exit code
    summary: str


# Modules by name: a job imports only its own stack (`lnfm synth` need not load JAX's training code).
JOBS = {
    "synth": Job("lnfm.data.synth", "write synthetic lymph-node CT phantoms (nnU-Net raw layout)"),
    "prepare": Job("lnfm.data.prepare", "convert raw CT cases into a prepared store"),
    "pretrain": Job("lnfm.jobs.pretrain", "self-supervised pretraining (MAE / SimMIM) on prepared stores"),
    "finetune": Job("lnfm.jobs.finetune", "few-shot lymph-node segmentation finetuning at one site"),
    "study": Job("lnfm.jobs.study", "few-shot transfer study: scratch vs pretrained"),
    "export": Job("lnfm.jobs.export", "write a portable export of a finetuned or pretrained model"),
    "predict": Job("lnfm.jobs.predict", "segment lymph nodes in scans with an export"),
    "plan": Job("lnfm.jobs.plan", "per-device memory, FLOPs and step time of the pretraining step at scale"),
    "demo": Job("lnfm.jobs.demo", "the whole pipeline on built-in phantoms, on CPU"),
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: lnfm <job> [options]   (lnfm <job> --help for a job's options)", "", "jobs:"]
    lines += [f"  {name:<{width}}  {job.summary}" for name, job in JOBS.items()]
    return "\n".join(lines)


def _is_closed_loop_callback(unraisable) -> bool:
    """A RuntimeError('Event loop is closed') raised by `loop.call_soon_threadsafe`: TensorStore's
    callback thread finishing a write after Orbax's event loop was closed by a failed one."""
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    frames = [f.name for f in traceback.extract_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in frames


def _quiet_closed_loop_callbacks() -> None:
    """After a failed Orbax write (a full disk) TensorStore reports in-flight writes' callbacks to a
    closed loop through `sys.unraisablehook`: library noise after the real error, which the job
    reports in one line. Send those to the log at debug level; everything else to the usual hook."""
    if getattr(sys.unraisablehook, "lnfm_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if _is_closed_loop_callback(unraisable):
            logging.getLogger("lnfm").debug("write callback after its event loop closed: %s", unraisable.exc_value)
        else:
            previous(unraisable)

    hook.lnfm_filter = True
    sys.unraisablehook = hook


def run_job(name: str, argv: list[str]) -> int:
    """Run job `name` with its arguments `argv`; the exit code (2: user error, 3: non-finite loss,
    143: SIGTERM, 130: Ctrl-C)."""
    _quiet_closed_loop_callbacks()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job that ignores Ctrl-C keeps doing so
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    try:
        # A Ctrl-C while the job's libraries import (a second or more) waits for the import to end: raised
        # inside it, it is a traceback, or TensorStore's "ImportError: initialization failed".
        with deferred_termination():
            main = importlib.import_module(JOBS[name].module).main
        return main(argv)
    except (Terminated, KeyboardInterrupt) as e:
        sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        log = logging.getLogger("lnfm")
        if log.handlers:  # for the job's log.txt; stopped before the job set up its logging, logging would print it
            log.warning("stopped by %s", sig.name, extra={"console": False})
        print(f"lnfm {name}: stopped by {sig.name}; finished outputs are kept, nothing is left half-written",
              file=sys.stderr)
        return 128 + sig
    except LnfmError as e:
        logging.getLogger("lnfm").debug("user error", exc_info=True)
        print(f"lnfm {name}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        # into the workdir's log.txt; the console gets the one line below
        logging.getLogger("lnfm").error("%s", e, extra={"console": False})
        print(f"lnfm {name}: error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        denied = access_denied(e)
        if denied is not None:  # a folder the user cannot write (or read): one line, as for a full disk
            logging.getLogger("lnfm").debug("access denied", exc_info=True)
            print(f"lnfm {name}: error: {_written_file(e)}: {denied}", file=sys.stderr)
            return 2
        unusable = unusable_path(e)
        if unusable is not None:  # a name too long or a link loop in a path the user gave: one line
            logging.getLogger("lnfm").debug("unusable path", exc_info=True)
            print(f"lnfm {name}: error: {unusable}", file=sys.stderr)
            return 2
        reason = disk_full(e)
        if reason is None:
            raise  # a bug: keep the traceback
        logging.getLogger("lnfm").debug("disk full", exc_info=True)
        print(f"lnfm {name}: error: {_written_file(e)}: cannot write ({reason}); what was written before is intact",
              file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _written_file(exc: BaseException) -> str:
    """The file a failed write named (an OSError's filename, or the first quoted absolute path)."""
    while exc is not None:
        if getattr(exc, "filename", None):
            return str(exc.filename)
        match = re.search(r'"(/[^"]+)"', str(exc))
        if match:
            return match.group(1)
        exc = exc.__cause__ or exc.__context__
    return "a file"


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the real command line: job parsers without their own prog print "usage: lnfm <job>"
        argv = sys.argv[1:]
        if argv and argv[0] in JOBS:
            sys.argv[0] = f"lnfm {argv[0]}"
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"lnfm {__version__}")
        return 0
    if argv[0] not in JOBS:
        print(f"lnfm: unknown job '{argv[0]}' (choices: {', '.join(JOBS)})", file=sys.stderr)
        return 2
    return run_job(argv[0], argv[1:])
