"""Attention: explicit implementation choice and values against a numpy softmax reference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lnfm.models.layers import Attention, attention_implementation


def test_cpu_picks_xla_for_every_dtype():
    assert jax.default_backend() == "cpu"
    assert attention_implementation(jnp.bfloat16, 64) == "xla"
    assert attention_implementation(jnp.float32, 64) == "xla"


def test_attention_matches_numpy_with_head_major_packing():
    width, heads, t = 12, 3, 5
    attn = Attention(width, heads, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, t, width)).astype(np.float32)
    w = np.asarray(attn.qkv.kernel[...])
    b = np.asarray(attn.qkv.bias[...])
    qkv = (x @ w + b).reshape(2, t, heads, 3, width // heads)  # head-major: (heads, 3, head_dim)
    q, k, v = (qkv[:, :, :, i].transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(2, t, width)
    ref = out @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
