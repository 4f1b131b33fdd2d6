"""Frozen-layer strategies: exactly the named parameters train, frozen ones carry no
optimizer state and are bitwise unchanged, LLRD scales follow the unit index."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lnfm.segmentation.strategies import StrategyConfig, layer_index_fn, trainable_filter, unit_paths
from lnfm.train.optim import OptimConfig, layer_lr_scales, make_optimizer
from lnfm.train.state import merge_model, path_str, split_model


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


def _train(model, cfg, steps=3):
    graphdef, params, frozen, rest = split_model(model, trainable_filter(model, cfg))
    layer_of, n = layer_index_fn(model)
    scales = layer_lr_scales(params, layer_of, n, cfg.llrd) if cfg.llrd != 1.0 else None
    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), params, 10, 1, scales)
    opt_state = tx.init(params)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    y = jnp.arange(8) % 2

    def loss_fn(p):
        logits = merge_model(graphdef, p, frozen, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    before = (params, frozen)
    for _ in range(steps):
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return before, (params, frozen), opt_state


ALL = {"encoder/embed/kernel", "encoder/embed/bias", "encoder/norm/scale", "encoder/norm/bias",
       "head/kernel", "head/bias"} | {f"encoder/blocks/{i}/{m}/{p}" for i in range(3)
                                      for m, p in [("lin", "kernel"), ("lin", "bias"), ("norm", "scale"), ("norm", "bias")]}


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
    cfg = StrategyConfig(freeze=freeze, k=k)
    (p0, f0), (p1, f1), opt_state = _train(model, cfg)
    expected = _expected_trainable(freeze, k)
    assert _names(p0) == expected
    assert _names(f0) == ALL - expected
    # Frozen leaves: bitwise unchanged. Trainable leaves: every one moved.
    for a, b in zip(jax.tree.leaves(f0), jax.tree.leaves(f1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p1)):
        assert not np.array_equal(np.asarray(a), np.asarray(b)), path_str(path)
    # Optimizer state exists only for trainable leaves: Adam moments have the params' structure.
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    assert _names(adam[0].mu) == expected and _names(adam[0].nu) == expected
    total = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim > 0)
    assert total == 2 * sum(x.size for x in jax.tree.leaves(p0))


def test_first_k_out_of_range():
    model = Toy(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"strategy.k=5 is outside 0..4"):
        trainable_filter(model, StrategyConfig(freeze="first_k", k=5))


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
    model = Toy(nnx.Rngs(0))
    (p0, _), (p1, _), _ = _train(model, StrategyConfig(freeze="none", llrd=0.5), steps=1)
    model2 = Toy(nnx.Rngs(0))
    (q0, _), (q1, _), _ = _train(model2, StrategyConfig(freeze="none", llrd=1.0), steps=1)
    d_llrd = float(jnp.abs(p1["encoder"]["embed"]["kernel"][...] - p0["encoder"]["embed"]["kernel"][...]).max())
    d_flat = float(jnp.abs(q1["encoder"]["embed"]["kernel"][...] - q0["encoder"]["embed"]["kernel"][...]).max())
    h_llrd = float(jnp.abs(p1["head"]["kernel"][...] - p0["head"]["kernel"][...]).max())
    h_flat = float(jnp.abs(q1["head"]["kernel"][...] - q0["head"]["kernel"][...]).max())
    # Adam's first step moves each leaf by ~lr; the embedding unit is scaled by 0.5 ** 4.
    assert d_llrd == pytest.approx(d_flat * 0.5 ** 4, rel=1e-3)
    assert h_llrd == pytest.approx(h_flat, rel=1e-5)
