"""Frozen-layer strategies through the jobs' real train step: exactly the named parameters train,
frozen ones carry no optimizer state and are bitwise unchanged after optimizer steps (though their
gradients are not zero), LLRD scales follow the unit index."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lnfm.segmentation.strategies import StrategyConfig, check_units, layer_index_fn, trainable_filter, unit_paths
from lnfm.train.optim import OptimConfig, layer_lr_scales, make_optimizer
from lnfm.train.state import create_train_state, merge_model, path_str, split_model
from lnfm.train.step import make_train_step


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(x + jnp.tanh(self.lin(x)))


class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(3, 4, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(3)])
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def units(self):
        return [self.embed, *self.blocks]

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.encoder = Encoder(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(x))


def _names(tree):
    return {path_str(p).rsplit("/value", 1)[0] for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _by_name(model) -> dict[str, np.ndarray]:
    """Every nnx.Param of the whole model (trainable or not) by name, copied to numpy."""
    return {path_str(p).rsplit("/value", 1)[0]: np.array(v)
            for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def _train(model, cfg, steps=3, weight_decay=0.0):
    """`steps` real optimizer steps of the jobs' train step (create_train_state + make_train_step)
    -> (Params before, Params after, trainable names, final optimizer state)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    nnx.update(model, jax.device_put(nnx.state(model), replicated))
    before = _by_name(model)
    filt = trainable_filter(model, cfg)
    trainable = nnx.state(model, nnx.All(nnx.Param, filt))
    layer_of, n = layer_index_fn(model)
    scales = layer_lr_scales(trainable, layer_of, n, cfg.llrd) if cfg.llrd != 1.0 else None
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=weight_decay), trainable, 10, 1,
                                  scales)
    graphdef, state, shardings = create_train_state(model, tx, 0, replicated, trainable=filt)

    def loss_fn(params, frozen, rest, batch, key):
        logits = merge_model(graphdef, params, frozen, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}

    step = make_train_step(loss_fn, tx, schedule, shardings, NamedSharding(mesh, PartitionSpec("data")))
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32), "y": jnp.arange(8) % 2}
    trained = _names(state["params"])
    for _ in range(steps):
        state, _ = step(state, batch)
    after = _by_name(merge_model(graphdef, state["params"], state["frozen"], state["rest"]))
    return before, after, trained, state["opt_state"]


def _full_grads(model) -> dict[str, np.ndarray]:
    """Gradients of the same loss with respect to every Param: frozen ones would move if they trained."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(8) % 2).mean()

    grads = jax.grad(loss)(params)
    return {path_str(p).rsplit("/value", 1)[0]: np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}


ALL = {"encoder/embed/kernel", "encoder/embed/bias", "encoder/norm/scale", "encoder/norm/bias",
       "head/kernel", "head/bias"} | {f"encoder/blocks/{i}/{m}/{p}" for i in range(3) for m, p in
                                      [("lin", "kernel"), ("lin", "bias"), ("norm", "scale"), ("norm", "bias")]}


def _expected_trainable(freeze, k):
    if freeze == "none":
        return ALL
    if freeze == "all":
        return {"head/kernel", "head/bias"}
    frozen_prefixes = ["encoder/embed/"] + [f"encoder/blocks/{i}/" for i in range(k - 1)]
    return {n for n in ALL if not any(n.startswith(p) for p in frozen_prefixes[:k])}


@pytest.mark.parametrize("freeze,k", [("all", 0), ("first_k", 1), ("first_k", 3), ("none", 0)])
def test_strategy_freezes_exactly_what_it_says(freeze, k):
    model = Toy(nnx.Rngs(0))
    grads = _full_grads(model)
    # Weight decay would move a frozen leaf that wrongly reached the optimizer even with a zero gradient.
    before, after, trained, opt_state = _train(model, StrategyConfig(freeze=freeze, k=k), weight_decay=0.1)
    expected = _expected_trainable(freeze, k)
    assert set(before) == set(after) == ALL
    assert trained == expected
    for name in sorted(ALL - expected):  # frozen: bitwise unchanged, though its gradient is not zero
        assert np.abs(grads[name]).max() > 0, name
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in sorted(expected):  # trainable: every leaf moved
        assert not np.array_equal(after[name], before[name]), name
    # Optimizer state exists only for trainable leaves: Adam moments have the params' structure.
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    assert _names(adam[0].mu) == expected and _names(adam[0].nu) == expected
    total = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim > 0)
    assert total == 2 * sum(before[n].size for n in expected)


def test_first_k_out_of_range():
    model = Toy(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"strategy.k=5 is outside 0..4"):
        trainable_filter(model, StrategyConfig(freeze="first_k", k=5))
    # the bound alone (finetuning checks it once the encoder is known; the section's ranges at load)
    check_units(StrategyConfig(freeze="first_k", k=4), 4)  # all 4 units frozen: allowed
    check_units(StrategyConfig(freeze="all", k=5), 4)  # k is read only with first_k
    with pytest.raises(ValueError, match=r"^strategy.k=5 is outside 0..4 \(the encoder has 4 units\)$"):
        check_units(StrategyConfig(freeze="first_k", k=5), 4)


def test_unit_paths_and_llrd_scales():
    model = Toy(nnx.Rngs(0))
    assert unit_paths(model) == [("encoder", "embed")] + [("encoder", "blocks", i) for i in range(3)]
    layer_of, n = layer_index_fn(model)
    assert n == 4
    _, params, _, _ = split_model(model, trainable_filter(model, StrategyConfig(freeze="none")))
    scales = layer_lr_scales(params, layer_of, n, 0.5)
    by_name = {path_str(p).rsplit("/value", 1)[0]: s for p, s in jax.tree_util.tree_leaves_with_path(scales)}
    assert by_name["head/kernel"] == 1.0
    assert by_name["encoder/norm/scale"] == 0.5  # after the last unit
    assert by_name["encoder/blocks/2/lin/kernel"] == 0.5
    assert by_name["encoder/blocks/0/lin/kernel"] == 0.5 ** 3
    assert by_name["encoder/embed/kernel"] == 0.5 ** 4


def test_llrd_changes_deep_layers_less():
    # Same gradients' sign pattern, smaller step for early units under LLRD.
    b_llrd, a_llrd, _, _ = _train(Toy(nnx.Rngs(0)), StrategyConfig(freeze="none", llrd=0.5), steps=1)
    b_flat, a_flat, _, _ = _train(Toy(nnx.Rngs(0)), StrategyConfig(freeze="none", llrd=1.0), steps=1)

    def moved(before, after, name):
        return float(np.abs(after[name] - before[name]).max())

    # Adam's first step moves each leaf by ~lr; the embedding unit is scaled by 0.5 ** 4.
    assert moved(b_llrd, a_llrd, "encoder/embed/kernel") == pytest.approx(
        moved(b_flat, a_flat, "encoder/embed/kernel") * 0.5 ** 4, rel=1e-3)
    assert moved(b_llrd, a_llrd, "head/kernel") == pytest.approx(moved(b_flat, a_flat, "head/kernel"), rel=1e-5)
