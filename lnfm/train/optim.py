"""AdamW with warmup + cosine, global-norm clipping, decay masks and per-leaf LR scales.

The optimizer sees only the trainable parameters: frozen parameters live in a
separate pytree of the train state (see `lnfm.train.state`), so they carry no
Adam moments at all. Layer-wise LR decay for finetuning is a per-leaf scale
pytree built by `layer_lr_scales` and passed as `lr_scales`. `optim.ema_decay` adds
`params_ema`, whose state (checkpointed with the rest) holds the parameters' moving average.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lnfm.config import ConfigError, check_in, unread_in_mode
from lnfm.train.state import path_str


# The models' learned position / bias tables and special tokens (ViT `pos_table`, `cls_token`;
# Swin `relative_position_bias_table`; MAE / SimMIM `mask_token`): decay would pull them to zero.
NO_DECAY = ("pos_table", "relative_position_bias_table", "cls_token", "mask_token")


@dataclasses.dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # LR per 256 samples: peak lr = base_lr * global_batch / 256
    lr: float | None = None  # absolute peak LR; when set it replaces the base_lr scaling
    schedule: Literal["cosine", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 1000  # linear warmup from 0 (capped at the run length)
    min_lr_ratio: float = 0.0  # final LR as a fraction of the peak (cosine)
    weight_decay: float = 0.05  # decoupled AdamW weight decay
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    no_decay: tuple[str, ...] = NO_DECAY  # exact parameter path parts without decay (1-D leaves: never)
    layer_decay: float = 1.0  # read by no job (finetuning: strategy.llrd); only 1.0, for old config.yaml
    ema_decay: float = 0.0  # finetuning: validate, keep and export the params' moving average; 0 = off


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 256.0


def make_schedule(cfg: OptimConfig, total_steps: int, global_batch: int) -> optax.Schedule:
    """Linear warmup to the peak LR, then cosine to min_lr_ratio * peak (or constant)."""
    peak = peak_lr(cfg, global_batch)
    warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    else:
        rest = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup), alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return rest
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rest], [warmup])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
    """True where weight decay applies: leaves with >= 2 dims none of whose path parts
    ('encoder', 'embed', 'pos_table', 'value', ...) is named in `no_decay`. Parts match
    exactly, so a name matches the models' real attributes or nothing."""
    skip = set(no_decay)

    def keep(path, leaf):
        return leaf.ndim >= 2 and not skip.intersection(path_str(path).split("/"))

    return jax.tree_util.tree_map_with_path(keep, params)


def layer_lr_scales(params: Any, layer_of: Callable[[str], int], num_layers: int, decay: float) -> Any:
    """Per-leaf LR factor decay ** (num_layers - layer) for layer-wise LR decay.

    `layer_of(path)` maps a parameter path like 'encoder/blocks/3/attn/kernel' to
    0 (embeddings) .. num_layers (head); deeper layers get larger factors.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, _: float(decay ** (num_layers - layer_of(path_str(p)))), params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf factor."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


class ParamsEMAState(NamedTuple):
    count: jax.Array  # updates averaged so far
    ema: Any  # the moving average of the parameters after each update


def check_ema_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:  # NaN fails too
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 = off), got {decay:g}")


def unread_keys(cfg: OptimConfig) -> dict[str, str]:
    """The optim keys cfg.schedule never reads -> why (`lnfm.config.refuse_unread`)."""
    return unread_in_mode("optim", "schedule", cfg.schedule, {"min_lr_ratio": ("cosine",)})


def check_optim(cfg: OptimConfig) -> None:
    """The `optim` section's ranges, the one place they are checked (jobs call it before anything is
    written; `make_optimizer` calls it too): each refusal names the key and its valid range."""
    need = functools.partial(check_in, "optim", cfg)  # need(name, ok, interval, what="")

    # 0 is allowed: the weights as initialised, trained through the same run (an untrained baseline)
    if cfg.lr is not None:
        need("lr", lambda v: v >= 0, "[0, inf)", " (the peak learning rate)")
    else:
        need("base_lr", lambda v: v >= 0, "[0, inf)", " (the peak learning rate per 256 samples)")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be at least 0, got {cfg.warmup_steps}")
    need("min_lr_ratio", lambda v: 0 <= v <= 1, "[0, 1]", " (the final LR as a fraction of the peak)")
    need("weight_decay", lambda v: v >= 0, "[0, inf)", " (0 = off)")
    need("b1", lambda v: 0 <= v < 1, "[0, 1)")
    need("b2", lambda v: 0 <= v < 1, "[0, 1)")
    need("eps", lambda v: v > 0, "(0, inf)")
    need("clip_norm", lambda v: v >= 0, "[0, inf)", " (0 = off)")
    if cfg.layer_decay != 1.0:  # no job reads it: finetuning's layer-wise decay is strategy.llrd
        raise ConfigError(f"optim.layer_decay={cfg.layer_decay:g} is not used by any job; set strategy.llrd "
                          f"(finetuning's layer-wise LR decay, in (0, 1]) instead")
    check_ema_decay(cfg.ema_decay)


def params_ema(decay: float) -> optax.GradientTransformation:
    """Last link of a chain: passes the updates through and keeps, in its state, the moving average of
    the parameters they produce (Polyak averaging). The decay ramps up as min(decay, (1 + n) / (10 + n))
    after n updates, so the average follows the early, fast-moving weights instead of the initial ones."""
    check_ema_decay(decay)

    def init(params):
        # a copy: the state must not share buffers with the params, which the step donates
        return ParamsEMAState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params_ema needs the params (tx.update(grads, state, params))")
        d = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, new)
        return updates, ParamsEMAState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
    """The parameters' moving average held by `params_ema` in an optimizer state, or None without one."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEMAState))
             if isinstance(s, ParamsEMAState)]
    return found[0].ema if found else None


def make_optimizer(cfg: OptimConfig, params: Any, total_steps: int, global_batch: int,
                   lr_scales: Any | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW for the trainable `params` pytree; returns (transformation, lr schedule)."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    check_optim(cfg)
    schedule = make_schedule(cfg, total_steps, global_batch)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params, cfg.no_decay)))
    if lr_scales is not None:
        parts.append(scale_by_tree(lr_scales))
    parts.append(optax.scale_by_learning_rate(schedule))
    if cfg.ema_decay:
        parts.append(params_ema(cfg.ema_decay))
    return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))

