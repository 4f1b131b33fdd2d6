"""Strategies on the real segmenter (tiny ViT + linear probe) through the jobs' train step: after real
optimizer steps the frozen leaves are bitwise unchanged (though their gradients are not zero) and carry
no optimizer state, every trainable leaf changed, LoRA trains its adapters and the head only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lnfm.models import ModelConfig
from lnfm.models.lora import LoRAParam, apply_lora
from lnfm.models.segmenter import build_segmenter
from lnfm.segmentation.losses import LossConfig, segmentation_loss
from lnfm.segmentation.strategies import StrategyConfig, trainable_filter
from lnfm.train.optim import OptimConfig, make_optimizer
from lnfm.train.state import create_train_state, merge_model, path_str
from lnfm.train.step import make_train_step

CFG = ModelConfig(size="tiny", img_size=(16, 16, 16), patch_size=(8, 8, 8), depth=2)


def _model(freeze):
    model = build_segmenter(CFG, "linear", 2, nnx.Rngs(0))
    if freeze == "lora":
        apply_lora(model.encoder, 2, 4.0, rngs=nnx.Rngs(1))
    return model


def _names(tree):
    return {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _params(model, kind=nnx.Param) -> dict[str, np.ndarray]:
    return {path_str(p): np.array(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, kind))}


def _batch():
    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.uniform(size=(2, 16, 16, 16, 1)), jnp.float32),
            "label": jnp.asarray(rng.uniform(size=(2, 16, 16, 16)) > 0.7, jnp.int32)}


def _grads(model, batch) -> dict[str, np.ndarray]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: segmentation_loss(LossConfig(), nnx.merge(graphdef, p, rest)(batch["image"]),
                                                 batch["label"]))(params)
    return {path_str(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}


def _expected_frozen(names: set[str], freeze: str, k: int) -> set[str]:
    """What the strategy promises, from the parameter names alone (docs/finetuning.md)."""
    enc = {n for n in names if n.startswith("encoder/")}
    if freeze == "all":
        return enc
    if freeze == "lora":  # the base weights of the encoder; its LoRA adapters train
        return {n for n in enc if "/lora_" not in n}
    units = ["encoder/embed/"] + [f"encoder/blocks/{i}/" for i in range(CFG.depth)] + ["encoder/norm/"]
    return {n for n in enc if any(n.startswith(u) for u in units[:k])}


@pytest.mark.parametrize("freeze,k", [("all", 0), ("first_k", 2), ("lora", 0)])  # "none": test_strategies.py
def test_segmenter_strategy(freeze, k):
    model = _model(freeze)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    nnx.update(model, jax.device_put(nnx.state(model), replicated))
    batch = _batch()
    before, grads = _params(model), _grads(model, batch)
    lora = set(_params(model, LoRAParam))
    filt = trainable_filter(model, StrategyConfig(freeze=freeze, k=k))
    trainable = nnx.state(model, nnx.All(nnx.Param, filt))
    # Weight decay would move a frozen leaf that wrongly reached the optimizer, whatever its gradient.
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.05, no_decay=(),
                                              clip_norm=0.0), trainable, 10, 1)
    graphdef, state, shardings = create_train_state(model, tx, 0, replicated, trainable=filt)

    def loss_fn(params, frozen, rest, batch, key):
        return segmentation_loss(LossConfig(), merge_model(graphdef, params, frozen, rest)(batch["image"]),
                                 batch["label"]), {}

    step = make_train_step(loss_fn, tx, schedule, shardings, NamedSharding(mesh, PartitionSpec("data")))
    for _ in range(3):  # LoRA's A only gets gradients once B has moved off zero
        state, _ = step(state, batch)
    after = _params(merge_model(graphdef, state["params"], state["frozen"], state["rest"]))

    frozen = _expected_frozen(set(before), freeze, k)
    assert frozen and set(before) == set(after)
    assert _names(state["params"]) == set(before) - frozen
    if freeze == "lora":
        assert lora and set(before) - frozen == lora | {n for n in before if n.startswith("head/")}
    moving = [n for n in frozen if np.abs(grads[n]).max() > 0]
    assert len(moving) > len(frozen) // 2  # the freeze, not a zero gradient, keeps them still
    for name in sorted(frozen):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in sorted(set(before) - frozen):
        assert not np.array_equal(after[name], before[name]), name
    adam = next(s for s in jax.tree.leaves(state["opt_state"],
                                           is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    assert _names(adam.mu) == _names(adam.nu) == set(before) - frozen
