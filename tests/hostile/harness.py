"""The hostile-input harness (the `world` fixture is in conftest.py): one shared world (a tiny
store, a tiny finetuned model and its exports, real files from ../shared/data), a fresh input
and output folder per case, the job's command-line entry run in this process, and the checks
every case makes.

Every case asserts: the exit code; the one-line message naming the file and the problem; that
no file that existed before the case changed (the whole world, input and model trees are
hashed before and after); and that nothing half-written is left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from collections.abc import Callable


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Names of temporary files the jobs write before renaming (a leftover one is a half-written file).
TEMP_NAME = re.compile(r"(\.tmp|\.part\d|\.old-|\.partial)")


@dataclasses.dataclass
class World:
    """Everything that exists before a case runs and must be unchanged after it."""

    root: Path  # the world folder (models, inputs shared by cases)
    raw: Path  # nnU-Net raw folder of the tiny phantoms
    store: str  # their prepared store (two cases, train and test)
    ft_store: str  # four labelled phantoms split train/train/val/test: finetuning gets past its data checks
    workdir: Path  # a finetuning workdir
    orbax: Path  # exports of it
    safetensors: Path
    stablehlo: Path
    scan: Path  # one phantom CT the model can segment
    trees: list[Path]  # every pre-existing tree a case may read


@dataclasses.dataclass
class Case:
    """One hostile input. `make(world, inp, out)` writes the case's inputs under `inp` and returns
    (argv, the file the message must name or None). `rc` 0 cases are inputs handled correctly;
    their `check(world, inp, out)` verifies the output. `partial` lets a failing case leave
    outputs (prepare converts the good cases of a batch and fails with rc 1)."""

    id: str
    job: str  # prepare, synth, pretrain, finetune, export, predict
    make: Callable
    rc: int
    says: tuple[str, ...] = ()
    check: Callable | None = None
    partial: bool = False


def tree_digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (links followed) and a marker for every folder."""
    out = {}
    for top in paths:
        if not top.exists():
            continue
        for p in sorted([top, *top.rglob("*")]):
            if p.is_dir():
                out[str(p)] = "dir"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_job(job: str, argv: list[str]) -> int:
    """The job through `lnfm <job>`'s entry (lnfm.cli.run_job, the one error boundary) in this
    process; argparse errors exit 2 as in a shell."""
    from lnfm.cli import run_job as run

    try:
        return int(run(job, argv) or 0)
    except SystemExit as e:
        return int(e.code or 0)


def message_line(out: str, err: str, named: str | None, says: tuple[str, ...]) -> str:
    """The one line that reports the problem: the stderr error line or a FAILED line."""
    lines = [line for line in (err + "\n" + out).splitlines() if line.strip()]
    hits = [line for line in lines if (line.startswith(("error: ", "FAILED ")) or ": error: " in line)
            and (named is None or named in line) and all(s in line for s in says)]
    assert hits, f"no single line names {named!r} with {says}; got:\n" + "\n".join(lines[-8:])
    return hits[0]


def run_case(case: Case, world: World, tmp: Path, capsys) -> None:
    inp, out = tmp / "in", tmp / "out"
    inp.mkdir()
    out.mkdir()
    argv, named = case.make(world, inp, out)
    trees = [*world.trees, inp]
    before = tree_digest(trees)
    out_before = tree_digest([out])
    handlers = list(logging.getLogger("lnfm").handlers)
    capsys.readouterr()
    try:
        rc = run_job(case.job, [str(a) for a in argv])
    finally:
        for h in logging.getLogger("lnfm").handlers[:]:  # a job's log.txt handler must not outlive it
            if h not in handlers:
                logging.getLogger("lnfm").removeHandler(h)
                h.close()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err[-3000:]
    assert rc == case.rc, f"exit {rc}, expected {case.rc}; stderr:\n{captured.err[-2000:]}\n{captured.out[-1000:]}"
    if case.rc != 0:
        message_line(captured.out, captured.err, named, case.says)
    after = tree_digest(trees)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"pre-existing files changed or appeared: {changed[:5]}"
    new = sorted(set(tree_digest([out])) - set(out_before))
    leftovers = [p for p in new if TEMP_NAME.search(Path(p).name)]
    assert not leftovers, f"half-written files left: {leftovers}"
    if case.rc != 0 and not case.partial:
        assert [p for p in new if p != str(out)] == [], f"a failed job left outputs: {new[:5]}"
    if case.check is not None:
        case.check(world, inp, out)
