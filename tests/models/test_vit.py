"""ViT-3D encoder: shapes for every size, position embeddings, features, parameter counts vs MONAI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets import ViT as MonaiViT

from lnfm.models import ModelConfig, build_encoder, param_count
from lnfm.models.layers import sincos_3d
from lnfm.models.vit import SIZES, ViT, default_feature_layers

TINY = ModelConfig(img_size=(32, 32, 32), patch_size=(8, 8, 8), depth=2)


@nnx.jit
def fwd(model, x):
    return model(x)


@pytest.mark.parametrize("size", list(SIZES))
def test_shapes_every_size_abstractly(size):
    cfg = ModelConfig(size=size, img_size=(32, 32, 16), patch_size=(16, 16, 8), cls_token=True)
    model = nnx.eval_shape(lambda: ViT(cfg, nnx.Rngs(0)))
    width, depth, _ = SIZES[size]
    x = jax.ShapeDtypeStruct((2, 32, 32, 16, 1), jnp.float32)
    tokens, hidden = nnx.eval_shape(lambda m, v: m(v), model, x)
    assert tokens.shape == (2, 1 + 2 * 2 * 2, width)
    assert len(hidden) == 4 and all(h.shape == tokens.shape for h in hidden)
    assert model.feature_layers == default_feature_layers(depth)


def test_default_feature_layers():
    assert default_feature_layers(12) == (3, 6, 9, 12)
    assert default_feature_layers(24) == (6, 12, 18, 24)
    assert default_feature_layers(4) == (1, 2, 3, 4)
    assert default_feature_layers(2) == (1, 2)


def test_features_grids_anisotropic_multichannel():
    cfg = ModelConfig(img_size=(32, 32, 16), patch_size=(16, 16, 8), in_channels=2, cls_token=True)
    model = build_encoder(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 16, 2))
    feats = nnx.jit(lambda m, v: m.features(v))(model, x)
    assert [f.shape for f in feats] == [(1, 2, 2, 2, 64)] * 4 and model.feature_layers == (1, 2, 3, 4)
    assert model.feature_strides == [(16, 16, 8)] * 4
    tokens, hidden = fwd(model, x)
    # last feature is the final (normed) output without the class token, earlier ones raw block outputs
    np.testing.assert_allclose(feats[-1].reshape(1, 8, 64), tokens[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(feats[0].reshape(1, 8, 64), hidden[0][:, 1:], rtol=1e-6)
    units = model.units()
    assert len(units) == 1 + 4 + 1 and units[0] is model.embed and units[-1] is model.norm


def test_sincos_matches_monai_and_pads():
    for grid, dim in [((2, 3, 4), 48), ((4, 4, 2), 96)]:
        ref = build_sincos_position_embedding(list(grid), dim, 3).detach().numpy()[0]
        np.testing.assert_allclose(sincos_3d(grid, dim), ref, rtol=1e-5, atol=1e-6)
    table = sincos_3d((2, 2, 2), 64)  # 64 is not a multiple of 6: 60 features then zeros
    np.testing.assert_allclose(table[:, :60], build_sincos_position_embedding([2, 2, 2], 60, 3)[0].numpy(),
                               rtol=1e-5, atol=1e-6)
    assert np.all(table[:, 60:] == 0)


def test_other_input_size_and_learned_table_interpolation():
    for pos in ("sincos", "learnable"):
        model = ViT(ModelConfig(**{**TINY.__dict__, "pos_embed": pos}), nnx.Rngs(0))
        tokens, _ = fwd(model, jnp.ones((1, 48, 32, 16, 1)))
        assert tokens.shape == (1, 6 * 4 * 2, 64) and bool(jnp.all(jnp.isfinite(tokens)))
    table = model.embed.position_table((4, 4, 4))
    np.testing.assert_array_equal(table, model.embed.pos_table[...])  # training grid: stored table as is


def test_bad_input_size_is_a_clear_error():
    model = ViT(TINY, nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(jnp.ones((1, 30, 32, 32, 1)))


def test_bf16_compute_fp32_params_and_remat_match():
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
    ref, _ = fwd(ViT(TINY, nnx.Rngs(0)), x)
    remat, _ = fwd(ViT(ModelConfig(**{**TINY.__dict__, "remat": "dots_saveable"}), nnx.Rngs(0)), x)
    np.testing.assert_allclose(remat, ref, rtol=1e-6, atol=1e-6)
    bf = ViT(ModelConfig(**{**TINY.__dict__, "dtype": "bfloat16"}), nnx.Rngs(0))
    assert bf.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
    out, _ = fwd(bf, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.15)

    def loss(m):
        return jnp.mean(m(x)[0].astype(jnp.float32) ** 2)
    g_ref = nnx.jit(nnx.grad(loss))(ViT(TINY, nnx.Rngs(0)))
    g_remat = nnx.jit(nnx.grad(loss))(ViT(ModelConfig(**{**TINY.__dict__, "remat": "full"}), nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vit_b_parameter_count_equals_monai():
    with torch.device("meta"):
        ref = MonaiViT(in_channels=1, img_size=(96, 96, 96), patch_size=16, hidden_size=768, mlp_dim=3072,
                       num_layers=12, num_heads=12)
    # MONAI's TransformerBlock always holds a cross-attention LayerNorm that its ViT never uses.
    unused = sum(p.numel() for n, p in ref.named_parameters() if "norm_cross_attn" in n)
    monai_count = sum(p.numel() for p in ref.parameters()) - unused
    cfg = ModelConfig(size="b", img_size=(96, 96, 96), patch_size=(16, 16, 16), pos_embed="learnable",
                      qkv_bias=False)
    assert param_count(cfg) == monai_count
    # the sin-cos default has no table; qkv bias adds 3 x width per block
    assert param_count(ModelConfig(size="b")) == monai_count - 216 * 768 + 12 * 3 * 768
    assert math.isclose(param_count(ModelConfig(size="b")) / 1e6, 86.0, rel_tol=0.03)
