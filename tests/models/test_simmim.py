"""SimMIM: mask layout, loss restricted to hidden voxels, hidden content never reaches the encoder."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lnfm.models import build_ssl_model
from lnfm.models.config import ModelConfig
from lnfm.models.simmim import SimMIM, masked_l1, pixel_shuffle, random_patch_mask
from numpy_init import numpy_init, quick_jit


def cfg(**kw):
    base = dict(arch="swin", size="tiny", window_size=(4, 4, 4), mask_ratio=0.5)
    base.update(kw)
    return ModelConfig(**base)


def test_masked_l1_hand_case_and_ignores_unmasked():
    target = jnp.zeros((1, 2, 1, 1, 1))
    pred = jnp.array([3.0, -5.0]).reshape(1, 2, 1, 1, 1)
    mask = jnp.array([1.0, 0.0]).reshape(1, 2, 1, 1)
    assert float(masked_l1(pred, target, mask)) == 3.0
    # any change where mask == 0 leaves the loss unchanged
    assert float(masked_l1(pred.at[0, 1].set(100.0), target, mask)) == 3.0


def test_random_patch_mask_exact_count():
    m = np.asarray(random_patch_mask(jax.random.key(0), 4, (2, 3, 2), 0.75))
    assert m.shape == (4, 2, 3, 2)
    np.testing.assert_array_equal(m.reshape(4, -1).sum(1), [9, 9, 9, 9])
    assert len({m[i].tobytes() for i in range(4)}) > 1  # samples differ


def test_pixel_shuffle_places_values():
    x = jnp.arange(8.0).reshape(1, 1, 1, 1, 8)  # one cell, stride 2, one channel
    out = np.asarray(pixel_shuffle(x, (2, 2, 2), 1))[0, ..., 0]
    assert out[0, 0, 0] == 0 and out[0, 0, 1] == 1 and out[0, 1, 0] == 2 and out[1, 0, 0] == 4


@quick_jit
def run(model, images, key):
    return model(images, key)


def test_simmim_aux_and_hidden_content_is_invisible():
    model = numpy_init(lambda: build_ssl_model(cfg(), nnx.Rngs(0)))
    assert isinstance(model, SimMIM)
    # 64 x 32 x 30: two mask patches of 32^3 (Z padded), ratio 0.5 -> exactly one hidden
    images = jax.random.uniform(jax.random.key(1), (1, 64, 32, 30, 1))
    key = jax.random.key(2)
    loss, aux = run(model, images, key)
    assert aux["recon"].shape == aux["pred"].shape == images.shape
    assert aux["voxel_mask"].shape == aux["mask"].shape == images.shape[:4]
    mask = np.asarray(aux["voxel_mask"])[0]
    assert set(np.unique(mask)) == {0.0, 1.0}
    halves = [mask[:32], mask[32:]]
    assert sorted(h.mean() for h in halves) == [0.0, 1.0]  # one whole 32^3 patch hidden
    np.testing.assert_allclose(float(loss), float(masked_l1(aux["recon"], images, aux["voxel_mask"])), rtol=1e-6)

    # Changing voxels inside the hidden patch changes the target, never the prediction.
    hidden = jnp.asarray(mask)[None, ..., None] > 0
    noisy = jnp.where(hidden, images + 3.0, images)
    loss2, aux2 = run(model, noisy, key)
    np.testing.assert_allclose(np.asarray(aux2["recon"]), np.asarray(aux["recon"]), rtol=1e-5, atol=1e-5)
    assert float(loss2) > float(loss) + 1.0
    # Changing visible voxels changes the prediction (the encoder does see them).
    changed = jnp.where(hidden, images, images + 0.5)
    _, aux3 = run(model, changed, key)
    assert np.abs(np.asarray(aux3["recon"] - aux["recon"])).max() > 1e-4


def test_encoder_state_matches_plain_swin_encoder():
    from lnfm.models import build_encoder

    model = numpy_init(lambda: build_ssl_model(cfg(), nnx.Rngs(0)))
    enc = numpy_init(lambda: build_encoder(cfg(), nnx.Rngs(1)), seed=1)
    a = jax.tree.map(jnp.shape, nnx.state(model.encoder, nnx.Param))
    b = jax.tree.map(jnp.shape, nnx.state(enc, nnx.Param))
    assert a == b
    nnx.update(enc, nnx.state(model.encoder, nnx.Param))
    np.testing.assert_array_equal(enc.patch_embed.proj.kernel[...], model.encoder.patch_embed.proj.kernel[...])
