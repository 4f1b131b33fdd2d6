"""Sliding-window inference against MONAI's sliding_window_inference with the same 3D conv."""

import jax
import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference as monai_swi

from lnfm.eval.inference import importance_map, sliding_window_inference, window_problem, window_starts

C, K = 2, 3
RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, 3, 3, C, K)).astype(np.float32)
B = RNG.normal(size=K).astype(np.float32)


def conv_fn(x):
    """A 3x3x3 zero-padded conv: its outputs near window borders depend on window placement."""
    y = jax.lax.conv_general_dilated(x, W, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + B


def torch_conv():
    conv = torch.nn.Conv3d(C, K, 3, padding=1)
    conv.weight.data = torch.from_numpy(W.transpose(4, 3, 0, 1, 2).copy())
    conv.bias.data = torch.from_numpy(B)
    return conv


def monai_reference(volume, roi, overlap, mode="gaussian", cval=0.0, padding_mode="constant"):
    x = torch.from_numpy(volume.transpose(3, 0, 1, 2)[None].copy())
    with torch.no_grad():
        y = monai_swi(x, roi, 3, torch_conv(), overlap=overlap, mode=mode, sigma_scale=0.125, cval=cval,
                      padding_mode=padding_mode)
    return y[0].numpy().transpose(1, 2, 3, 0)


@pytest.mark.parametrize(
    "shape, roi, overlap, mode",
    [
        ((37, 29, 21), (16, 16, 8), 0.5, "gaussian"),
        ((40, 24, 24), (16, 12, 16), 0.7, "gaussian"),
        ((30, 20, 18), (12, 12, 12), 0.25, "constant"),
        ((10, 29, 5), (16, 12, 8), 0.5, "gaussian"),  # smaller than the window in x and z: padded
    ],
)
def test_matches_monai(shape, roi, overlap, mode):
    volume = RNG.normal(size=(*shape, C)).astype(np.float32)
    ours = sliding_window_inference(jax.jit(conv_fn), volume, roi, overlap=overlap, mode=mode, sw_batch_size=3,
                                    pad_mode="constant", pad_value=-1.0)
    ref = monai_reference(volume, roi, overlap, mode, cval=-1.0)
    assert ours.shape == (*shape, K) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_small_volumes_are_padded_by_repeating_their_border_as_monai_replicate():
    """The default padding of a volume thinner than the window repeats its border voxels (MONAI's
    padding_mode="replicate"), and differs from a constant fill where the window sees the padding."""
    volume = RNG.normal(size=(10, 29, 5, C)).astype(np.float32)
    ours = sliding_window_inference(jax.jit(conv_fn), volume, (16, 12, 8), overlap=0.5, sw_batch_size=3)
    ref = monai_reference(volume, (16, 12, 8), 0.5, padding_mode="replicate")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    constant = monai_reference(volume, (16, 12, 8), 0.5)
    assert np.abs(ours - constant)[0].max() > 0.1  # the border slab sees the padding through the 3x3x3 conv
    with pytest.raises(ValueError, match="pad_mode must be 'edge' or 'constant', got 'reflect'"):
        sliding_window_inference(conv_fn, volume, (16, 12, 8), pad_mode="reflect")


def test_window_grid_and_weights_match_monai():
    for size, roi, overlap in [((37, 29, 21), (16, 16, 8), 0.5), ((64, 40, 33), (32, 20, 11), 0.6)]:
        step = [max(int(r * (1 - overlap)), 1) if r < s else r for s, r in zip(size, roi)]
        ref = {tuple(sl.start for sl in win) for win in dense_patch_slices(size, roi, step)}
        ours = {(a, b, c) for a in window_starts(size[0], roi[0], overlap)
                for b in window_starts(size[1], roi[1], overlap) for c in window_starts(size[2], roi[2], overlap)}
        assert ours == ref
        for mode in ("gaussian", "constant"):
            np.testing.assert_allclose(importance_map(roi, mode), compute_importance_map(roi, mode).numpy(),
                                       rtol=1e-6)
    # Small sigma: tails clamp at 1e-3 as in MONAI.
    np.testing.assert_allclose(importance_map((20, 9, 4), sigma_scale=0.05),
                               compute_importance_map((20, 9, 4), "gaussian", sigma_scale=0.05).numpy(), rtol=1e-6)


def test_compiles_once_and_handles_a_partial_last_batch():
    traces = []

    @jax.jit
    def fn(x):
        traces.append(x.shape)
        return conv_fn(x)

    volume = RNG.normal(size=(30, 22, 14, C)).astype(np.float32)
    out = sliding_window_inference(fn, volume, (12, 12, 8), sw_batch_size=5)
    assert traces == [(5, 12, 12, 8, C)]
    ref = monai_reference(volume, (12, 12, 8), 0.5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_a_batch_larger_than_the_windows_computes_each_window_once():
    traces = []

    def fn(x):
        traces.append(x.shape)
        return conv_fn(x)

    volume = RNG.normal(size=(12, 10, 8, C)).astype(np.float32)  # one window
    out = sliding_window_inference(fn, volume, (12, 10, 8), sw_batch_size=100_000)
    assert traces == [(1, 12, 10, 8, C)]
    np.testing.assert_allclose(out, np.asarray(conv_fn(volume[None]))[0], rtol=1e-5, atol=1e-5)


def test_flip_tta():
    volume = RNG.normal(size=(12, 10, 8, C)).astype(np.float32)
    roi = volume.shape[:3]
    # One window covering the volume: TTA must equal the mean of flipped predictions, flipped back.
    out = sliding_window_inference(conv_fn, volume, roi, sw_batch_size=1, tta_flips=True)
    expected = np.mean([np.flip(np.asarray(conv_fn(np.flip(volume, axes)[None]))[0], axes)
                        for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]], axis=0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, sliding_window_inference(conv_fn, volume, roi, sw_batch_size=1), atol=1e-3)
    subset = sliding_window_inference(conv_fn, volume, roi, sw_batch_size=1, tta_flips=[(), (2,)])
    expected = (np.asarray(conv_fn(volume[None]))[0] + np.flip(np.asarray(conv_fn(np.flip(volume, 2)[None]))[0], 2)) / 2
    np.testing.assert_allclose(subset, expected, rtol=1e-5, atol=1e-5)
    # A flip-equivariant predictor (per-voxel linear map) is unchanged by TTA over many windows.
    big = RNG.normal(size=(30, 20, 16, C)).astype(np.float32)
    pointwise = lambda x: x @ W[1, 1, 1]  # noqa: E731
    np.testing.assert_allclose(sliding_window_inference(pointwise, big, (12, 12, 8), tta_flips=True),
                               big @ W[1, 1, 1], rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    volume = np.zeros((8, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="X, Y, Z, C"):
        sliding_window_inference(conv_fn, volume[..., 0], (4, 4, 4))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(conv_fn, volume, (4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="sw_batch_size: 0 windows per pass"):
        sliding_window_inference(conv_fn, volume, (4, 4, 4), sw_batch_size=0)
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        sliding_window_inference(lambda x: x[:, :2], volume, (4, 4, 4))
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_inference(lambda x: x, volume, (4, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match="tta_flips"):
        sliding_window_inference(lambda x: x, volume, (4, 4, 4), tta_flips=[(3,)])


def test_window_problem_names_each_setting_as_its_caller_knows_it():
    # One owner of the two ranges: the CLI flags, model.json's keys and the library's arguments.
    assert window_problem(0.0, 1) is None and window_problem(None, None) is None
    assert window_problem(1.0, 4, "--overlap") == \
        "--overlap: 1 is not in [0, 1) (the fraction of a window its neighbour shares)"
    assert window_problem(float("nan"), 4) is not None  # NaN is in no range
    assert window_problem(0.5, 0, batch_name="inference.sw_batch_size") == \
        "inference.sw_batch_size: 0 windows per pass; it must be at least 1"
