"""The train state: one pytree of arrays (step, params, opt_state, rng, frozen, rest).

An NNX model is split into a static `graphdef` (kept by the caller, closed over
by the loss function) and array states:
- `params`: trainable parameters, the only leaves the optimizer sees;
- `frozen`: parameters excluded from training (no gradients, no Adam moments);
- `rest`: every other variable (e.g. normalisation statistics).
The RNG is stored as raw key data (uint32) so it checkpoints like any array.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

TrainState = dict  # keys: step, params, opt_state, rng, frozen, rest


def path_str(path: tuple) -> str:
    """jax key path -> 'encoder/blocks/0/attn/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def split_model(model: nnx.Module, trainable: Any = nnx.Param) -> tuple[nnx.GraphDef, Any, Any, Any]:
    """model -> (graphdef, trainable params, frozen params, other variables)."""
    graphdef, params, frozen, rest = nnx.split(model, nnx.All(nnx.Param, trainable), nnx.Param, ...)
    return graphdef, params, frozen, rest


def merge_model(graphdef: nnx.GraphDef, params: Any, frozen: Any, rest: Any) -> nnx.Module:
    return nnx.merge(graphdef, params, frozen, rest)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        replicated: jax.sharding.Sharding) -> Any:
    """Shardings for tx.init(params): parameter-shaped subtrees follow the params, the rest replicate."""
    abstract = jax.eval_shape(tx.init, params)
    params_def = jax.tree.structure(params)

    def is_params_like(node: Any) -> bool:
        return jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda node: param_shardings if is_params_like(node) else jax.tree.map(lambda _: replicated, node),
        abstract, is_leaf=is_params_like)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
                       replicated: jax.sharding.Sharding, trainable: Any = nnx.Param
                       ) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Split `model` (already sharded) and build the state; returns (graphdef, state, shardings).

    A model of ShapeDtypeStructs (`models.sharding.abstract_sharded_model`) gives the same
    state as ShapeDtypeStructs carrying their shardings: nothing is allocated."""
    graphdef, params, frozen, rest = split_model(model, trainable)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = opt_state_shardings(tx, params, param_sh, replicated)
    shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated,
                 "frozen": jax.tree.map(lambda x: x.sharding, frozen),
                 "rest": jax.tree.map(lambda x: x.sharding, rest)}
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                  "opt_state": jax.eval_shape(tx.init, params),
                  "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(seed))), "frozen": frozen,
                  "rest": rest}
        return graphdef, abstract_state(shapes, shardings), shardings
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = {"step": step, "params": params, "opt_state": opt_state, "rng": rng, "frozen": frozen, "rest": rest}
    return graphdef, state, shardings


def abstract_state(state: TrainState, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (the restore target for Orbax)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The per-step PRNG key: a pure function of the stored seed key and the step number."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)
