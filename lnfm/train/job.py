"""What every training job shares: `run_training_job` (path rule, workdir lock, resume check,
config.yaml, preprocessing.json, summary.json around the job's own checks and training),
batch checks, device batches, and `fit` (checkpointer, resume, the loop under the mesh's
sharding rules), so pretraining and finetuning differ only in what they check, build and
do with the trained state."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lnfm.config import ConfigError, dump_yaml
from lnfm.data.contract import Preprocessing, write_preprocessing
from lnfm.errors import DataError
from lnfm.models.build import check_model
from lnfm.models.layers import dtype_problem_here
from lnfm.models.sharding import check_mesh, idle_axes, make_mesh, rules_using, use_rules
from lnfm.runs import CHECKPOINTS, FinetuneRun, PretrainRun, write_json
from lnfm.safety import check_apart
from lnfm.train.checkpoint import CheckpointConfig, Checkpointer, has_checkpoints, newest_intact_step
from lnfm.train.optim import check_optim
from lnfm.train.loop import TRAIN_TIME_FILE, Hook, LoopResult, Throughput, run_loop, trim_metrics
from lnfm.train.state import abstract_state
from lnfm.workdir import (MetricsWriter, WorkdirError, check_config_is_this_jobs, check_resume, check_resume_settings,
                          check_unchanged, job_folder, lock_folder, open_workdir)

log = logging.getLogger("lnfm.train")


def check_batch(global_batch: int, accum_steps: int, nproc: int, batch_shards: int) -> None:
    """The global batch must split evenly over processes and over batch shards x microbatches."""
    if global_batch % nproc:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by {nproc} processes")
    if global_batch % (batch_shards * accum_steps):
        raise ConfigError(f"train.global_batch={global_batch} must be a multiple of the {batch_shards} batch "
                          f"shards (mesh data x fsdp) times train.accum_steps={accum_steps}")


def check_run_config(cfg: Any) -> None:
    """The sections every training job's config shares, checked before anything is written: `train`
    (steps, batch, microbatches, the logging, validation and preview intervals), `optim`, `checkpoint`,
    `mesh` and the `model` values no network is built from. Each refusal names the key and its valid
    range. The jobs call it with their own sections' checks (finetuning as its config loads, pretraining
    first in its checks)."""
    tc = cfg.train
    for name, low, meaning in (("steps", 1, "optimizer steps"), ("global_batch", 1, "samples per step"),
                               ("accum_steps", 1, "microbatches per step"), ("log_every", 1, "steps")):
        if getattr(tc, name) < low:
            raise ConfigError(f"train.{name} must be at least {low} ({meaning}), got {getattr(tc, name)}")
    for name in ("eval_every", "image_every"):  # a job's own intervals, where it has them: 0 is off
        if getattr(tc, name, 0) < 0:
            raise ConfigError(f"train.{name} must be at least 0 (steps; 0 = off), got {getattr(tc, name)}")
    check_optim(cfg.optim)
    problem = dtype_problem_here(cfg.model.dtype)
    if problem:
        raise ConfigError(problem)
    check_model(cfg.model)
    ck = cfg.checkpoint
    if ck.every < 0:
        raise ConfigError(f"checkpoint.every must be at least 0 (steps; 0 = only at the end), got {ck.every}")
    if ck.keep < 1:
        raise ConfigError(f"checkpoint.keep must be at least 1 (the newest checkpoints kept), got {ck.keep}")
    check_mesh(cfg.mesh)


def check_axes_used(sizes: dict[str, int], rules: str) -> None:
    """Every mesh axis of more than one device is one the rules shard over: otherwise its devices repeat the same
    work (a run on 8 devices as fast as on 2), which `lnfm plan` only warns of."""
    idle = idle_axes(sizes, rules)
    if idle:
        using = rules_using(idle)
        raise ConfigError(f"mesh.{idle[0]}={sizes[idle[0]]}: the sharding rules '{rules}' shard nothing over the "
                          f"'{idle[0]}' axis, so its devices would repeat the same work; "
                          + (f"set mesh.rules={using[0]}, or " if using else "") + f"set mesh.{idle[0]}=1")


def check_channels(data_channels: int, model_channels: int, model: str) -> None:
    """The network takes the data's channels (the first step's shape error, after the workdir was written,
    otherwise); `model` names what takes them (the --init encoder, model.in_channels)."""
    if data_channels != model_channels:
        raise DataError(f"the data has {data_channels} channel(s) but {model} takes {model_channels}")


def device_batch(host: dict, sharding: jax.sharding.Sharding, dtypes: dict[str, Any]) -> dict:
    """This process's share of a batch (`dtypes` names the keys to keep) -> global arrays on the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(host[k], dtype))
            for k, dtype in dtypes.items()}


def fit(step_fn: Callable, state: dict, shardings: Any, next_batch: Callable[[], Any], data_iter: Any, *,
        workdir: Path, checkpoint: CheckpointConfig, mesh: jax.sharding.Mesh, rules: str | tuple,
        total_steps: int, writer: MetricsWriter, throughput: Throughput, config: dict, log_every: int,
        hooks: tuple[Hook, ...] = (), profile: tuple[int, int] | None = None, desc: str = "train",
        on_resume: Callable[[int], None] | None = None) -> LoopResult:
    """Resume from WORKDIR/checkpoints when a checkpoint is there (metrics after it are dropped, as
    they are redone), write the config.yaml `writer` holds back (`open_workdir`), run the loop to
    `total_steps` under the mesh's sharding rules, close the checkpointer. `on_resume(step)` runs
    before the first step with the step training starts at."""
    ckpt = Checkpointer(workdir / CHECKPOINTS, checkpoint)
    restored = ckpt.restore_latest(abstract_state(state, shardings), data_iter)
    start, prior_train_s = 0, 0.0
    if restored is not None:
        state, start = restored
        log.info("resumed from step %d", start)
        try:  # the step seconds before this call (a checkpoint from before the record has none: 0)
            prior_train_s = float(json.loads(ckpt.step_file(start, TRAIN_TIME_FILE) or "{}").get("train_s", 0.0))
        except (ValueError, TypeError, AttributeError):
            prior_train_s = 0.0
        if jax.process_index() == 0:
            trim_metrics(workdir, start)
    writer.record_config()  # a resumed run's config.yaml only now: a failed restore leaves the recorded one
    if on_resume is not None:
        on_resume(start)
    try:
        with use_rules(mesh, rules):
            return run_loop(step_fn, state, next_batch, start_step=start, total_steps=total_steps, writer=writer,
                            throughput=throughput, checkpointer=ckpt, ckpt_every=checkpoint.every,
                            data_iter=data_iter, config=config, log_every=log_every, hooks=hooks, profile=profile,
                            profile_dir=workdir / "profile", desc=desc, prior_train_s=prior_train_s)
    finally:
        ckpt.close()


@dataclasses.dataclass
class Checked:
    """What a job's checks resolved before anything is written or compiled."""

    cfg: Any  # the config the run records in config.yaml (checks may resolve values in it)
    preprocessing: Preprocessing  # the contract the run trains under (preprocessing.json)
    context: Any = None  # whatever else the job's `train` takes from its checks
    # JSON files the run records beside config.yaml, file name -> value, that a resumed run must find
    # unchanged (finetuning: its cases per split; a store that gained cases would move one between them)
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Per store the run reads (--data, finetune's --unlabelled and --paste-into), (its key in CONTENT_RECORD, by
    # flag and position, never by path; the store as given; the content fingerprint of each case the run reads,
    # `content_fingerprint`): a store prepared again in place under the same ids (other labels, other images) passes
    # the records above, not this
    content: list[tuple[str, str, dict[str, str]]] = dataclasses.field(default_factory=list)


# The cases' content fingerprints of each store a run reads, by flag and position (never by path)
CONTENT_RECORD = "content.json"


def content_keys(prefix: str, stores: list[str]) -> list[tuple[str, str]]:
    """(record key, store) of each store of one flag, by position: --data's are store_1.., as first recorded."""
    return [(f"{prefix}_{i + 1}", s) for i, s in enumerate(stores)]


# What a resumed run may change: how long it trains, how often it logs, validates and checkpoints, and the
# devices it runs on (Orbax restores onto another mesh; accumulation and remat trade memory for time without
# changing the update). Everything else must equal the recorded config.yaml.
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.image_every", "train.profile_steps", "train.eval_every",
                     "train.accum_steps", "checkpoint", "mesh", "model.remat")


def _recorded(path: Path) -> Any:
    """A run's JSON record, or None when the run has none (it started before the record was kept)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise WorkdirError(f"{path}: not valid JSON; choose a new --workdir") from None


def check_resume_preprocessing(path: Path, prep: Preprocessing) -> None:
    """Refuse to resume a run under another preprocessing (the stores' contract, the spacing, the
    intensity normalisation, the patch) than the one its checkpoints were trained under: the run
    records one preprocessing, and the export applies it to every scan."""
    old = _recorded(path)
    if old is None:
        return
    check_unchanged(path, {"preprocessing": old}, {"preprocessing": prep}, ("preprocessing",), "was trained with",
                    "data and settings")


def check_resume_record(path: Path, value: Any) -> None:
    """Refuse to resume a run whose record `path` (e.g. splits.json) differs from `value` now. A run from
    before the record has none to compare."""
    old, new = _recorded(path), json.loads(json.dumps(value))
    if old is None or old == new:
        return
    keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) else []
    diffs = [f"{k} {len(old.get(k) or [])} -> {len(new.get(k) or [])} cases" if isinstance(new.get(k), list) else k
             for k in keys if old.get(k) != new.get(k)]
    raise WorkdirError(f"{path}: the run to resume recorded other {path.stem} ({'; '.join(diffs) or 'changed'}): its "
                       f"data changed since it started; resume with the data it had, or choose a new --workdir")


def content_record(content: list[tuple[str, str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    return {key: dict(sorted(cases.items())) for key, _, cases in content}


def check_resume_content(path: Path, content: list[tuple[str, str, dict[str, str]]]) -> None:
    """Refuse to resume a run one of whose cases (by id, in the same store key) has other content now than `path`
    records: it would go on training on other labels or images under the same ids. A run from before the record, or
    a store it does not record (an lnfm that recorded --data only), resumes unchecked (the resume records the content
    it reads from then on)."""
    old = _recorded(path)
    if old is None:
        log.info("the run to resume records no case content (%s: it started before lnfm kept one): resuming without "
                 "comparing the cases with those it started on; recorded now for later resumes", path.name)
        return
    if not isinstance(old, dict):
        raise WorkdirError(f"{path}: not a record of the cases' content; choose a new --workdir")
    if unrecorded := [key for key, _, cases in content if cases and key not in old]:
        log.info("the run to resume records no case content for %s (%s: it started before lnfm kept one): resuming "
                 "without comparing their cases; recorded now for later resumes", ", ".join(unrecorded), path.name)
    for key, store, cases in content:
        was = old.get(key) if isinstance(old.get(key), dict) else {}
        changed = sorted(cid for cid, fp in cases.items() if cid in was and was[cid] != fp)
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise WorkdirError(f"{path}: the run to resume recorded other content for case {changed[0]}{more} of "
                               f"{store} (prepared again since, from other images or labels): its data changed "
                               f"since it started; resume with the data it had, or choose a new --workdir")


def check_resume_steps(run: PretrainRun | FinetuneRun, steps: int) -> None:
    """Refuse to resume a run with fewer `train.steps` than its checkpoints reached: it trained no step and
    recorded the fewer in config.yaml. A resume may lengthen a run, not shorten it (no documented way does:
    the steps taken followed a learning-rate schedule over the longer run; a shorter one is a new run)."""
    # A corrupt newest step is not where the resume starts: restore falls back past it (`newest_intact_step`).
    reached = max((s for d in run.checkpoint_dirs() if (s := newest_intact_step(d, above=steps)) is not None),
                  default=0)
    if steps < reached:
        raise WorkdirError(f"{run.root}: the run to resume has reached step {reached}, beyond train.steps={steps}; a "
                           f"resumed run may lengthen a run, not shorten it: give train.steps={reached} or more, or "
                           f"choose a new --workdir")


def run_training_job(cfg: Any, run: PretrainRun | FinetuneRun, *, inputs: Mapping[str, Any],
                     resume_keys: tuple[str, ...], check: Callable[[Any], Checked],
                     train: Callable[[Checked, Any, jax.sharding.Mesh, MetricsWriter], dict | None],
                     tensorboard: bool = True,
                     check_memory: Callable[[Checked, jax.sharding.Mesh], None] | None = None,
                     derived_keys: tuple[str, ...] = ()) -> int:
    """The run every training job shares; returns the exit code (0: finished or preempted).

    The path rule (`inputs`: flag -> paths the workdir must stay apart from), then under the
    workdir lock: the resume check (the `resume_keys` config sections of a started run),
    the job's `check(cfg)` (data, splits, init; nothing written or compiled yet), then for a started
    run every resolved config value but RESUME_MAY_CHANGE and the job's `derived_keys`, and no fewer
    `train.steps` than it reached, the mesh and batch check (`cfg.mesh`, `cfg.train.global_batch`,
    `cfg.train.accum_steps`), the job's `check_memory(checked, mesh)` (lnfm.train.memory),
    config.yaml (a started run's once `fit` restored its checkpoint), the log and preprocessing.json,
    then `train(checked, run, mesh, writer)`.
    It returns the summary, or None when a signal stopped it (the same command resumes; no
    summary is written).
    summary.json gets the job's wall time and the sha256 of the config.yaml it ran with."""
    workdir = Path(run.root)
    pid = jax.process_index()
    check_apart({"--workdir": workdir}, inputs)
    with lock_folder(workdir, enabled=pid == 0), job_folder(workdir):  # a moved workdir ends the job, remade nowhere
        has_run = any(has_checkpoints(d) for d in run.checkpoint_dirs())
        check_resume(workdir, cfg, resume_keys, has_run=has_run)
        t0 = time.time()
        checked = check(cfg)
        if has_run:
            check_resume_settings(workdir, checked.cfg, RESUME_MAY_CHANGE, has_run=True, derived=derived_keys)
            check_resume_steps(run, checked.cfg.train.steps)
            check_resume_preprocessing(run.preprocessing, checked.preprocessing)
            for name, value in checked.records.items():
                check_resume_record(workdir / name, value)
            if checked.content:
                check_resume_content(workdir / CONTENT_RECORD, checked.content)
        mesh = make_mesh(checked.cfg.mesh)
        check_axes_used(dict(mesh.shape), checked.cfg.mesh.rules)
        tc = checked.cfg.train
        check_batch(tc.global_batch, tc.accum_steps, jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"])
        if check_memory is not None:  # a step this host cannot hold: refused here, not killed by the kernel later
            check_memory(checked, mesh)
        check_config_is_this_jobs(workdir, checked.cfg)
        # a started run's config.yaml is rewritten once its checkpoint restored (`fit`), not before
        with open_workdir(workdir, checked.cfg, is_main=pid == 0, tensorboard=tensorboard,
                          write_config=not has_run) as writer:
            if pid == 0:
                write_preprocessing(run.preprocessing, checked.preprocessing)
                for name, value in checked.records.items():
                    write_json(workdir / name, value)
                if checked.content:
                    write_json(workdir / CONTENT_RECORD, content_record(checked.content))
            summary = train(checked, run, mesh, writer)
            writer.record_config()  # `fit` did on resuming; a training that calls no `fit` records it here
            if summary is None:
                log.warning("preempted: rerun the same command to resume")  # into log.txt, which the with ends
        if summary is None:
            return 0
        if pid == 0:
            config_sha256 = hashlib.sha256(dump_yaml(checked.cfg).encode()).hexdigest()  # config.yaml's bytes
            write_json(run.summary, {**summary, "wall_time_s": time.time() - t0, "config_sha256": config_sha256})
        return 0
