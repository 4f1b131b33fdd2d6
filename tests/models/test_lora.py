"""LoRA adapters: identity at init, only adapters train, merging keeps the function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lnfm.models.config import ModelConfig
from lnfm.models.lora import LoRALinear, LoRAParam, apply_lora, merge_lora
from lnfm.models.swin import SwinEncoder
from lnfm.models.vit import ViT
from numpy_init import numpy_init, quick_jit


def swin():
    return numpy_init(lambda: SwinEncoder(ModelConfig(arch="swin", size="tiny", window_size=(4, 4, 4)), nnx.Rngs(0)))


def vit():
    cfg = ModelConfig(arch="vit", size="tiny", patch_size=(8, 8, 8), img_size=(16, 16, 16), depth=2)
    return numpy_init(lambda: ViT(cfg, nnx.Rngs(0)))


@quick_jit
def deepest(model, x):
    return model.features(x)[-1]


def adapters(model):
    return [n for _, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]


def test_linear_formula_and_identity_at_init():
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    lora = LoRALinear(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (3, 6))
    np.testing.assert_array_equal(lora(x), base(x))  # B = 0
    lora.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 5))
    expected = base(x) + 2.0 * (x @ lora.lora_a[...]) @ lora.lora_b[...]
    np.testing.assert_allclose(lora(x), expected, rtol=1e-5, atol=1e-6)


def test_swin_attention_projections_are_wrapped():
    enc = swin()
    apply_lora(enc, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    wrapped = adapters(enc)
    assert len(wrapped) == 16  # qkv and proj of 8 window-attention blocks
    blk = enc.stages[2].blocks[1].attn
    assert isinstance(blk.qkv, LoRALinear) and isinstance(blk.proj, LoRALinear)
    assert blk.qkv.lora_a.shape == (48, 4) and blk.qkv.lora_b.shape == (4, 144)
    np.testing.assert_array_equal(blk.qkv.lora_b[...], 0.0)


@pytest.mark.parametrize("build,spatial,count", [(vit, (16, 16, 16), 4)], ids=["vit"])
def test_apply_identity_then_merge_equality(build, spatial, count):
    enc = build()
    x = jax.random.uniform(jax.random.key(0), (1, *spatial, 1))
    before = deepest(enc, x)
    apply_lora(enc, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    wrapped = adapters(enc)
    assert len(wrapped) == count  # qkv and proj of every attention block
    np.testing.assert_allclose(deepest(enc, x), before, rtol=1e-6, atol=1e-6)
    for i, a in enumerate(wrapped):
        a.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), a.lora_b.shape)
    adapted = deepest(enc, x)
    assert np.abs(np.asarray(adapted - before)).max() > 1e-3
    merge_lora(enc)
    assert adapters(enc) == [] and not jax.tree.leaves(nnx.state(enc, LoRAParam))
    np.testing.assert_allclose(deepest(enc, x), adapted, rtol=1e-4, atol=1e-4)


def test_only_adapters_train():
    enc = vit()
    apply_lora(enc, rngs=nnx.Rngs(1))
    x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 16, 1))
    opt = nnx.Optimizer(enc, optax.sgd(0.1), wrt=LoRAParam)
    base_before = jax.tree.map(np.asarray, nnx.state(enc, nnx.Not(LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(enc, LoRAParam))

    @nnx.jit
    def step(model, opt):
        loss_fn = lambda m: jnp.mean(m.features(x)[-1] ** 2)  # noqa: E731
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, grads)

    step(enc, opt)
    base_after = jax.tree.map(np.asarray, nnx.state(enc, nnx.Not(LoRAParam)))
    lora_after = jax.tree.map(np.asarray, nnx.state(enc, LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(lora_after), jax.tree.leaves(lora_before))]
    assert max(moved) > 0


def test_no_target_is_an_error():
    with pytest.raises(ValueError, match="nothing to adapt"):
        apply_lora(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0), targets=("qkv",))
