"""The tail every training job shares: batch checks, device batches, and `fit` (checkpointer,
resume, the loop under the mesh's sharding rules), so pretraining and finetuning differ only
in what they build and what they do with the trained state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lnfm.config import ConfigError
from lnfm.models.sharding import use_rules
from lnfm.runs import CHECKPOINTS
from lnfm.train.checkpoint import CheckpointConfig, Checkpointer
from lnfm.train.loop import Hook, LoopResult, Throughput, run_loop, trim_metrics
from lnfm.train.state import abstract_state
from lnfm.workdir import MetricsWriter

log = logging.getLogger("lnfm.train")


def check_batch(global_batch: int, accum_steps: int, nproc: int, batch_shards: int) -> None:
    """The global batch must split evenly over processes and over batch shards x microbatches."""
    if global_batch % nproc:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by {nproc} processes")
    if global_batch % (batch_shards * accum_steps):
        raise ConfigError(f"train.global_batch={global_batch} must be a multiple of the {batch_shards} batch "
                          f"shards (mesh data x fsdp) times train.accum_steps={accum_steps}")


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
    they are redone), run the loop to `total_steps` under the mesh's sharding rules, close the
    checkpointer. `on_resume(step)` runs before the first step with the step training starts at."""
    ckpt = Checkpointer(workdir / CHECKPOINTS, checkpoint)
    restored = ckpt.restore_latest(abstract_state(state, shardings), data_iter)
    start = 0
    if restored is not None:
        state, start = restored
        log.info("resumed from step %d", start)
        if jax.process_index() == 0:
            trim_metrics(workdir, start)
    if on_resume is not None:
        on_resume(start)
    try:
        with use_rules(mesh, rules):
            return run_loop(step_fn, state, next_batch, start_step=start, total_steps=total_steps, writer=writer,
                            throughput=throughput, checkpointer=ckpt, ckpt_every=checkpoint.every,
                            data_iter=data_iter, config=config, log_every=log_every, hooks=hooks, profile=profile,
                            profile_dir=workdir / "profile", desc=desc)
    finally:
        ckpt.close()
