"""Heads by name, and their size and cost reports."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models import onednn
from lnfm.models.heads.fine import FineHead
from lnfm.models.heads.light import LightHead
from lnfm.models.heads.linear import LinearProbe
from lnfm.models.heads.unetr import UNETRHead


def head_param_count(head: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param, adapters included) in `head`."""
    return int(sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(head, nnx.Param))))


def head_flops(head: nnx.Module, input_shape: Sequence[int]) -> float:
    """Forward FLOPs of `head` for images of `input_shape` (B, X, Y, Z, C) and the matching
    feature grids, from XLA's cost analysis of the lowered (uncompiled) computation."""
    b, *spatial, c = input_shape
    images = jax.ShapeDtypeStruct((b, *spatial, c), jnp.float32)
    feats = [jax.ShapeDtypeStruct((b, *(n // s for n, s in zip(spatial, st)), ch), jnp.float32)
             for st, ch in zip(head.feature_strides, head.feature_channels)]
    graphdef, state = nnx.split(head)

    def forward(state, images, feats):
        return nnx.merge(graphdef, state)(images, feats)

    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with onednn.disabled():  # XLA counts no FLOPs inside a custom call
        cost = jax.jit(forward).lower(abstract_state, images, feats).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


HEADS = {"unetr": UNETRHead, "light": LightHead, "fine": FineHead, "linear": LinearProbe}


# keyword arguments build_head sets itself (not `head.options`)
_BUILD_ARGS = {"deep_supervision", "rngs", "dtype", "param_dtype"}


def head_options(name: str) -> list[str]:
    """The keyword arguments `name`'s constructor takes as options (`head.options` keys), from its signature."""
    params = inspect.signature(HEADS[name].__init__).parameters.values()
    return [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in _BUILD_ARGS]


def build_head(name: str, feature_strides, feature_channels, in_channels: int, num_classes: int, *,
               deep_supervision: bool = False, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               **kwargs) -> nnx.Module:
    """Head by name: 'unetr', 'light', 'fine' or 'linear'; extra keyword arguments go to its constructor."""
    if name not in HEADS:
        raise ValueError(f"unknown head '{name}' (choices: {', '.join(HEADS)})")
    cls = HEADS[name]
    return cls(feature_strides, feature_channels, in_channels, num_classes, deep_supervision=deep_supervision,
               rngs=rngs, dtype=dtype, param_dtype=param_dtype, **kwargs)
