"""The one inference path: jitted softmax, sliding window, argmax and post-processing.

Finetuning validates and tests with a `Predictor`, and `lnfm predict` segments new
scans with one built from the export, so the metrics in summary.json are the
metrics of the masks predict writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lnfm.data.geometry import body_bbox
from lnfm.eval.inference import InferenceConfig, sliding_window_inference
from lnfm.eval.postprocess import PostprocessConfig, body_mask_from_ct, postprocess

if TYPE_CHECKING:
    from flax import nnx


def softmax_fn(graphdef: nnx.GraphDef) -> Callable:
    """jitted (states, x) -> class probabilities (B, *roi, K) float32; `states` are the
    nnx.merge arguments after the graphdef (a train state's (params, frozen, rest), or one State).
    JAX is imported here, not with the module: an ONNX Runtime prediction never loads it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def probabilities(states, x):
        out = nnx.merge(graphdef, *states)(x)
        logits = out[0] if isinstance(out, tuple) else out  # deep supervision: the finest output
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return probabilities


@dataclasses.dataclass
class Segmentation:
    labels: np.ndarray  # (X, Y, Z) uint8 after post-processing
    probabilities: np.ndarray  # (X, Y, Z, K) float32 class probabilities (before post-processing)


@dataclasses.dataclass
class Predictor:
    """Segments a normalised volume on the model's grid."""

    probabilities: Callable[[np.ndarray], np.ndarray]  # normalised windows (B, *roi, C) -> (B, *roi, K)
    roi: tuple[int, int, int]  # window size in voxels
    num_classes: int
    inference: InferenceConfig  # overlap, blending, batch, flips (its roi is ignored: `roi` rules)
    postprocess: PostprocessConfig  # body restriction and small-component removal

    @classmethod
    def from_states(cls, graphdef: nnx.GraphDef, states: tuple, **kwargs) -> Predictor:
        fn = softmax_fn(graphdef)
        return cls(lambda x: np.asarray(fn(states, x)), **kwargs)

    def with_states(self, graphdef: nnx.GraphDef, states: tuple, fn: Callable | None = None) -> Predictor:
        """The same settings over other weights; pass `fn` (a `softmax_fn`) to reuse its compilation."""
        fn = fn or softmax_fn(graphdef)
        return dataclasses.replace(self, probabilities=lambda x: np.asarray(fn(states, x)))

    def __call__(self, image: np.ndarray, spacing, hu: np.ndarray | None) -> Segmentation:
        """`image` (X, Y, Z, C) normalised; `hu` the CT channel in HU as stored (None: no CT, no body
        restriction); `spacing` in mm for the component volumes.

        With the body restriction on, the windows cover only the body's bounding box (`window_box`):
        the mask is zero outside the body anyway, and a scan's couch and arms (the body is the largest
        connected region) would otherwise cost windows. Outside the box the probabilities are background."""
        inf, body = self.inference, None
        if hu is not None and self.postprocess.body_threshold_hu is not None:
            body = body_mask_from_ct(hu, self.postprocess.body_threshold_hu)
        box = window_box(body, self.roi)
        probs = sliding_window_inference(self.probabilities, image[box], self.roi, overlap=inf.overlap,
                                         mode=inf.mode, sigma_scale=inf.sigma_scale, sw_batch_size=inf.sw_batch_size,
                                         tta_flips=inf.tta_flips, num_classes=self.num_classes)
        if probs.shape[:3] != image.shape[:3]:
            full = np.zeros((*image.shape[:3], probs.shape[-1]), np.float32)
            full[..., 0] = 1.0
            full[box] = probs
            probs = full
        if probs.shape[-1] == 2:  # argmax's answer (ties go to background) without its slow 2-long reduction
            labels = (probs[..., 1] > probs[..., 0]).astype(np.uint8)
        else:
            labels = np.argmax(probs, axis=-1).astype(np.uint8)
        keep = postprocess(labels > 0, spacing, self.postprocess, hu=hu, body=body)
        return Segmentation(labels * keep.astype(np.uint8), probs)


BODY_MARGIN = 2  # voxels around the body's box, as prepare's body crop keeps (`lnfm.data.geometry.body_bbox`)


def window_box(body: np.ndarray | None, roi) -> tuple[slice, ...]:
    """The part of the volume the windows cover: the bounding box of `body` plus BODY_MARGIN (prepare's
    `body_bbox`), grown about its centre to at least `roi` where the volume allows; the whole volume
    without a body mask or with an empty one."""
    if body is None or not body.any():
        return (slice(None),) * 3
    out = []
    for lo, hi, r, n in zip(*body_bbox(body, 0, BODY_MARGIN), roi, body.shape):
        if hi - lo < r:  # a window's worth of context, shifted inside the volume
            lo = max(0, min(n - r, (lo + hi - r) // 2))
            hi = min(n, lo + r)
        out.append(slice(lo, hi))
    return tuple(out)
