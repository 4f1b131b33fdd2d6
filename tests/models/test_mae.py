"""MAE: exact per-sample masking, loss on masked patches only (hand-computed), patchify round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lnfm.models import ModelConfig, build_ssl_model
from lnfm.models.mae import (MAE, mask_from_keep, masked_mse, patch_targets, patchify, random_keep_ids,
                             reconstruct, unpatchify)

CFG = ModelConfig(img_size=(32, 32, 16), patch_size=(8, 8, 4), depth=2, cls_token=True)

call = nnx.jit(lambda m, x, k: m(x, k))
predict = nnx.jit(lambda m, x, keep: m.predict(x, keep))


@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_masking_exact_per_sample_and_reproducible(ratio):
    keep = random_keep_ids(jax.random.key(0), 6, 64, ratio)
    mask = mask_from_keep(keep, 64)
    expected_masked = round(64 * ratio)
    np.testing.assert_array_equal(mask.sum(axis=1), [expected_masked] * 6)
    assert all(len(set(row.tolist())) == keep.shape[1] for row in np.asarray(keep))
    assert len({tuple(r) for r in np.asarray(keep)}) == 6  # samples differ
    np.testing.assert_array_equal(keep, random_keep_ids(jax.random.key(0), 6, 64, ratio))
    assert not np.array_equal(keep, random_keep_ids(jax.random.key(1), 6, 64, ratio))


def test_patchify_roundtrip_and_layout():
    x = jnp.arange(2 * 4 * 6 * 2 * 3, dtype=jnp.float32).reshape(2, 4, 6, 2, 3)
    p = patchify(x, (2, 3, 1))
    assert p.shape == (2, 2 * 2 * 2, 2 * 3 * 1 * 3)
    # patch (1, 0, 1) is grid index 1*4 + 0*2 + 1 = 5; its first voxel is x[:, 2, 0, 1, :]
    np.testing.assert_array_equal(p[:, 5, :3], x[:, 2, 0, 1, :])
    np.testing.assert_array_equal(unpatchify(p, (2, 3, 1), (4, 6, 2), 3), x)


def test_loss_equals_hand_computed_and_ignores_visible_predictions():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 4, 1)).astype(np.float32)
    pred = rng.normal(size=(2, 8, 32)).astype(np.float32)
    mask = np.zeros((2, 8), np.float32)
    mask[0, [1, 4, 6]] = 1
    mask[1, [0, 2, 3]] = 1
    target = patch_targets(jnp.asarray(images), (4, 4, 2), norm_pix=True)
    # hand reference: standardise each patch with numpy, MSE over masked patches only
    ref_t = np.asarray(patchify(jnp.asarray(images), (4, 4, 2)))
    ref_t = (ref_t - ref_t.mean(-1, keepdims=True)) / np.sqrt(ref_t.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(target, ref_t, rtol=1e-5, atol=1e-5)
    errs = ((pred - ref_t) ** 2).mean(-1)
    expected = errs[mask > 0].mean()
    loss = masked_mse(jnp.asarray(pred), target, jnp.asarray(mask))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    perturbed = pred.copy()
    perturbed[mask == 0] += 100.0
    np.testing.assert_allclose(masked_mse(jnp.asarray(perturbed), target, jnp.asarray(mask)), loss, rtol=1e-6)


def test_mae_forward_loss_aux_and_encoder_sees_only_visible():
    model = build_ssl_model(CFG, nnx.Rngs(0))
    assert isinstance(model, MAE)
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 16, 1))
    loss, aux = call(model, images, jax.random.key(5))
    n = 4 * 4 * 4
    assert aux["pred"].shape == (2, n, 8 * 8 * 4) and aux["mask"].shape == (2, n)
    np.testing.assert_array_equal(aux["mask"].sum(1), [48, 48])
    target = patch_targets(images, CFG.patch_size, True)
    np.testing.assert_allclose(loss, masked_mse(aux["pred"], target, aux["mask"]), rtol=1e-6)
    # changing a masked patch's voxels leaves every prediction unchanged (encoder never saw it)
    keep = random_keep_ids(jax.random.key(5), 2, n, CFG.mask_ratio)
    masked_idx = int(np.flatnonzero(np.asarray(aux["mask"][0]))[0])
    patches = patchify(images, CFG.patch_size).at[0, masked_idx].add(5.0)
    changed = unpatchify(patches, CFG.patch_size, (32, 32, 16), 1)
    np.testing.assert_allclose(predict(model, changed, keep), aux["pred"], rtol=1e-5, atol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: m(images, jax.random.key(5))[0]))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # reconstruction keeps visible voxels exactly
    rec = reconstruct(images, aux["pred"], aux["mask"], CFG.patch_size, True)
    vis = np.asarray(aux["mask"][..., None] == 0) * np.ones((1, 1, 256))
    np.testing.assert_allclose(np.asarray(patchify(rec, CFG.patch_size))[vis > 0],
                               np.asarray(patchify(images, CFG.patch_size))[vis > 0], rtol=1e-6)


def test_encoder_state_transfers_to_finetuning():
    from lnfm.models import build_encoder
    mae = build_ssl_model(CFG, nnx.Rngs(0))
    enc = build_encoder(CFG, nnx.Rngs(1))
    nnx.update(enc, nnx.state(mae)["encoder"])
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 16, 1))
    encode = nnx.jit(lambda m, v: m(v)[0])
    np.testing.assert_array_equal(encode(enc, x), encode(mae.encoder, x))


def test_bad_mask_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(ModelConfig(**{**CFG.__dict__, "mask_ratio": 1.0}), nnx.Rngs(0))
