"""Segmenter: padding/cropping, deep supervision, pretrained-encoder loading, a training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lnfm.models import build_ssl_model
from lnfm.models.config import ModelConfig
from lnfm.models.segmenter import Segmenter, build_segmenter, load_encoder_state
from numpy_init import numpy_init, quick_jit

SWIN = dict(arch="swin", size="tiny", window_size=(4, 4, 4))
VIT = dict(arch="vit", size="tiny", patch_size=(8, 8, 8), img_size=(16, 16, 16), depth=4)


@quick_jit
def run(model, x):
    return model(x)


def test_vit_unetr_segmenter_crops_odd_input_with_deep_supervision():
    seg = numpy_init(lambda: build_segmenter(ModelConfig(**VIT), "unetr", 3, nnx.Rngs(0), deep_supervision=True,
                                             feature_size=8))
    assert isinstance(seg, Segmenter) and seg.multiple == (8, 8, 8)
    logits, aux = run(seg, jnp.ones((1, 15, 16, 9, 1)))
    assert logits.shape == (1, 15, 16, 9, 3)
    assert [a.shape for a in aux] == [(1, 8, 8, 5, 3), (1, 4, 4, 3, 3)]


def test_simmim_encoder_loads_into_swin_segmenter():
    cfg = ModelConfig(**SWIN)
    ssl = numpy_init(lambda: build_ssl_model(cfg, nnx.Rngs(0)), seed=1)
    seg = numpy_init(lambda: build_segmenter(cfg, "linear", 2, nnx.Rngs(0)), seed=2)
    def params(m):
        return [np.asarray(v) for v in jax.tree.leaves(nnx.state(m, nnx.Param))]

    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(params(seg.encoder), params(ssl.encoder)))
    load_encoder_state(seg, ssl.encoder)
    for a, b in zip(params(seg.encoder), params(ssl.encoder)):
        np.testing.assert_array_equal(a, b)
    other = numpy_init(lambda: build_segmenter(ModelConfig(**VIT), "linear", 2, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="does not match"):
        load_encoder_state(other, ssl.encoder)


def test_mae_encoder_loads_into_vit_segmenter():
    cfg = ModelConfig(**VIT)
    mae = numpy_init(lambda: build_ssl_model(cfg, nnx.Rngs(0)), seed=1)
    seg = numpy_init(lambda: build_segmenter(cfg, "light", 2, nnx.Rngs(0)), seed=2)
    load_encoder_state(seg, mae.encoder)
    np.testing.assert_array_equal(np.asarray(seg.encoder.blocks[0].attn.qkv.kernel[...]),
                                  np.asarray(mae.encoder.blocks[0].attn.qkv.kernel[...]))


def test_gradient_steps_reduce_a_toy_loss():
    # ViT encoder with per-block remat and the light head; labels: a bright cube.
    cfg = ModelConfig(**{**VIT, "depth": 2, "remat": "full"})
    seg = numpy_init(lambda: build_segmenter(cfg, "light", 2, nnx.Rngs(0), base_channels=8, max_channels=16))
    x = jnp.zeros((1, 16, 16, 16, 1)).at[:, 4:10, 5:11, 3:9].set(1.0)
    y = (x[..., 0] > 0.5).astype(jnp.int32)
    opt = nnx.Optimizer(seg, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(seg, opt)) for _ in range(4)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("arch", [SWIN, VIT], ids=["swin", "vit"])
def test_every_parameter_has_logical_names_known_to_the_rule_tables(arch):
    from lnfm.models.lora import apply_lora
    from lnfm.models.sharding import RULES, logical_to_mesh_spec

    for head in ("unetr", "light", "linear"):
        def build():
            seg = build_segmenter(ModelConfig(**arch), head, 2, nnx.Rngs(0), deep_supervision=True)
            apply_lora(seg.encoder, rngs=nnx.Rngs(1))
            return seg

        seg = nnx.eval_shape(build)
        for path, var in nnx.to_flat_state(nnx.state(seg, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), (head, path)
            for rules in RULES:
                logical_to_mesh_spec(tuple(names), rules)
