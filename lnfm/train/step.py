"""The train step: one `jax.jit` with explicit in/out shardings over the whole state pytree.

`loss_fn(params, frozen, rest, batch, key) -> (loss, aux)` is the only model-
specific piece; pretraining and finetuning both build their step here. The
step is a pure function of (state, batch): the PRNG key is derived from the
stored key and the step number, so a resumed run draws the same masks.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lnfm.config import ConfigError
from lnfm.train.optim import global_norm
from lnfm.train.state import TrainState, step_key

LossFn = Callable[[Any, Any, Any, Any, jax.Array], tuple[jax.Array, dict]]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast floating-point leaves to `dtype` (integer labels and keys untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _microbatches(batch: Any, accum: int, sharding: Any) -> Any:
    """(B, ...) leaves -> (accum, B/accum, ...), interleaved so every microbatch spans all devices."""
    def split(x):
        if x.shape[0] % accum:
            raise ConfigError(f"batch size {x.shape[0]} is not divisible by accum_steps={accum}")
        y = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(y, 0, 1)

    out = jax.tree.map(split, batch)
    if sharding is not None:
        spec = PartitionSpec(None, *sharding.spec)
        out = jax.lax.with_sharding_constraint(out, NamedSharding(sharding.mesh, spec))
    return out


def _scalars(aux: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if jnp.ndim(v) == 0}


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings: Any, batch_sharding: NamedSharding, *, accum_steps: int = 1,
                    compute_dtype: str = "float32", donate: bool = True
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Build `step(state, batch) -> (state, metrics)`; metrics are replicated float32 scalars.

    bf16 compute casts floating params and inputs inside the step; the master
    weights, gradients and optimizer state stay float32. A step whose loss or
    gradient is not finite leaves params and optimizer state unchanged.
    """
    if compute_dtype not in DTYPES:
        raise ConfigError(f"compute_dtype must be one of {list(DTYPES)}, got {compute_dtype!r}")
    dtype = DTYPES[compute_dtype]
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())

    def compute_loss(params, frozen, rest, batch, key):
        if dtype != jnp.float32:
            params, frozen, batch = cast_floating((params, frozen, batch), dtype)
        loss, aux = loss_fn(params, frozen, rest, batch, key)
        return loss.astype(jnp.float32), _scalars(aux)

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        key = step_key(state["rng"], state["step"])
        args = (state["frozen"], state["rest"])
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state["params"], *args, batch, key)
        else:
            micro = _microbatches(batch, accum_steps, batch_sharding)

            def body(carry, inputs):
                i, mb = inputs
                (l, a), g = grad_fn(state["params"], *args, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            mb0 = jax.tree.map(lambda x: x[0], micro)
            (l0, a0), g0 = jax.eval_shape(grad_fn, state["params"], *args, mb0, key)
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
            total, _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, total)
        grad_norm = global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = dict(state, step=state["step"] + 1, params=keep(params, state["params"]),
                         opt_state=keep(opt_state, state["opt_state"]))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
                   **aux}
        return new_state, metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,) if donate else ())
