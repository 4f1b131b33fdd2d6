"""`lnfm <job> ...` (also `python -m lnfm <job>`): one entry point for every job, one error boundary.

An `LnfmError` (a user error: bad input, option or folder) prints its one-line message
on stderr and exits 2; a `NonFiniteLoss` exits 3; anything else is a bug and keeps its
traceback. The entry scripts (data_prep/*.py, pretrain/pretrain.py, finetune/*.py,
launch/plan.py) are shims over `run_job`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import NamedTuple

from lnfm import __version__
from lnfm.errors import LnfmError, NonFiniteLoss


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


def run_job(name: str, argv: list[str]) -> int:
    """Run job `name` with its arguments `argv`; the exit code (2: user error, 3: non-finite loss)."""
    main = importlib.import_module(JOBS[name].module).main
    try:
        return main(argv)
    except LnfmError as e:
        logging.getLogger("lnfm").debug("user error", exc_info=True)
        print(f"lnfm {name}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        # into the workdir's log.txt; the console gets the one line below
        logging.getLogger("lnfm").error("%s", e, extra={"console": False})
        print(f"lnfm {name}: error: {e}", file=sys.stderr)
        return 3


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
