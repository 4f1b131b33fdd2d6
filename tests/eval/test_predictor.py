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


def test_window_box_is_the_body_box_plus_margin_grown_to_a_window():
    from lnfm.eval.predictor import window_box

    body = np.zeros((40, 30, 20), bool)
    body[10:20, 5:25, 8:12] = True
    # margin 2 on each side; z (4 + 4 = 8 voxels) grows about its centre to the 10-voxel window
    assert window_box(body, (6, 6, 10)) == (slice(8, 22), slice(3, 27), slice(5, 15))
    # a window larger than the volume along an axis: the whole axis (the sliding window pads)
    assert window_box(body, (6, 40, 30)) == (slice(8, 22), slice(0, 30), slice(0, 20))
    body[:] = False
    body[0:2, 28:30, 0:1] = True  # at the volume's corner: growing stays inside the volume
    assert window_box(body, (8, 8, 8)) == (slice(0, 8), slice(22, 30), slice(0, 8))
    assert window_box(np.zeros((4, 4, 4), bool), (2, 2, 2)) == (slice(None),) * 3
    assert window_box(None, (2, 2, 2)) == (slice(None),) * 3


def test_windows_skip_the_couch_and_a_detached_arm_and_the_mask_is_the_same():
    """A body, a detached 'arm' and a 'couch' slab above -500 HU: the windows cover only the body's
    box (plus margin), and with a pointwise network the labels equal those of windows over the whole
    volume restricted to the body, while the probabilities outside the box are background."""
    from lnfm.eval.postprocess import body_mask_from_ct, restrict_to_body

    hu = np.full((64, 56, 16), -1000.0, np.float32)
    hu[8:40, 6:40, :] = 40.0  # the body
    hu[46:60, 10:30, :] = 30.0  # an arm, apart from the body
    hu[4:60, 46:50, :] = 200.0  # the couch
    rng = np.random.default_rng(0)
    image = (rng.uniform(0, 1, hu.shape) * (hu > -500)).astype(np.float32)[..., None]
    seen = []

    def counting(x):
        seen.append(len(x))
        return _pointwise(x)

    post = PostprocessConfig(min_volume_mm3=0.0, body_threshold_hu=-500.0)
    pred = Predictor(counting, (16, 16, 16), 2, InferenceConfig(overlap=0.5, sw_batch_size=1), post)
    seg = pred(image, (1.0, 1.0, 1.0), hu)
    box_windows = len(seen)
    # every window over the whole volume (no body restriction in the predictor), restricted afterwards
    seen.clear()
    whole = Predictor(counting, (16, 16, 16), 2, InferenceConfig(overlap=0.5, sw_batch_size=1),
                      PostprocessConfig(min_volume_mm3=0.0, body_threshold_hu=None))(image, (1.0, 1.0, 1.0), None)
    # body box 6:42 x 4:42 (32 + 4 and 34 + 4 voxels): 4 x 4 windows of 16 at stride 8; whole volume 7 x 6
    assert (box_windows, len(seen)) == (4 * 4 * 1, 7 * 6 * 1)
    expected = restrict_to_body(whole.labels > 0, body_mask_from_ct(hu, -500.0))
    assert expected.any()
    np.testing.assert_array_equal(seg.labels > 0, expected)
    outside = np.ones(hu.shape, bool)
    outside[6:42, 4:42, :] = False
    assert (seg.probabilities[outside] == [1.0, 0.0]).all()
    np.testing.assert_allclose(seg.probabilities[6:42, 4:42, :, 1], image[6:42, 4:42, :, 0], atol=1e-6)


def test_window_box_on_a_real_ct_leaves_out_the_couch_and_the_arm(shared_data):
    """The Siemens series in ../shared/data: above -500 HU it holds the body, an arm beside it and the
    couch below it (scipy's labelling, by size). The windows' box is the body component's box plus
    the margin, not the box of everything above the threshold."""
    from scipy import ndimage

    from lnfm.eval.postprocess import body_mask_from_ct
    from lnfm.eval.predictor import window_box
    from lnfm.io import read_image

    hu = np.asarray(read_image(shared_data / "ct/totalsegmentator/example_ct_dicom").data, np.float32)
    hu = hu[..., 0] if hu.ndim == 4 else hu
    labels, n = ndimage.label(hu > -500)
    sizes = np.bincount(labels.ravel())[1:]
    boxes = ndimage.find_objects(labels)
    body = boxes[int(np.argmax(sizes))]
    everything = [slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)]
    got = window_box(body_mask_from_ct(hu), (16, 16, 16))
    assert got == tuple(slice(max(0, s.start - 2), min(m, s.stop + 2)) for s, m in zip(body, hu.shape))
    area = lambda box: (box[0].stop - box[0].start) * (box[1].stop - box[1].start)  # noqa: E731
    assert area(got) < 0.7 * area(everything)  # the couch and the arm were most of the rest
