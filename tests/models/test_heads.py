"""Segmentation heads on fake ViT- and Swin-shaped feature lists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from flax import nnx

from lnfm.models.heads import LinearProbe, build_head, head_flops, head_param_count
from lnfm.models.heads.blocks import assign_levels, level_strides
from lnfm.models.heads.light import LightHead, sobel_magnitude
from numpy_init import numpy_init, quick_jit

VIT = ([(16, 16, 16)] * 4, [64] * 4)  # ViT-tiny: 4 block outputs at the patch stride
SWIN = ([(2 ** k,) * 3 for k in range(1, 6)], [12 * 2 ** k for k in range(5)])  # Swin-tiny stages


@quick_jit
def run(head, images, features):
    return head(images, features)


def fake_features(layout, spatial, batch=1, seed=0):
    strides, channels = layout
    keys = jax.random.split(jax.random.key(seed), len(strides))
    return [jax.random.normal(k, (batch, *(n // s for n, s in zip(spatial, st)), c))
            for k, st, c in zip(keys, strides, channels)]


def test_levels_and_assignment():
    assert level_strides((16, 16, 16)) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    assert level_strides((16, 16, 4)) == [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 2), (16, 16, 4)]
    assert assign_levels(VIT[0], level_strides((16,) * 3)) == [1, 2, 3, 4]  # UNETR: z3,z6,z9 -> 2,4,8
    assert assign_levels(SWIN[0], level_strides((32,) * 3)) == [1, 2, 3, 4, 5]
    assert assign_levels([(16,) * 3] * 6, level_strides((16,) * 3)) == [-1, -1, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="powers of two"):
        level_strides((12, 12, 12))


@pytest.mark.parametrize("name", ["unetr", "light", "fine", "linear"])
@pytest.mark.parametrize("layout", [VIT, SWIN], ids=["vit", "swin"])
def test_head_shapes_with_deep_supervision(name, layout):
    spatial = (32, 32, 32)
    head = numpy_init(lambda: build_head(name, *layout, in_channels=1, num_classes=3, deep_supervision=True,
                                         rngs=nnx.Rngs(0), **({"feature_size": 8} if name == "unetr" else {})))
    images = jnp.ones((2, *spatial, 1))
    logits, aux = run(head, images, fake_features(layout, spatial, batch=2))
    assert logits.shape == (2, *spatial, 3)
    if name == "linear":
        stride = layout[0][-1][0]
        assert [a.shape for a in aux] == [(2, *(n // stride for n in spatial), 3)]
    else:
        assert [a.shape for a in aux] == [(2, 16, 16, 16, 3), (2, 8, 8, 8, 3)]
    assert np.isfinite(np.asarray(logits)).all()


def test_unetr_head_anisotropic_vit_patch():
    layout = ([(16, 16, 8)] * 4, [32] * 4)
    head = numpy_init(lambda: build_head("unetr", *layout, in_channels=2, num_classes=2, feature_size=8,
                                         rngs=nnx.Rngs(0)))
    spatial = (32, 32, 16)
    logits = run(head, jnp.ones((1, *spatial, 2)), fake_features(layout, spatial))
    assert logits.shape == (1, *spatial, 2)


def test_light_head_default_fits_two_million_params_on_vit_b():
    head = nnx.eval_shape(lambda: LightHead([(16, 16, 16)] * 4, [768] * 4, 1, 2, rngs=nnx.Rngs(0)))
    n = head_param_count(head)
    assert 100_000 < n <= 2_000_000, n


def test_sobel_matches_scipy():
    vol = np.random.default_rng(0).standard_normal((6, 7, 5)).astype(np.float32)
    ref = np.sqrt(sum(ndi.sobel(vol, axis=a, mode="nearest") ** 2 for a in range(3)))
    ours = np.asarray(sobel_magnitude(jnp.asarray(vol)[None, ..., None]))[0, ..., 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_light_head_uses_input_edges():
    # With identical features, the light head still reacts to the image (edge stem);
    # the linear probe, which ignores the image, does not.
    # Same configuration and shapes as the shape test above, so compiled code is reused.
    spatial = (32, 32, 32)
    feats = fake_features(VIT, spatial, batch=2)
    light = numpy_init(lambda: build_head("light", *VIT, in_channels=1, num_classes=3, deep_supervision=True,
                                          rngs=nnx.Rngs(0)))
    probe = numpy_init(lambda: build_head("linear", *VIT, in_channels=1, num_classes=3, deep_supervision=True,
                                          rngs=nnx.Rngs(0)))
    a = jnp.ones((2, *spatial, 1))
    b = a.at[:, 8:24, 8:24, 8:24].set(2.0)
    assert np.abs(np.asarray(run(light, a, feats)[0] - run(light, b, feats)[0])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(run(probe, a, feats)[0]), np.asarray(run(probe, b, feats)[0]))


def test_param_count_and_flops_of_linear_probe():
    probe = numpy_init(lambda: LinearProbe(*VIT, 1, 3, rngs=nnx.Rngs(0)))
    assert head_param_count(probe) == 64 * 3 + 3
    f1 = head_flops(probe, (1, 64, 64, 64, 1))
    f2 = head_flops(probe, (2, 64, 64, 64, 1))
    assert f1 >= 2 * 4 ** 3 * 64 * 3  # at least the 1x1x1 conv's multiply-adds
    assert f2 == pytest.approx(2 * f1, rel=0.01)
    unetr = nnx.eval_shape(lambda: build_head("unetr", *VIT, in_channels=1, num_classes=3, feature_size=8,
                                              rngs=nnx.Rngs(0)))
    assert head_flops(unetr, (1, 64, 64, 64, 1)) > 100 * f1


def test_linear_probe_values_match_numpy_and_scipy():
    """Coarse logits = 1x1x1 conv of the deepest features (numpy); full-resolution logits = their
    trilinear upsampling with half-voxel centres and clamped edges (scipy.ndimage.zoom, grid_mode)."""
    probe = numpy_init(lambda: LinearProbe(*VIT, 1, 3, deep_supervision=True, rngs=nnx.Rngs(0)))
    spatial = (32, 64, 48)
    feats = fake_features(VIT, spatial, seed=3)
    logits, (coarse,) = run(probe, jnp.zeros((1, *spatial, 1)), feats)
    deepest = np.asarray(feats[-1], np.float64)[0]
    want = deepest @ np.asarray(probe.classify.kernel[...], np.float64)[0, 0, 0] + np.asarray(probe.classify.bias[...])
    np.testing.assert_allclose(np.asarray(coarse)[0], want, rtol=1e-5, atol=1e-5)
    up = np.stack([ndi.zoom(want[..., k], 16, order=1, mode="nearest", grid_mode=True) for k in range(3)], -1)
    np.testing.assert_allclose(np.asarray(logits)[0], up, rtol=1e-4, atol=1e-4)


def test_head_config_names_exactly_the_registered_heads():
    """A head kind that the config accepts is one `build_head` builds, and the reverse."""
    import typing

    from lnfm.models.heads import HEADS, HeadConfig

    assert set(typing.get_args(typing.get_type_hints(HeadConfig)["kind"])) == set(HEADS)
