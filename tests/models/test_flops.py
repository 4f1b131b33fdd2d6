"""Analytic FLOPs vs XLA's cost analysis of a compiled MAE gradient step, and hand-counted cases."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lnfm.models import ModelConfig
from lnfm.models.flops import block_flops, encoder_forward_flops, mae_forward_flops, train_flops_per_step
from lnfm.models.mae import MAE


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_train_step_flops_within_10_percent_of_xla():
    cfg = ModelConfig(img_size=(32, 32, 32), patch_size=(8, 8, 8), width=96, depth=2, heads=4, decoder_width=96,
                      decoder_depth=1, decoder_heads=4, cls_token=True)
    graphdef, state = nnx.split(MAE(cfg, nnx.Rngs(0)))

    def loss(st, x, key):
        return nnx.merge(graphdef, st)(x, key)[0]

    x, key = jnp.zeros((2, 32, 32, 32, 1)), jax.random.key(0)
    measured = _xla_flops(jax.grad(loss), state, x, key)
    assert measured == pytest.approx(train_flops_per_step(cfg, 2), rel=0.10)


def test_hand_counted_block_and_encoder():
    # 10 tokens, width 8, mlp 16: qkv 2*10*8*24 + attention 4*10*10*8 + proj 2*10*8*8 + mlp 4*10*8*16
    assert block_flops(10, 8, 16) == 3840 + 3200 + 1280 + 5120
    cfg = ModelConfig(img_size=(16, 16, 16), patch_size=(8, 8, 8), width=12, depth=1, heads=2, mlp_dim=24)
    patch = 2 * 8 * 512 * 12
    assert encoder_forward_flops(cfg, 3) == 3 * (patch + block_flops(8, 12, 24))
    mae = ModelConfig(**{**cfg.__dict__, "decoder_width": 6, "decoder_depth": 1, "decoder_heads": 1,
                         "mask_ratio": 0.75})
    expected = patch + block_flops(2, 12, 24) + 2 * 2 * 12 * 6 + block_flops(8, 6, 24) + 2 * 8 * 6 * 512
    assert mae_forward_flops(mae, 1) == expected
    assert train_flops_per_step(mae, 4) == 12 * expected
