"""MONAI interop: weights both ways for ViT, UNETR.vit and MaskedAutoEncoderViT; outputs agree to 1e-4."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from monai.networks.nets import UNETR, MaskedAutoEncoderViT
from monai.networks.nets import ViT as MonaiViT

from lnfm.models import ModelConfig
from lnfm.models.interop import from_monai_mae, from_monai_vit, to_monai_mae, to_monai_vit

IMG, PATCH = (16, 16, 32), (8, 8, 16)

fwd = nnx.jit(lambda m, x: m(x))


def _close(ours, theirs, rtol=1e-4):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def _input(c=1, seed=0):
    x = np.random.default_rng(seed).normal(size=(2, *IMG, c)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())  # ours channel-last, MONAI channel-first


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial LayerNorm/bias values so a swapped or dropped tensor cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "position" not in name and "pos_embedding" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("pos", ["learnable", "sincos"])
def test_vit_both_ways(pos):
    ref = MonaiViT(in_channels=2, img_size=IMG, patch_size=PATCH, hidden_size=48, mlp_dim=96, num_layers=3,
                   num_heads=4, pos_embed_type=pos, qkv_bias=True).eval()
    _randomise(ref, 0)
    cfg = ModelConfig(img_size=IMG, patch_size=PATCH, in_channels=2, width=48, depth=3, heads=4, mlp_dim=96,
                      pos_embed=pos, qkv_bias=True, feature_layers=(1, 2, 3))
    model = from_monai_vit(ref.state_dict(), cfg)
    x, xt = _input(2)
    with torch.no_grad():
        ref_out, ref_hidden = ref(xt)
    out, hidden = fwd(model, jnp.asarray(x))
    _close(out, ref_out.numpy())
    for h, r in zip(hidden, ref_hidden):
        _close(h, r.numpy())
    back = to_monai_vit(model)
    assert set(back) == set(ref.state_dict())
    fresh = MonaiViT(in_channels=2, img_size=IMG, patch_size=PATCH, hidden_size=48, mlp_dim=96, num_layers=3,
                     num_heads=4, pos_embed_type=pos, qkv_bias=True).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        _close(fresh(xt)[0].numpy(), ref_out.numpy(), rtol=1e-6)


def test_unetr_vit_weights_from_whole_unetr():
    net = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=64,
                num_heads=4).eval()
    _randomise(net.vit, 1)
    cfg = ModelConfig(img_size=(32, 32, 32), patch_size=(16, 16, 16), width=48, depth=12, heads=4, mlp_dim=64,
                      pos_embed="learnable", qkv_bias=False, feature_layers=(3, 6, 9, 12))
    model = from_monai_vit(net.state_dict(), cfg)  # keys read under 'vit.'
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 32, 1)).astype(np.float32)
    with torch.no_grad():
        ref_out, ref_hidden = net.vit(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()))
    out, hidden = fwd(model, jnp.asarray(x))
    _close(out, ref_out.numpy())
    for h, i in zip(hidden, (2, 5, 8, 11)):
        _close(h, ref_hidden[i].numpy())
    exported = to_monai_vit(model)
    net.vit.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_mae_both_ways_with_shared_mask():
    ref = MaskedAutoEncoderViT(in_channels=1, img_size=IMG, patch_size=PATCH, hidden_size=48, mlp_dim=64,
                               num_layers=2, num_heads=4, decoder_hidden_size=24, decoder_mlp_dim=32,
                               decoder_num_layers=2, decoder_num_heads=4).eval()
    _randomise(ref, 2)
    cfg = ModelConfig(img_size=IMG, patch_size=PATCH, width=48, depth=2, heads=4, mlp_dim=64, qkv_bias=False,
                      cls_token=True, decoder_width=24, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=32)
    model = from_monai_mae(ref.state_dict(), cfg)
    x, xt = _input(1, seed=3)
    n = 2 * 2 * 2
    keep = np.stack([np.sort(np.random.default_rng(s).permutation(n)[:2]) for s in range(2)])

    def fixed_masking(tokens, masking_ratio=None):
        idx = torch.from_numpy(keep)
        mask = torch.ones(tokens.shape[0], tokens.shape[1], dtype=torch.int)
        mask[torch.arange(tokens.shape[0]).unsqueeze(-1), idx] = 0
        return tokens[torch.arange(tokens.shape[0]).unsqueeze(1), idx], idx, mask

    ref._masking = fixed_masking
    with torch.no_grad():
        ref_pred, _ = ref(xt)
    _close(nnx.jit(lambda m, v, k: m.predict(v, k))(model, jnp.asarray(x), jnp.asarray(keep)), ref_pred.numpy())
    back = to_monai_mae(model)
    assert set(back) == set(ref.state_dict())
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        _close(ref(xt)[0].numpy(), ref_pred.numpy(), rtol=1e-6)


def test_config_mismatch_is_a_clear_error():
    ref = MonaiViT(in_channels=1, img_size=IMG, patch_size=PATCH, hidden_size=48, mlp_dim=96, num_layers=2,
                   num_heads=4)
    cfg = ModelConfig(img_size=IMG, patch_size=PATCH, width=48, depth=2, heads=4, mlp_dim=96, qkv_bias=False)
    with pytest.raises(ValueError, match="not the fixed sin-cos table"):
        from_monai_vit(ref.state_dict(), cfg)  # MONAI's default is a learned table
    with pytest.raises(ValueError, match="missing 'blocks.0.attn.qkv.bias'"):
        from_monai_vit(ref.state_dict(), ModelConfig(**{**cfg.__dict__, "pos_embed": "learnable",
                                                         "qkv_bias": True}))
    with pytest.raises(ValueError, match="has shape"):
        from_monai_vit(ref.state_dict(), ModelConfig(**{**cfg.__dict__, "pos_embed": "learnable", "mlp_dim": 64}))
