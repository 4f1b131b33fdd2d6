"""Segmentation losses on channel-last logits: Dice + cross-entropy (default), focal, Tversky.

Logits are float (B, X, Y, Z, C), labels int (B, X, Y, Z). An optional `mask` (B, X, Y, Z)
leaves out the voxels where it is 0 (a pasted node's unscored surroundings, lnfm/data/paste.py):
they add nothing to any sum and count in no mean. Soft Dice/Tversky are
computed over the whole batch by default ("batch dice"): lymph nodes are small
and many training patches hold none, and a per-patch Dice of an empty class is
either meaningless or explodes the gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lnfm.config import ConfigError, check_in, unread_in_mode


@dataclasses.dataclass
class LossConfig:
    name: Literal["dice_ce", "dice_focal", "focal", "tversky", "ce"] = "dice_ce"  # loss family
    dice_weight: float = 1.0  # weight of the soft Dice (or Tversky) term in dice_ce / dice_focal
    ce_weight: float = 1.0  # weight of the cross-entropy (or focal) term
    include_background: bool = False  # whether class 0 enters the Dice/Tversky mean
    batch_dice: bool = True  # pool Dice sums over the batch instead of averaging per patch
    smooth: float = 1e-5  # additive smoothing of Dice/Tversky numerator and denominator
    focal_gamma: float = 2.0  # focusing exponent of the focal loss
    focal_alpha: float | None = None  # focal class balance: 1-alpha for background, alpha for the rest
    tversky_alpha: float = 0.3  # Tversky weight of false positives
    tversky_beta: float = 0.7  # Tversky weight of false negatives (>alpha favours sensitivity)
    deep_supervision_decay: float = 0.5  # weight of deep-supervision output i is decay**i (normalised)


# The loss keys one family reads -> those families (`segmentation_loss`); the rest are read by all.
_REGION = ("dice_ce", "dice_focal", "tversky")  # the Dice / Tversky term's settings
READ_BY = {"dice_weight": ("dice_ce", "dice_focal"), "ce_weight": ("dice_ce", "dice_focal"),
           "include_background": _REGION, "batch_dice": _REGION, "smooth": _REGION,
           "focal_gamma": ("dice_focal", "focal"), "focal_alpha": ("dice_focal", "focal"),
           "tversky_alpha": ("tversky",), "tversky_beta": ("tversky",)}


def unread_keys(cfg: LossConfig) -> dict[str, str]:
    """The loss keys cfg.name never reads -> why (`lnfm.config.refuse_unread`)."""
    return unread_in_mode("loss", "name", cfg.name, READ_BY)


def check_loss(cfg: LossConfig) -> None:
    """The `loss` section's ranges, before anything is written; each refusal names the key and its valid
    range. A weight below 0 would maximise its term; a term that is 0 whatever the logits trains nothing."""
    need = functools.partial(check_in, "loss", cfg)  # need(name, ok, interval, what="")

    need("dice_weight", lambda v: v >= 0, "[0, inf)")
    need("ce_weight", lambda v: v >= 0, "[0, inf)")
    if cfg.name in ("dice_ce", "dice_focal") and cfg.dice_weight == cfg.ce_weight == 0:
        raise ConfigError(f"loss.dice_weight and loss.ce_weight are both 0: loss.name={cfg.name} would train nothing")
    need("smooth", lambda v: v >= 0, "[0, inf)")
    need("focal_gamma", lambda v: v >= 0, "[0, inf)", " (0 = cross-entropy)")
    need("focal_alpha", lambda v: 0 <= v <= 1, "[0, 1]", " (the foreground's weight; the background's is 1 - alpha)")
    need("tversky_alpha", lambda v: v >= 0, "[0, inf)")  # above 1 is still an index in [0, 1]
    need("tversky_beta", lambda v: v >= 0, "[0, inf)")
    if cfg.name == "tversky" and cfg.tversky_alpha == cfg.tversky_beta == 0:
        raise ConfigError("loss.tversky_alpha and loss.tversky_beta are both 0: the Tversky index is then 1 "
                          "whatever the prediction")
    need("deep_supervision_decay", lambda v: 0 < v <= 1, "(0, 1]", " (output i weighs decay**i; to supervise "
         "the full resolution alone set head.deep_supervision=false)")


def _probs_onehot(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return probs, onehot


def _reduce_axes(ndim: int, batch: bool) -> tuple[int, ...]:
    # Spatial axes, plus the batch axis when pooling over the batch; the class axis is last.
    return tuple(range(0 if batch else 1, ndim - 1))


def _select_classes(score: jax.Array, include_background: bool) -> jax.Array:
    return score if include_background else score[..., 1:]


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(x)
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over all (or the masked) voxels."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -_masked_mean(picked, mask)


def tversky_loss(logits: jax.Array, labels: jax.Array, alpha: float = 0.5, beta: float = 0.5, *,
                 include_background: bool = False, batch: bool = True, smooth: float = 1e-5,
                 mask: jax.Array | None = None) -> jax.Array:
    """1 - TP / (TP + alpha FP + beta FN), soft, averaged over classes (and patches unless `batch`).

    alpha = beta = 0.5 is the soft Dice loss."""
    probs, onehot = _probs_onehot(logits, labels)
    if mask is not None:  # a left-out voxel is neither predicted nor labelled
        m = mask.astype(jnp.float32)[..., None]
        probs, onehot = probs * m, onehot * m
    axes = _reduce_axes(probs.ndim, batch)
    tp = jnp.sum(probs * onehot, axis=axes)
    fp = jnp.sum(probs * (1.0 - onehot), axis=axes)
    fn = jnp.sum((1.0 - probs) * onehot, axis=axes)
    score = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return jnp.mean(1.0 - _select_classes(score, include_background))


def dice_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = False, batch: bool = True,
              smooth: float = 1e-5, mask: jax.Array | None = None) -> jax.Array:
    """Soft Dice loss 1 - 2|P.G| / (|P| + |G|) on softmax probabilities."""
    return tversky_loss(logits, labels, 0.5, 0.5, include_background=include_background, batch=batch, smooth=smooth,
                        mask=mask)


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0, alpha: float | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """Mean over voxels of -alpha_t (1 - p_t)^gamma log p_t (gamma = 0, alpha = None is cross-entropy)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp_t = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = -((1.0 - jnp.exp(logp_t)) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * jnp.where(labels == 0, 1.0 - alpha, alpha)
    return _masked_mean(loss, mask)


def segmentation_loss(cfg: LossConfig, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
                      ) -> jax.Array:
    """The configured loss for one output at the labels' resolution."""
    region = dict(include_background=cfg.include_background, batch=cfg.batch_dice, smooth=cfg.smooth, mask=mask)
    if cfg.name == "dice_ce":
        return (cfg.dice_weight * dice_loss(logits, labels, **region)
                + cfg.ce_weight * cross_entropy(logits, labels, mask))
    if cfg.name == "dice_focal":
        return (cfg.dice_weight * dice_loss(logits, labels, **region)
                + cfg.ce_weight * focal_loss(logits, labels, cfg.focal_gamma, cfg.focal_alpha, mask))
    if cfg.name == "focal":
        return focal_loss(logits, labels, cfg.focal_gamma, cfg.focal_alpha, mask)
    if cfg.name == "tversky":
        return tversky_loss(logits, labels, cfg.tversky_alpha, cfg.tversky_beta, **region)
    if cfg.name == "ce":
        return cross_entropy(logits, labels, mask)
    raise ConfigError(f"unknown loss '{cfg.name}'")


def downsample_labels(labels: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """Nearest-neighbour label map at a coarser resolution: output voxel i takes the label
    at the centre of the input span it covers (for an integer factor f: index i*f + f//2),
    so thin structures keep their class."""
    out = labels
    for axis, size in enumerate(spatial, start=1):
        full = labels.shape[axis]
        if full == size:
            continue
        if size > full:
            raise ValueError(f"output size {size} exceeds the label size {full} on axis {axis}")
        idx = jnp.floor((jnp.arange(size) + 0.5) * (full / size)).astype(jnp.int32)
        out = jnp.take(out, idx, axis=axis)
    return out


def deep_supervision_loss(cfg: LossConfig, outputs: Sequence[jax.Array], labels: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
    """Weighted loss over outputs ordered full resolution first; labels (and the mask) are
    subsampled to each coarser output. Weights decay**i, normalised to sum to one."""
    weights = [cfg.deep_supervision_decay ** i for i in range(len(outputs))]
    total = sum(weights)
    loss = 0.0
    for w, out in zip(weights, outputs):
        spatial = out.shape[1:-1]
        m = None if mask is None else downsample_labels(mask, spatial)
        loss = loss + (w / total) * segmentation_loss(cfg, out, downsample_labels(labels, spatial), m)
    return loss


def model_output_loss(cfg: LossConfig, out, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The loss of a segmenter's output as the finetuning step computes it: logits, or with deep
    supervision `(logits, [coarser logits, ...])`."""
    if isinstance(out, tuple):
        return deep_supervision_loss(cfg, [out[0], *out[1]], labels, mask)
    return segmentation_loss(cfg, out, labels, mask)
