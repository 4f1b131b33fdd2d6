"""The one inference path: jitted softmax of a model, sliding window, argmax and post-processing,
checked against hand-computed masks and numpy's softmax."""

import numpy as np
from flax import nnx

from lnfm.eval.inference import InferenceConfig
from lnfm.eval.postprocess import PostprocessConfig
from lnfm.eval.predictor import Predictor, softmax_fn


def _pointwise(x: np.ndarray) -> np.ndarray:
    """Foreground probability = the input itself: blending windows of a pointwise map changes nothing."""
    p = np.clip(x[..., :1], 0.0, 1.0)
    return np.concatenate([1.0 - p, p], axis=-1)


def test_labels_are_thresholded_then_cleaned_as_configured():
    image = np.zeros((24, 20, 16, 1), np.float32)
    image[2:5, 2:5, 2:5] = 0.9  # 27 voxels of 2 mm^3 = 54 mm^3: kept
    image[10:12, 10:12, 10:12] = 0.8  # 8 voxels = 16 mm^3: under 20 mm^3, removed
    image[18:21, 14:17, 8:11] = 0.7  # 54 mm^3 but outside the body: removed
    hu = np.full(image.shape[:3], 40.0, np.float32)
    hu[16:, 12:, :] = -1000.0  # air corner
    hu[16, 12:, :] = 40.0  # keep the body one connected region
    pred = Predictor(_pointwise, (8, 8, 8), 2, InferenceConfig(overlap=0.5, sw_batch_size=3),
                     PostprocessConfig(min_volume_mm3=20.0, body_threshold_hu=-500.0))
    seg = pred(image, (1.0, 1.0, 2.0), hu)
    expected = np.zeros(image.shape[:3], np.uint8)
    expected[2:5, 2:5, 2:5] = 1
    np.testing.assert_array_equal(seg.labels, expected)
    np.testing.assert_allclose(seg.probabilities[..., 1], image[..., 0], atol=1e-6)
    # Without a CT channel only the small-component rule applies.
    no_ct = pred(image, (1.0, 1.0, 2.0), None).labels
    assert no_ct[18:21, 14:17, 8:11].all() and not no_ct[10:12, 10:12, 10:12].any()


def test_two_class_labels_equal_numpy_argmax_ties_included():
    """The 2-class shortcut (foreground where p1 > p0) against np.argmax of the blended probabilities,
    on random values and on exact ties (argmax: the first class, background)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, (20, 18, 12, 1)).astype(np.float32)
    image[::3] = 0.5  # p0 == p1 exactly
    pred = Predictor(_pointwise, (8, 8, 8), 2, InferenceConfig(overlap=0.5, sw_batch_size=2),
                     PostprocessConfig(min_volume_mm3=0.0))
    seg = pred(image, (1.0, 1.0, 1.0), None)
    expected = np.argmax(seg.probabilities, axis=-1)
    assert 0 < expected.mean() < 1 and not expected[::3].any()
    np.testing.assert_array_equal(seg.labels, expected)


def test_softmax_fn_matches_numpy_softmax_of_the_logits():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4, 2)).astype(np.float32)
    got = np.asarray(softmax_fn(graphdef)((state,), x))
    logits = x @ np.asarray(model.kernel[...]) + np.asarray(model.bias[...])
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
