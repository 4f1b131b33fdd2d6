"""Strategies on the real segmenter (tiny ViT + linear probe): frozen leaves bitwise
unchanged and without optimizer state, trainable leaves changed, LoRA trains adapters only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lnfm.models import ModelConfig
from lnfm.models.lora import LoRAParam, apply_lora
from lnfm.models.segmenter import build_segmenter
from lnfm.segmentation.losses import LossConfig, segmentation_loss
from lnfm.segmentation.strategies import StrategyConfig, trainable_filter
from lnfm.train.optim import OptimConfig, make_optimizer
from lnfm.train.state import merge_model, path_str, split_model

CFG = ModelConfig(size="tiny", img_size=(16, 16, 16), patch_size=(8, 8, 8), depth=2)


def _model(freeze):
    model = build_segmenter(CFG, "linear", 2, nnx.Rngs(0))
    if freeze == "lora":
        apply_lora(model.encoder, 2, 4.0, rngs=nnx.Rngs(1))
    return model


def _names(tree):
    return {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("freeze,k", [("all", 0), ("first_k", 2), ("lora", 0)])  # "none": tests/segmentation/test_strategies.py
def test_segmenter_strategy(freeze, k):
    model = _model(freeze)
    units = model.encoder.units()
    graphdef, params, frozen, rest = split_model(model, trainable_filter(model, StrategyConfig(freeze=freeze, k=k)))
    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=0.0), params, 10, 1)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(2, 16, 16, 16, 1)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, 16, 16, 16)) > 0.7, jnp.int32)

    def loss_fn(p):
        return segmentation_loss(LossConfig(), merge_model(graphdef, p, frozen, rest)(x), y)

    p0, f0 = params, jax.tree.map(np.asarray, frozen)
    for _ in range(3):  # LoRA's A only gets gradients once B has moved off zero
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    names, frozen_names = _names(params), _names(frozen)
    assert names and not names & frozen_names
    head = {n for n in names | frozen_names if n.startswith("head/")}
    if freeze == "all":
        assert names == head
    elif freeze == "lora":
        lora = {path_str(p) for p, v in jax.tree_util.tree_leaves_with_path(
            nnx.state(model, LoRAParam))}
        assert lora and names == head | lora
    elif freeze == "first_k":
        assert len(units) >= 3
        assert any(n.startswith("encoder/embed/") for n in frozen_names)
        assert any(n.startswith("encoder/blocks/0/") for n in frozen_names)
        assert not any(n.startswith("encoder/blocks/1/") for n in frozen_names)
        assert head <= names
    else:
        assert not frozen_names
    for a, b in zip(jax.tree.leaves(f0), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(params)):
        assert not np.array_equal(np.asarray(a), np.asarray(b)), path_str(path)
    adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    assert _names(adam.mu) == names and _names(adam.nu) == names
