"""Segmentation losses against MONAI / torch references and hand-computed cases."""

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss, FocalLoss, TverskyLoss

import jax.numpy as jnp

from lnfm.segmentation import losses as L


def _case(seed=0, b=2, shape=(6, 5, 4), c=3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, *shape, c)).astype(np.float32) * 2
    labels = rng.integers(0, c, size=(b, *shape)).astype(np.int32)
    return logits, labels


def _torch(logits, labels):
    # MONAI is channel-first with a singleton label channel.
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy())
    y = torch.from_numpy(labels[:, None].astype(np.int64))
    return x, y


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
def test_tversky_matches_monai(batch, include_background):
    logits, labels = _case()
    ref = TverskyLoss(include_background=include_background, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7,
                      batch=batch)(*_torch(logits, labels)).item()
    got = L.tversky_loss(jnp.asarray(logits), jnp.asarray(labels), 0.3, 0.7, include_background=include_background,
                         batch=batch)
    assert float(got) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_dice_matches_monai_dice():
    logits, labels = _case(1)
    ref = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=0.0,
                   smooth_dr=1e-12)(*_torch(logits, labels)).item()
    got = L.dice_loss(jnp.asarray(logits), jnp.asarray(labels), include_background=False, batch=True, smooth=0.0)
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_cross_entropy_matches_torch():
    logits, labels = _case(2)
    x, y = _torch(logits, labels)
    ref = torch.nn.functional.cross_entropy(x, y[:, 0]).item()
    assert float(L.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_matches_monai(alpha):
    logits, labels = _case(3)
    c = logits.shape[-1]
    ref = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, alpha=alpha)(*_torch(logits, labels)).item()
    got = L.focal_loss(jnp.asarray(logits), jnp.asarray(labels), 2.0, alpha)
    # MONAI averages over the class axis as well; ours sums it (one non-zero term per voxel).
    assert float(got) == pytest.approx(ref * c, rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy():
    logits, labels = _case(4)
    assert float(L.focal_loss(jnp.asarray(logits), jnp.asarray(labels), 0.0)) == pytest.approx(
        float(L.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), rel=1e-6)


def test_hand_computed_dice():
    # One patch, 4 voxels, 2 classes; hard logits so probabilities are exactly 0/1.
    labels = jnp.array([[1, 1, 0, 0]])
    pred = jnp.array([[1, 0, 0, 0]])
    logits = jnp.where(jnp.arange(2) == pred[..., None], 50.0, -50.0)
    # foreground: tp=1, |P|=1, |G|=2 -> Dice 2/3
    assert float(L.dice_loss(logits, labels, smooth=0.0)) == pytest.approx(1 / 3, abs=1e-6)
    perfect = jnp.where(jnp.arange(2) == labels[..., None], 50.0, -50.0)
    for name in ("dice_ce", "dice_focal", "focal", "tversky", "ce"):
        assert float(L.segmentation_loss(L.LossConfig(name=name), perfect, labels)) == pytest.approx(0.0, abs=1e-5)
        assert float(L.segmentation_loss(L.LossConfig(name=name), logits, labels)) > 0.01


def test_deep_supervision_and_label_downsampling():
    labels = jnp.zeros((1, 8, 8, 4), jnp.int32).at[:, 4:6, 4:6, 2:4].set(1)
    small = L.downsample_labels(labels, (4, 4, 2))
    # Block centres are at index 1, 3, 5, 7 (and 1, 3 on the last axis).
    assert small.shape == (1, 4, 4, 2)
    np.testing.assert_array_equal(np.argwhere(np.asarray(small[0])), [[2, 2, 1]])
    full = jnp.where(jnp.arange(2) == labels[..., None], 50.0, -50.0)
    half = jnp.where(jnp.arange(2) == small[..., None], 50.0, -50.0)
    cfg = L.LossConfig()
    assert float(L.deep_supervision_loss(cfg, [full, half], labels)) == pytest.approx(0.0, abs=1e-5)
    wrong = -half
    expect = (1 / 1.5) * 0 + (0.5 / 1.5) * float(L.segmentation_loss(cfg, wrong, small))
    assert float(L.deep_supervision_loss(cfg, [full, wrong], labels)) == pytest.approx(expect, rel=1e-5)
    # Non-integer factor 8 -> 3: centres of the spans [0, 2.67), [2.67, 5.33), [5.33, 8) are 1, 4, 6.
    ramp = jnp.broadcast_to(jnp.arange(8)[None, :, None, None], (1, 8, 2, 2))
    np.testing.assert_array_equal(np.asarray(L.downsample_labels(ramp, (3, 2, 2)))[0, :, 0, 0], [1, 4, 6])
    with pytest.raises(ValueError, match="exceeds"):
        L.downsample_labels(labels, (16, 4, 2))


@pytest.mark.parametrize("name", ["dice_ce", "dice_focal", "focal", "tversky", "ce"])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_a_box_mask_equals_the_loss_on_the_box(name, batch_dice):
    """Masked voxels count nowhere: the loss with a box mask is the (MONAI-checked) loss of the box alone."""
    logits, labels = _case(seed=3, b=2, shape=(8, 7, 6), c=2)
    cfg = L.LossConfig(name=name, batch_dice=batch_dice, focal_alpha=0.25)
    mask = np.zeros(labels.shape, bool)
    mask[:, 2:6, 1:5, 1:4] = True
    crop = (slice(None), slice(2, 6), slice(1, 5), slice(1, 4))
    masked = L.segmentation_loss(cfg, jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    boxed = L.segmentation_loss(cfg, jnp.asarray(logits[crop]), jnp.asarray(labels[crop]))
    np.testing.assert_allclose(float(masked), float(boxed), rtol=1e-5)
    # ... and differs from the unmasked loss, so the mask is not ignored.
    assert abs(float(L.segmentation_loss(cfg, jnp.asarray(logits), jnp.asarray(labels))) - float(boxed)) > 1e-3


def test_mask_passes_through_deep_supervision():
    logits, labels = _case(seed=4, b=1, shape=(8, 8, 8), c=2)
    coarse = logits[:, ::2, ::2, ::2]
    cfg = L.LossConfig()
    ones = jnp.ones(labels.shape, bool)
    out = (jnp.asarray(logits), [jnp.asarray(coarse)])
    np.testing.assert_allclose(float(L.model_output_loss(cfg, out, jnp.asarray(labels), ones)),
                               float(L.model_output_loss(cfg, out, jnp.asarray(labels))), rtol=1e-6)
    mask = np.zeros(labels.shape, bool)
    mask[:, :4] = True  # the first half along x, at both resolutions
    half_full = L.segmentation_loss(cfg, jnp.asarray(logits[:, :4]), jnp.asarray(labels[:, :4]))
    half_coarse = L.segmentation_loss(cfg, jnp.asarray(coarse[:, :2]),
                                      L.downsample_labels(jnp.asarray(labels), (4, 4, 4))[:, :2])
    want = (1 / 1.5) * float(half_full) + (0.5 / 1.5) * float(half_coarse)
    np.testing.assert_allclose(float(L.model_output_loss(cfg, out, jnp.asarray(labels), jnp.asarray(mask))), want,
                               rtol=1e-5)


@pytest.mark.parametrize("changes", [
    {}, {"dice_weight": 0.0}, {"ce_weight": 0.0}, {"name": "focal", "dice_weight": 0.0, "ce_weight": 0.0},
    {"smooth": 0.0}, {"focal_gamma": 0.0}, {"focal_alpha": 0.0}, {"focal_alpha": 1.0},
    {"name": "tversky", "tversky_alpha": 0.0}, {"tversky_alpha": 1.0, "tversky_beta": 1.0},
    {"tversky_alpha": 2.0}, {"deep_supervision_decay": 1.0},
])
def test_check_loss_accepts_what_the_losses_define(changes):
    L.check_loss(L.LossConfig(**changes))


def test_a_tversky_weight_above_one_is_still_a_loss_in_0_1():
    # alpha 2, beta 0 (MONAI takes it too): 1 - TP / (TP + 2 FP), a loss that penalises FPs doubly
    logits, labels = _case(5)
    ref = TverskyLoss(include_background=False, to_onehot_y=True, softmax=True, alpha=2.0, beta=0.0,
                      batch=True)(*_torch(logits, labels)).item()
    got = float(L.tversky_loss(jnp.asarray(logits), jnp.asarray(labels), 2.0, 0.0))
    assert got == pytest.approx(ref, rel=1e-5) and 0 < got < 1


@pytest.mark.parametrize("changes, says", [
    ({"dice_weight": -1.0}, "loss.dice_weight must be in [0, inf), got -1"),
    ({"ce_weight": float("nan")}, "loss.ce_weight must be in [0, inf), got nan"),
    ({"dice_weight": 0.0, "ce_weight": 0.0}, "loss.dice_weight and loss.ce_weight are both 0"),
    ({"name": "dice_focal", "dice_weight": 0.0, "ce_weight": 0.0}, "loss.name=dice_focal would train nothing"),
    ({"smooth": -1e-5}, "loss.smooth must be in [0, inf)"),
    ({"focal_gamma": -0.5}, "loss.focal_gamma must be in [0, inf)"),
    ({"focal_alpha": 1.25}, "loss.focal_alpha must be in [0, 1]"),
    ({"tversky_beta": -0.7}, "loss.tversky_beta must be in [0, inf)"),
    ({"name": "tversky", "tversky_alpha": 0.0, "tversky_beta": 0.0}, "loss.tversky_alpha and loss.tversky_beta"),
    ({"deep_supervision_decay": 0.0}, "loss.deep_supervision_decay must be in (0, 1]"),
    ({"deep_supervision_decay": 1.5}, "loss.deep_supervision_decay must be in (0, 1]"),
])
def test_check_loss_refuses_what_trains_nothing_or_against_the_labels(changes, says):
    with pytest.raises(L.ConfigError) as e:
        L.check_loss(L.LossConfig(**changes))
    assert says in str(e.value)


def test_both_tversky_weights_zero_score_one_whatever_the_prediction():
    # why check_loss refuses them: the loss is 0 for the labels and for their opposite
    logits, labels = _case(6, c=2)
    right = np.where(labels[..., None] == np.arange(2), 9.0, -9.0).astype(np.float32)
    for x in (logits, right, -right):
        assert float(L.tversky_loss(jnp.asarray(x), jnp.asarray(labels), 0.0, 0.0)) == pytest.approx(0.0, abs=1e-6)
