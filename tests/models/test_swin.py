"""Swin-3D encoder: shapes, shifted-window masking, and equality with MONAI's swinViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lnfm.models.config import ModelConfig
from lnfm.models.swin import SwinEncoder, shifted_window_mask, window_partition, window_reverse
from numpy_init import numpy_init, quick_jit


@quick_jit
def features(model, x):
    return model.features(x)


def tiny_cfg(**kw):
    base = dict(arch="swin", size="tiny", window_size=(4, 4, 4), swin_patch_size=(2, 2, 2))
    base.update(kw)
    return ModelConfig(**base)


def test_tiny_feature_shapes_units_and_padding():
    # Same configuration and padded shape as the MONAI test below: one compile serves both.
    enc = numpy_init(lambda: SwinEncoder(tiny_cfg(window_size=(3, 3, 3)), nnx.Rngs(0)))
    assert enc.feature_strides == ((2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16), (32, 32, 32))
    assert enc.feature_channels == (12, 24, 48, 96, 192)
    assert enc.units() == [enc.patch_embed, *enc.stages]
    # 30 x 32 x 17 is zero-padded at the far end to 32 x 32 x 32
    x = jax.random.uniform(jax.random.key(1), (2, 30, 32, 17, 1))
    padded = jnp.pad(x, ((0, 0), (0, 2), (0, 0), (0, 15), (0, 0)))
    feats = features(enc, padded)
    assert [f.shape for f in feats] == [(2, 16, 16, 16, 12), (2, 8, 8, 8, 24), (2, 4, 4, 4, 48),
                                        (2, 2, 2, 2, 96), (2, 1, 1, 1, 192)]
    for a, b in zip(features(enc, x), feats):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_window_partition_roundtrip():
    x = jnp.arange(2 * 8 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 8, 4, 6, 3)
    w = window_partition(x, (4, 2, 3))
    assert w.shape == (2, 2 * 2 * 2, 24, 3)
    # first window holds x[:, 0:4, 0:2, 0:3] in raster order
    np.testing.assert_array_equal(w[:, 0], x[:, :4, :2, :3].reshape(2, 24, 3))
    np.testing.assert_array_equal(window_reverse(w, (4, 2, 3), (8, 4, 6)), x)


def test_shifted_mask_hand_case():
    # 8 tokens along X, window 4, shift 2. After rolling by -2 the windows hold
    # original tokens [2,3,4,5] and [6,7,0,1]; in the second, {6,7} and {0,1} were
    # not neighbours before the roll and must not attend to each other.
    allowed = shifted_window_mask((8, 1, 1), (4, 1, 1), (2, 0, 0))
    assert allowed.shape == (2, 4, 4)
    np.testing.assert_array_equal(allowed[0], np.ones((4, 4), bool))
    block = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(allowed[1], block)


def test_shifted_block_does_not_leak_across_the_wrap():
    # In the shifted block, the last tokens along X share a window with the first ones
    # after the roll; the mask must keep them independent.
    enc = numpy_init(lambda: SwinEncoder(tiny_cfg(), nnx.Rngs(0)))
    block = enc.stages[0].blocks[1]
    assert block.shift == (2, 2, 2)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 12))
    attend = quick_jit(lambda blk, h: blk.attend(h))
    y0 = attend(block, x)
    x2 = x.at[:, 0, 0, 0].add(5.0)  # perturb an original corner token
    y1 = attend(block, x2)
    changed = np.abs(np.asarray(y1 - y0)).max(-1)[0] > 1e-6
    # Token (7,7,7) shares the rolled window with (0,0,0) but a different region: unchanged.
    assert not changed[7, 7, 7]
    # Token (1,1,1) is in the same region and window as (0,0,0): changed.
    assert changed[1, 1, 1]
    # Tokens outside (0,0,0)'s rolled window never change.
    assert not changed[3, 3, 3]


def _monai_swin(window, seed=0):
    torch = pytest.importorskip("torch")
    from monai.networks.nets.swin_unetr import SwinTransformer

    torch.manual_seed(seed)
    net = SwinTransformer(in_chans=1, embed_dim=12, window_size=(window,) * 3, patch_size=(2, 2, 2),
                          depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), qkv_bias=True, spatial_dims=3)
    # Random, non-trivial values everywhere (the relative-position tables start near zero).
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" not in name else 0.2) + (1.0 if name.endswith(
                "norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight") else 0.0))
    return net.eval()


def load_monai_swin(enc: SwinEncoder, net) -> None:
    """Copy MONAI swinViT weights into the encoder (test-side mapping)."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    enc.patch_embed.proj.kernel[...] = jnp.asarray(sd["patch_embed.proj.weight"].transpose(2, 3, 4, 1, 0))
    enc.patch_embed.proj.bias[...] = jnp.asarray(sd["patch_embed.proj.bias"])

    def lin(mod, prefix, bias=True):
        mod.kernel[...] = jnp.asarray(sd[prefix + ".weight"].T)
        if bias:
            mod.bias[...] = jnp.asarray(sd[prefix + ".bias"])

    def norm(mod, prefix):
        mod.scale[...] = jnp.asarray(sd[prefix + ".weight"])
        mod.bias[...] = jnp.asarray(sd[prefix + ".bias"])

    for i, stage in enumerate(enc.stages):
        root = f"layers{i + 1}.0"
        for j, blk in enumerate(stage.blocks):
            b = f"{root}.blocks.{j}"
            norm(blk.norm1, b + ".norm1")
            norm(blk.norm2, b + ".norm2")
            lin(blk.attn.qkv, b + ".attn.qkv")
            lin(blk.attn.proj, b + ".attn.proj")
            blk.attn.relative_position_bias_table[...] = jnp.asarray(sd[b + ".attn.relative_position_bias_table"])
            lin(blk.mlp.fc1, b + ".mlp.linear1")
            lin(blk.mlp.fc2, b + ".mlp.linear2")
        norm(stage.downsample.norm, root + ".downsample.norm")
        lin(stage.downsample.reduction, root + ".downsample.reduction", bias=False)


def test_forward_equals_monai_swinvit():
    # Window 3 on a 32^3 input exercises every MONAI path: stage grids 16, 8, 4 are
    # padded to multiples of 3 and use shifted windows with the wrap-around mask; the
    # last stage's grid (2) is smaller than the window, which shrinks and stops shifting.
    window = 3
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")  # MONAI's Swin imports it
    net = _monai_swin(window)
    enc = numpy_init(lambda: SwinEncoder(tiny_cfg(window_size=(window,) * 3), nnx.Rngs(0)))
    load_monai_swin(enc, net)
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = [r.numpy() for r in net(torch.from_numpy(x), normalize=True)]
    ours = features(enc, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    assert len(ours) == len(ref) == 5
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), r.transpose(0, 2, 3, 4, 1), rtol=1e-4, atol=1e-4)
