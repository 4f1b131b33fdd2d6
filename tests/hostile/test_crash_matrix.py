"""Kill -9, SIGTERM and a full disk (`ulimit -f`) while each job that writes (prepare, pretrain,
finetune, export, predict) is writing: the real `python -m lnfm <job>` in a subprocess, on
phantoms and tiny models.

One row per job; its test runs the same command four times on the same folders:
1. kill -9 once the job is writing (polled: a new record, a checkpoint or export temporary
   folder, a case's output);
2. SIGTERM at the same point: the documented exit code (0 for the training jobs, which finish
   the step and save; 143 for the others) and a clean message, no traceback;
3. a file-size limit (`ulimit -f`, SIGXFSZ ignored, so the write fails with EFBIG) that the job's
   big write exceeds: one line `lnfm <job>: error: <file>: ...` naming what could not be
   written, exit 2;
4. the same command with no limit: exit 0 and a valid result (the store opens with every case,
   the checkpoints verify and the run resumed from one, the export verifies, every mask reads).
After each of 1-4, every finished file that existed when the fault came (hashed just before
the signal or the run: the inputs, the model, the store's finished cases, the committed
checkpoints, the previous export) hashes the same (a completed export replaces the previous
one, as asked), and every file under a final name is whole (it verifies or parses). Each run
resumes from what the previous one left, so run 4 also shows that the folders left by 1-3
together are resumable; after it no temporary, backup or lock file is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from inputs import labelled_store, nnunet

REPO = Path(__file__).resolve().parents[2]
# Unoptimised XLA code compiles in half the time (as the pretraining-job tests run it).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Names of temporary, backup and lock files (a store's failures.parts folder is none of them).
LEFTOVER = re.compile(r"\.tmp|\.part\d|\.old-|\.lock|orbax-checkpoint-tmp")
TINY_VIT = ["model.depth=1", "model.width=32", "model.heads=2", "optim.warmup_steps=0", "data.workers=0",
            "train.log_every=1", "checkpoint.keep=40"]
# Training steps of the pretrain and finetune cases, checkpointed every 2: the kill and the SIGTERM
# land a few checkpoints in (the poll can lag the tiny steps under load), and the full-disk run
# must still have checkpoints to write (with 8 steps the SIGTERM run once reached the last step).
STEPS = 24


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A JAX compilation cache the runs of this module share (a rerun then skips compiling)."""
    return tmp_path_factory.mktemp("jax_cache")


def _env(cache: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LNFM_", "JAX_COMPILATION"))}
    env.update(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    err: str


def start(argv: list, log: Path, cache: Path | None, limit: int | None = None) -> subprocess.Popen:
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:  # the child keeps its own copies
        return subprocess.Popen([sys.executable, "-m", "lnfm", *map(str, argv)], cwd=REPO, env=_env(cache),
                                stdout=out, stderr=err, preexec_fn=limited if limit else None)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> Run:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"timed out: {Path(f'{log}.err').read_text()[-3000:]}") from None
    return Run(rc, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text())


def run(argv: list, log: Path, cache: Path | None, limit: int | None = None) -> Run:
    return finish(start(argv, log, cache, limit), log)


def signal_when(argv: list, log: Path, cache: Path, watch: Callable[[], Callable[[], bool]], sig: int,
                snapshot: Callable[[], dict]) -> tuple[Run, dict]:
    """Start the job, poll until it is writing (`watch()` made at the start), take `snapshot()` of
    what exists then, send `sig`; (the run, the snapshot)."""
    writing = watch()
    proc = start(argv, log, cache)
    t0 = time.time()
    while not writing():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before writing: {Path(f'{log}.err').read_text()[-3000:]}")
        if time.time() - t0 > 300:
            proc.kill()
            raise AssertionError("never started writing")
        time.sleep(0.005)
    before = snapshot()
    proc.send_signal(sig)
    return finish(proc, log), before


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths`, lock files aside: they hold no data, a reader's lock (export's on the run
    it reads) is left behind by a kill -9 and removed by the next reader, and the end of the test checks that none
    outlives the completed rerun."""
    out = {}
    for top in paths:
        for p in sorted([top, *top.rglob("*")] if top.is_dir() else [top]):
            if p.is_file() and not p.name.startswith(".lnfm.lock"):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error_line(r: Run, job: str) -> str:
    assert "Traceback" not in r.err, r.err[-3000:]
    lines = [line for line in r.err.splitlines() if line.startswith(f"lnfm {job}: error: ")]
    assert len(lines) == 1, r.err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- the jobs


@dataclasses.dataclass
class Job:
    name: str
    setup: Callable  # (tmp, cache, tiny) -> ctx with .argv, .kept() (the finished files: hashed before and after)
    watch: Callable  # ctx -> (() -> bool): called as a run starts; the predicate holds once it is writing
    term_rc: int
    term_says: str  # in stderr after SIGTERM
    limit: int  # bytes: below the job's big write, above what it writes before it
    full_names: Callable  # ctx -> the path the disk-full line must name
    whole: Callable  # ctx -> None: every file under a final name is whole
    done: Callable  # ctx, Run -> None: the completed rerun's result is valid
    temps: Callable = lambda ctx: []  # ctx -> the job's temporary files: none may outlive a SIGTERM


def _prepare_setup(tmp: Path, cache: Path, tiny) -> SimpleNamespace:
    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    raw, store = nnunet(tmp, n=2), tmp / "store"
    assert prepare_dataset(str(raw), str(store), PrepareConfig(workers=0, salt="s"), show_progress=False).ok
    more = nnunet(tmp / "more", n=8)
    for i in range(2, 8):  # six more cases join the raw folder: each run below converts some
        os.replace(more / "imagesTr" / f"case{i}_0000.nii.gz", raw / "imagesTr" / f"case{i}_0000.nii.gz")
        os.replace(more / "labelsTr" / f"case{i}.nii.gz", raw / "labelsTr" / f"case{i}.nii.gz")
    ctx = SimpleNamespace(raw=raw, store=store, argv=["prepare", "--input", raw, "--output", store, "--workers", "0",
                                                      "salt=s"])
    ctx.kept = lambda: [raw, store / "contract.json",  # and the finished cases: records and arrays
                        *(q for r in _records(ctx) for q in (r, store / "cases" / r.stem))]
    return ctx


def _records(ctx) -> list[Path]:
    return sorted((ctx.store / "records").glob("*.json"))


def _prepare_whole(ctx) -> None:
    from lnfm.data.store import read_case

    for path in _records(ctx):
        image, label = read_case(str(ctx.store), json.loads(path.read_text()))
        assert image.size and label is not None and label.shape == image.shape[:3]


def _prepare_done(ctx, r: Run) -> None:
    from lnfm.data.store import read_manifest

    assert [rec["case_id"] for rec in read_manifest(str(ctx.store))] == [f"case{i}" for i in range(8)]
    _prepare_whole(ctx)


def _steps(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if folder.is_dir() \
        else []


def _temp_dirs(folder: Path, since: float) -> bool:
    """A temporary step folder made since `since` (not one a killed run left)."""
    try:
        return any(".orbax-checkpoint-tmp" in p.name and p.stat().st_ctime >= since for p in folder.iterdir())
    except FileNotFoundError:  # absent yet, or renamed while we looked
        return False


def _checkpoints_whole(folder: Path) -> None:
    from lnfm.train.checkpoint import verify_checksums

    for step in _steps(folder):
        assert verify_checksums(step), f"{step}: committed without its checksum list"


def _pretrain_setup(tmp: Path, cache: Path, tiny) -> SimpleNamespace:
    wd = tmp / "pre"
    return SimpleNamespace(wd=wd, kept=lambda: [Path(tiny.store), *_steps(wd / "checkpoints")],
                           argv=["pretrain", "--config", "vit_tiny", "--data", tiny.store, "--workdir", wd, *TINY_VIT,
                                 "train.global_batch=2", "checkpoint.every=2", f"train.steps={STEPS}"])


def _new_records(ctx) -> Callable[[], bool]:
    """A case more than the store had is committed (the job goes on converting the next)."""
    n = len(_records(ctx))
    return lambda: len(_records(ctx)) > n


def _new_checkpoint(ctx) -> Callable[[], bool]:
    """The job committed a checkpoint after those the workdir had (so its training loop runs and
    there is one to keep) and now writes the next: a temporary step folder made after that."""
    ck = ctx.wd / "checkpoints"
    seen, since = max([int(p.name) for p in _steps(ck)], default=0), []

    def writing() -> bool:
        new = [p for p in _steps(ck) if int(p.name) > seen]
        if not new:
            return False
        if not since:
            since.append(time.time())
        return len(new) > 1 or _temp_dirs(ck, since[0])
    return writing


def _pretrain_whole(ctx) -> None:
    _checkpoints_whole(ctx.wd / "checkpoints")


def _pretrain_done(ctx, r: Run) -> None:
    _pretrain_whole(ctx)
    assert [p.name for p in _steps(ctx.wd / "checkpoints")][-1] == str(STEPS)
    assert "resumed from step" in (ctx.wd / "log.txt").read_text()
    rows = [json.loads(line)["step"] for line in (ctx.wd / "metrics.jsonl").read_text().splitlines()]
    assert {s for s in rows if s} == set(range(1, STEPS + 1))  # every step logged (a resumed run may repeat some)


def _labelled_store(root: Path) -> str:
    """Four labelled phantoms at the pelvis preset's spacing, split train/train/val/test."""
    return labelled_store(root / "ft_raw", root / "ft_store", spacing=(1.5, 1.5, 1.5))


def _finetune_setup(tmp: Path, cache: Path, tiny) -> SimpleNamespace:
    store = _labelled_store(tmp)
    wd = tmp / "ft"
    argv = ["finetune", "--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", wd, "--quick",
            *(o.replace("data.", "loader.") for o in TINY_VIT),
            "site.patch=[16,16,16]", "model.img_size=[16,16,16]", "model.patch_size=[8,8,8]",
            "train.global_batch=1", "train.eval_every=4", "checkpoint.every=2", "inference.sw_batch_size=4",
            "inference.overlap=0",
            f"train.steps={STEPS}"]
    return SimpleNamespace(wd=wd, kept=lambda: [Path(store), *_steps(wd / "checkpoints")], argv=argv)


def _finetune_writing(ctx) -> Callable[[], bool]:
    return _new_checkpoint(ctx)


def _finetune_whole(ctx) -> None:
    from lnfm.runs import RepeatRun

    _pretrain_whole(ctx)
    _checkpoints_whole(ctx.wd / "best")
    rep = RepeatRun(ctx.wd)
    assert rep.best_record()["step"] == int(rep.best_step().name)


def _finetune_done(ctx, r: Run) -> None:
    _finetune_whole(ctx)
    assert [p.name for p in _steps(ctx.wd / "checkpoints")][-1] == str(STEPS)
    assert "resumed from step" in (ctx.wd / "log.txt").read_text()
    summary = json.loads((ctx.wd / "summary.json").read_text())
    assert 0.0 <= summary["dice"] <= 1.0


def _export_setup(tmp: Path, cache: Path, tiny) -> SimpleNamespace:
    from lnfm.jobs.export import export_model

    # orbax: its writes take long enough (tenths of a second) for the poll to see the temporary folder
    out = export_model(tiny.workdir, tmp / "exports" / "exp", "orbax")
    return SimpleNamespace(out=out, kept=lambda: [Path(tiny.workdir), out], replaced=[out],
                           argv=["export", "--checkpoint", tiny.workdir, "--out", out, "--format", "orbax", "--force"])


def _export_whole(ctx) -> None:
    from lnfm.jobs.export import load_export

    assert load_export(ctx.out).model is not None  # checksums verified, the weights rebuild the model


def _export_done(ctx, r: Run) -> None:
    _export_whole(ctx)
    assert sorted(p.name for p in ctx.out.parent.iterdir()) == ["exp"]  # no temporary, backup or lock left


def _predict_setup(tmp: Path, cache: Path, tiny) -> SimpleNamespace:
    from lnfm.jobs.export import export_model

    model = export_model(tiny.workdir, tmp / "model", "safetensors")
    scans = tmp / "scans"
    scans.mkdir()
    for i in range(4):  # a batch: the kill lands while later cases are being segmented and written
        shutil.copy(tiny.raw / "imagesTr" / f"{tiny.records[i % 2]['case_id']}_0000.nii.gz", scans / f"s{i}.nii.gz")
    out = tmp / "masks"
    return SimpleNamespace(model=model, scans=scans, out=out, kept=lambda: [model, scans],
                           # --force: the rerun after a kill replaces the cases the killed run finished
                           argv=["predict", "--model", model, "--input", scans, "--output", out, "--force"])


def _masks(ctx) -> list[Path]:
    return sorted(ctx.out.glob("s*.nii.gz")) if ctx.out.is_dir() else []


def _new_mask(ctx) -> Callable[[], bool]:
    """A case's mask is written (again): the job goes on with the next cases."""
    t0 = time.time()
    return lambda: any(p.stat().st_mtime >= t0 for p in _masks(ctx))


def _export_tmp(ctx) -> Callable[[], bool]:
    """This run's temporary export folder exists (not one a killed run left)."""
    t0 = time.time()

    def made() -> bool:
        try:
            return any(p.stat().st_ctime >= t0 for p in ctx.out.parent.glob(".exp.tmp-*"))
        except FileNotFoundError:
            return False
    return made


def _predict_whole(ctx) -> None:
    for mask in _masks(ctx):
        scan = nib.load(ctx.scans / mask.name)
        got = nib.load(mask)
        assert got.shape == scan.shape and np.allclose(got.affine, scan.affine)
        assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1}


def _predict_done(ctx, r: Run) -> None:
    _predict_whole(ctx)
    assert [p.name for p in _masks(ctx)] == [f"s{i}.nii.gz" for i in range(4)]


JOBS = [
    Job("prepare", _prepare_setup, _new_records, 143, "stopped by SIGTERM", 1500,
        lambda c: c.store, _prepare_whole, _prepare_done),
    Job("pretrain", _pretrain_setup, _new_checkpoint, 0, "received SIGTERM", 64 * 1024,
        lambda c: c.wd / "checkpoints", _pretrain_whole, _pretrain_done),
    Job("finetune", _finetune_setup, _finetune_writing, 0, "received SIGTERM", 64 * 1024,
        lambda c: c.wd, _finetune_whole, _finetune_done),
    Job("export", _export_setup, _export_tmp, 143, "stopped by SIGTERM",
        8 * 1024, lambda c: c.out.parent, _export_whole, _export_done,
        lambda c: [p for p in c.out.parent.iterdir() if ".tmp-" in p.name and p.stat().st_ctime >= c.term_start]),
    Job("predict", _predict_setup, _new_mask, 143, "stopped by SIGTERM", 4096,
        lambda c: c.out, _predict_whole, _predict_done,
        lambda c: [p for p in c.out.iterdir() if ".part" in p.name and p.stat().st_ctime >= c.term_start]),
]


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_kill_sigterm_and_full_disk_keep_what_was_written_and_a_rerun_completes(job, tiny, cache, tmp_path):
    (tmp_path / "logs").mkdir()
    ctx = job.setup(tmp_path, cache, tiny)

    def snapshot() -> dict:
        return digest(ctx.kept())

    def intact(before: dict, after: str) -> None:
        now = digest(list(map(Path, before)))
        changed = sorted(k for k in before if now.get(k) != before[k])
        assert not changed, f"after {after}: files that existed before changed or vanished: {changed[:5]}"
        job.whole(ctx)

    killed, before = signal_when(ctx.argv, tmp_path / "logs" / "kill", cache, lambda: job.watch(ctx), signal.SIGKILL,
                                 snapshot)
    assert killed.rc == -signal.SIGKILL
    intact(before, "kill -9")

    ctx.term_start = time.time()  # temporary files a killed run left are older
    term, before = signal_when(ctx.argv, tmp_path / "logs" / "term", cache, lambda: job.watch(ctx), signal.SIGTERM,
                               snapshot)
    assert term.rc == job.term_rc and "Traceback" not in term.err, term.err[-3000:]
    assert job.term_says in term.err, term.err[-3000:]
    assert not job.temps(ctx), f"SIGTERM left temporary files: {job.temps(ctx)}"
    intact(before, "SIGTERM")

    before = snapshot()
    # JAX writes its cache entries in place: under the limit it gets a copy of the cache to cut
    spare = Path(shutil.copytree(cache, tmp_path / "jax_cache"))
    full = run(ctx.argv, tmp_path / "logs" / "full", spare, limit=job.limit)
    assert full.rc == 2, full.err[-3000:]
    line = one_error_line(full, job.name)
    assert str(job.full_names(ctx)) in line and ("File too large" in line or "cannot write" in line), line
    intact(before, "a full disk")

    replaced = tuple(str(p) for p in getattr(ctx, "replaced", ()))  # what a completed rerun replaces
    before = {k: v for k, v in snapshot().items() if not k.startswith(replaced)} if replaced else snapshot()
    done = run(ctx.argv, tmp_path / "logs" / "rerun", cache)
    assert done.rc == 0, done.err[-3000:]
    intact(before, "the rerun")
    job.done(ctx, done)
    left = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.parts[len(tmp_path.parts)] not in
            ("logs", "jax_cache") and LEFTOVER.search(p.name)]
    left += [str(p) for top in ctx.kept() if top.is_dir() for p in top.rglob(".lnfm.lock*")]  # the inputs' own
    assert not left, f"temporary or lock files outlived the completed rerun: {left[:5]}"
