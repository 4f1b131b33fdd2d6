"""Logical-axis sharding: one rule table maps parameter/activation names to the mesh.

Every parameter is created with logical axis names (see `lnfm.models.layers`).
`RULES` maps those names onto the mesh axes ('data', 'fsdp', 'tensor'); picking a
different table switches between pure data parallel, FSDP (ZeRO-3 style) and
FSDP + tensor parallel without touching model code.

Usage:
    mesh = make_mesh(MeshConfig(fsdp=8))
    model = create_sharded_model(lambda: build_encoder(cfg, nnx.Rngs(0)), mesh, "fsdp")
    with use_rules(mesh, "fsdp"):
        out = jax.jit(fn)(model, jax.device_put(x, batch_sharding(mesh)))
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lnfm.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical names. Parameters: embed (model width), mlp (MLP hidden), qkv (packed
# q/k/v outputs), heads (attention output = heads x head_dim), patch (voxels per
# patch / input channels), pos (position table rows), norm (LayerNorm vectors).
# Activations: batch, length (tokens), act_embed (width of the residual stream),
# act_heads (the heads axis inside attention).
_COMMON = (("batch", BATCH_AXES), ("length", None), ("act_embed", None),
           ("patch", None), ("pos", None), ("norm", None),
           ("conv_in", None), ("conv_out", None))  # decoder-head convolutions: small, replicated

RULES: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    # Parameters replicated; batch split over every device.
    "dp": _COMMON + (("embed", None), ("mlp", None), ("qkv", None), ("heads", None), ("act_heads", None)),
    # Parameters split along their width axis over 'fsdp' (gathered per layer by XLA).
    "fsdp": _COMMON + (("embed", "fsdp"), ("mlp", None), ("qkv", None), ("heads", None), ("act_heads", None)),
    # FSDP plus Megatron-style tensor parallel MLP and attention over 'tensor': the packed
    # qkv axis is head-major, so its 'tensor' shards hold whole heads and attention
    # activations ('act_heads') stay split by heads.
    "fsdp_tp": _COMMON + (("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"), ("heads", "tensor"),
                          ("act_heads", "tensor")),
}


@dataclass
class MeshConfig:
    """Device mesh and sharding rules (`mesh:` section)."""

    data: int = -1  # data-parallel replicas; -1 takes the devices left after fsdp x tensor
    fsdp: int = 1  # parameter-sharding (ZeRO-3) group size
    tensor: int = 1  # tensor-parallel group size
    rules: str = "fsdp"  # rule table in lnfm.models.sharding.RULES: dp, fsdp, fsdp_tp


def _rule_table(rules: str | tuple) -> tuple:
    if isinstance(rules, str):
        if rules not in RULES:
            raise ConfigError(f"mesh.rules: unknown sharding rules '{rules}' (choices: {', '.join(RULES)})")
        return RULES[rules]
    return tuple(rules)


def mesh_axes_used(rules: str | tuple) -> frozenset[str]:
    """The mesh axes this rule table shards something over (parameters, activations or the batch). A mesh
    axis it never names splits nothing: its devices hold copies and repeat the same work."""
    used: set[str] = set()
    for _, axes in _rule_table(rules):
        used.update((axes,) if isinstance(axes, str) else (axes or ()))
    return frozenset(used)


def idle_axes(sizes: dict[str, int], rules: str | tuple) -> list[str]:
    """The mesh axes of more than one device that `rules` shards nothing over: their devices repeat the same work."""
    used = mesh_axes_used(rules)
    return [axis for axis, size in sizes.items() if size > 1 and axis not in used]


def rules_using(axes: list[str]) -> list[str]:
    """The rule tables that shard over every one of `axes` (what to suggest for an idle axis)."""
    return [name for name in RULES if set(axes) <= mesh_axes_used(name)]


def check_mesh(cfg: MeshConfig) -> None:
    """The mesh section's values, before any device is counted: group sizes of at least 1, a known rule table."""
    for name in ("fsdp", "tensor"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"mesh.{name} must be at least 1 (a group size), got {getattr(cfg, name)}")
    if cfg.data < 1 and cfg.data != -1:
        raise ConfigError(f"mesh.data must be at least 1, or -1 (the devices left after fsdp x tensor), got {cfg.data}")
    _rule_table(cfg.rules)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'tensor') and Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    check_mesh(cfg)
    fixed = cfg.fsdp * cfg.tensor
    data = len(devices) // fixed if cfg.data == -1 else cfg.data
    if data < 1 or data * fixed != len(devices):
        raise ConfigError(f"mesh data={cfg.data} x fsdp={cfg.fsdp} x tensor={cfg.tensor} does not match "
                          f"{len(devices)} devices")
    grid = np.asarray(devices).reshape(data, cfg.fsdp, cfg.tensor)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_mesh_spec(names, rules: str | tuple) -> PartitionSpec:
    """Logical names (a tuple, one per array axis) -> mesh PartitionSpec."""
    table = dict(_rule_table(rules))
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name not in table:
            raise ValueError(f"logical axis '{name}' has no entry in the sharding rules")
        else:
            out.append(table[name])
    return PartitionSpec(*out)


def logical_shards(name: str, sizes: dict[str, int], rules: str | tuple) -> int:
    """How many pieces `rules` cuts the logical axis `name` into on a mesh of these axis sizes (1 where it
    maps to no mesh axis): what divides that axis's bytes per device."""
    axes = logical_to_mesh_spec((name,), rules)[0]
    return math.prod(sizes.get(ax, 1) for ax in ((axes,) if isinstance(axes, str) else (axes or ())))


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_mesh_sharding(logical_spec_tree, mesh: Mesh, rules: str | tuple):
    """Tree of logical PartitionSpecs (e.g. `nnx.get_partition_spec(state)`) -> NamedSharding tree."""
    return jax.tree.map(lambda p: NamedSharding(mesh, logical_to_mesh_spec(tuple(p), rules)),
                        logical_spec_tree, is_leaf=_is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for a batch: leading axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def state_sharding(state, mesh: Mesh, rules: str | tuple):
    """NamedSharding tree for an nnx State (abstract or concrete) from its logical names."""
    return logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, rules)


def create_sharded_model(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: str | tuple) -> nnx.Module:
    """Build a model with every parameter created directly in its mesh sharding.

    `build_fn()` constructs the model (it must build its own `nnx.Rngs`). The
    construction runs under `jax.jit` with out_shardings, so no parameter ever
    exists unsharded on one device.
    """
    abstract = nnx.eval_shape(build_fn)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_sharding(abs_state, mesh, rules)

    def init():
        return nnx.state(build_fn())

    with use_rules(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_sharded_model(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: str | tuple) -> nnx.Module:
    """`create_sharded_model` without allocating: every variable a ShapeDtypeStruct carrying
    the sharding the real model would get (what the scale planner compiles against)."""
    graphdef, abs_state = nnx.split(nnx.eval_shape(build_fn))
    shardings = state_sharding(abs_state, mesh, rules)
    return nnx.merge(graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                            abs_state, shardings))


_ACTIVE: list[tuple] = []


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | tuple) -> Iterator[None]:
    """Activate a mesh and rule table for tracing: activation constraints resolve through it."""
    table = _rule_table(rules)
    _ACTIVE.append(table)
    try:
        with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(table):
            yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Sharding constraint from logical names; a no-op outside `use_rules`."""
    if not _ACTIVE or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(names, _ACTIVE[-1]))
