"""The generic train loop: batches -> jitted step -> metrics, checkpoints, hooks, signals.

Shared by pretraining and finetuning. It owns no model logic:
- SIGTERM/SIGINT (preemption) let the current step finish, save, and return `preempted=True`;
  in a multi-process job the hosts agree on the stop step every `preempt_sync_every` steps
  (one small allgather then; a per-step allgather would sync host and devices every step).
- A non-finite loss raises `NonFiniteLoss` naming the step; it is checked before every
  save, so no checkpoint is written after a bad step.
- Metrics (loss, lr, grad norm, step time, volumes/s, tokens/s, MFU) go to the
  `MetricsWriter` every `log_every` steps; losses are read one step late so the host
  never stalls the device queue. Step time and MFU cover the steps only: time spent in
  hooks and checkpoint saves is excluded (the device is drained before them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lnfm.config import ConfigError
from lnfm.errors import NonFiniteLoss
from lnfm.train.checkpoint import Checkpointer
from lnfm.train.mfu import expected_step_time, mfu
from lnfm.workdir import MetricsWriter, atomic_write_text, check_job_folder, progress

log = logging.getLogger("lnfm.train")


@dataclasses.dataclass
class Hook:
    """Call `fn(step, state)` after every `every` steps (0 disables)."""

    every: int
    fn: Callable[[int, Any], None]


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool
    metrics: dict  # the values (loss, ...) of the last step run; empty when no step ran (a finished run resumed)
    # seconds in the run's steps, over every call that resumed it (each checkpoint records the sum so far, in
    # TRAIN_TIME_FILE); first-step compilations included, hooks and saves not
    train_s: float = 0.0


TRAIN_TIME_FILE = "train_time.json"  # in a checkpoint's step folder: {"train_s": the run's step seconds so far}


def trim_metrics(workdir: str | Path, step: int) -> None:
    """On resume, drop metrics.jsonl rows of steps after the restored checkpoint (they are redone)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'A:B' -> (A, B): trace steps A..B-1 (empty -> None)."""
    if not text:
        return None
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"profile steps must look like A:B (e.g. 10:15), got {text!r}") from None
    if not 0 <= a < b:
        raise ConfigError(f"profile steps A:B need 0 <= A < B, got {text!r}")
    return a, b


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a second SIGINT still kills).

    With several processes the hosts must stop on the same step, so they exchange
    their flags, but only every `sync_every` steps: the allgather waits for the
    device queue, and doing it every step would cancel the loop's pipelining.
    """

    def __init__(self, sync_every: int = 10) -> None:
        if sync_every < 1:
            raise ValueError(f"preemption sync interval must be >= 1 step, got {sync_every}")
        self.sync_every = sync_every
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: finishing the current step, then saving", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def should_stop(self, step: int) -> bool:
        """True once this process was signalled (one process), or on the first sync step
        after any process was signalled (several processes; the same step on all)."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.asarray(flags).any())


@dataclasses.dataclass
class Throughput:
    """What one step processes, for volumes/s, tokens/s and MFU."""

    volumes_per_step: int
    tokens_per_step: int
    flops_per_step: float | None

    @property
    def predicted_step_time(self) -> float | None:
        """The scale planner's estimate (model FLOPs at its assumed MFU); None on CPUs."""
        return expected_step_time(self.flops_per_step, jax.devices()[0].device_kind, jax.device_count())

    def metrics(self, step_time: float) -> dict:
        dev = jax.devices()[0]
        out = {"step_time": step_time, "volumes_per_s": self.volumes_per_step / step_time,
               "tokens_per_s": self.tokens_per_step / step_time,
               "mfu": mfu(self.flops_per_step, step_time, dev.device_kind, jax.device_count())}
        if self.predicted_step_time is not None:
            out["predicted_step_time"] = self.predicted_step_time
        return out


def run_loop(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, next_batch: Callable[[], Any], *,
             start_step: int, total_steps: int, writer: MetricsWriter, throughput: Throughput,
             checkpointer: Checkpointer | None = None, ckpt_every: int = 0, data_iter: Any = None,
             config: dict | None = None, log_every: int = 10, hooks: tuple[Hook, ...] = (),
             profile: tuple[int, int] | None = None, profile_dir: str | Path | None = None,
             desc: str = "train", preempt_sync_every: int = 10, prior_train_s: float = 0.0) -> LoopResult:
    """Run steps start_step .. total_steps-1. `next_batch()` returns the next global batch.

    `data_iter` is the Grain iterator behind `next_batch`; its position is saved
    with every checkpoint so a resumed run sees the same data order. `prior_train_s`: the step seconds
    of the calls before this one (the restored checkpoint's TRAIN_TIME_FILE).
    """
    pending: tuple[int, dict] | None = None
    last: dict = {}
    timer = {"t": None, "step": start_step, "excluded": 0.0}  # excluded: hook and save seconds
    outside = [0.0]  # every hook and save second of this call (train_s leaves them out)
    loop_t0 = time.perf_counter()
    saved_step = start_step if checkpointer is not None and start_step in checkpointer.all_steps() else -1
    bar = progress(total=total_steps, initial=start_step, desc=desc, disable=jax.process_index() != 0)

    def check(done: int, metrics: dict) -> dict:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(f"loss is {values['loss']} at step {done}; stopping "
                                f"(the last good checkpoint is kept)")
        return values

    def finish(done: int, metrics: dict) -> None:
        values = check(done, metrics)
        last.clear()
        last.update(values)
        now = time.perf_counter()
        if timer["t"] is None:  # the first step includes compilation: start timing after it
            timer["t"], timer["step"] = now, done
        bar.set_postfix(loss=values["loss"])
        if done % log_every == 0 or done == total_steps:
            extra: dict = {}
            if done > timer["step"]:
                busy = now - timer["t"] - timer["excluded"]
                extra = throughput.metrics(busy / (done - timer["step"]))
                timer["t"], timer["step"], timer["excluded"] = now, done, 0.0
            writer.write(done, **values, **extra)

    def outside_step_time(fn: Callable[[], None]) -> None:
        """Run a hook or save with its wall time excluded from the step time (and MFU).

        The device queue is drained first, so the steps' own compute is still counted.
        """
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        fn()
        outside[0] += time.perf_counter() - t0
        if timer["t"] is not None:
            timer["excluded"] += time.perf_counter() - t0

    def save(done: int) -> None:
        nonlocal saved_step
        if checkpointer is not None and done != saved_step:
            def write() -> None:  # run after the device queue drained: the steps' seconds up to this save
                so_far = prior_train_s + time.perf_counter() - loop_t0 - outside[0]
                record = {TRAIN_TIME_FILE: json.dumps({"train_s": so_far})}
                checkpointer.save(done, state, data_iter, config, files=record)
            outside_step_time(write)
            saved_step = done

    step = start_step
    preempted = False
    tracing = False
    if throughput.predicted_step_time is not None:
        log.info("planner's expected step time: %.1f ms", throughput.predicted_step_time * 1e3)
    with PreemptionGuard(preempt_sync_every) as guard:
        try:
            while step < total_steps:
                if profile is not None and not tracing and profile[0] <= step < profile[1]:
                    check_job_folder(profile_dir, "a profile")  # the trace would remake a moved workdir
                    jax.profiler.start_trace(str(profile_dir))
                    tracing = True
                batch = next_batch()
                state, metrics = step_fn(state, batch)
                step += 1
                if tracing and step >= profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    tracing = False
                if pending is not None:
                    finish(*pending)
                pending = (step, metrics)
                bar.update(1)
                for hook in hooks:
                    if hook.every and step % hook.every == 0:
                        outside_step_time(lambda: hook.fn(step, state))
                if ckpt_every and step % ckpt_every == 0:
                    finish(*pending)
                    pending = None
                    save(step)
                if guard.should_stop(step):
                    preempted = step < total_steps
                    break
            if pending is not None:
                finish(*pending)
                pending = None
            save(step)
        finally:
            if tracing:
                jax.profiler.stop_trace()
            bar.close()
            writer.flush()
            if checkpointer is not None:
                checkpointer.wait()
    train_s = time.perf_counter() - loop_t0 - outside[0]
    if preempted:
        log.warning("stopped by signal after step %d; checkpoint saved", step)
    return LoopResult(state, step, preempted, dict(last), prior_train_s + train_s)
