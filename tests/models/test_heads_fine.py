"""Fine-stride head: strided convs against PyTorch, size budget, voxel-level detail."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from lnfm.models.heads import build_head, head_param_count
from lnfm.models.conv_forms import native_convs
from lnfm.models.heads.fine import DownConv3D, FineHead
from numpy_init import numpy_init, quick_jit

VIT = ([(8, 8, 8)] * 4, [64] * 4)


@quick_jit
def run(head, images, features):
    return head(images, features)


def test_down_conv_matches_torch_strided_conv():
    rng = np.random.default_rng(0)
    down = DownConv3D(3, 5, (2, 2, 1), rngs=nnx.Rngs(0))
    down.kernel[...] = jnp.asarray(rng.standard_normal((2, 2, 1, 3, 5)), jnp.float32)
    down.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
    x = rng.standard_normal((2, 6, 4, 3, 3)).astype(np.float32)
    ref = torch.nn.functional.conv3d(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)),
                                     torch.from_numpy(np.array(down.kernel[...]).transpose(4, 3, 0, 1, 2)),
                                     torch.from_numpy(np.array(down.bias[...])), stride=(2, 2, 1))
    ref = ref.numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(np.asarray(down(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    with native_convs():  # the exported form: one strided convolution
        np.testing.assert_allclose(np.asarray(down(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_fine_head_fits_two_million_params_on_vit_b_and_swin_b():
    vit_b = nnx.eval_shape(lambda: FineHead([(16, 16, 16)] * 4, [768] * 4, 1, 2, rngs=nnx.Rngs(0)))
    swin_b = nnx.eval_shape(lambda: FineHead([(2 ** k,) * 3 for k in range(1, 6)],
                                             [48 * 2 ** k for k in range(5)], 1, 2, rngs=nnx.Rngs(0)))
    for head in (vit_b, swin_b):
        assert 50_000 < head_param_count(head) <= 2_000_000, head_param_count(head)


def test_fine_head_sees_single_voxels_that_the_tokens_cannot():
    """Features fixed, one image voxel changed: the logits move most at that voxel (the
    stride-1 path), far more than one token (8 voxels) away."""
    spatial = (32, 32, 32)
    head = numpy_init(lambda: build_head("fine", *VIT, in_channels=1, num_classes=2, rngs=nnx.Rngs(0)))
    feats = [jnp.asarray(np.random.default_rng(i).standard_normal((1, 4, 4, 4, 64)), jnp.float32)
             for i in range(4)]
    a = jnp.asarray(np.random.default_rng(9).random((1, *spatial, 1)), jnp.float32)
    b = a.at[0, 13, 17, 11, 0].add(3.0)
    delta = np.abs(np.asarray(run(head, b, feats) - run(head, a, feats)))[0].max(-1)
    assert delta[13, 17, 11] > 1e-3
    far = delta.copy()
    far[13 - 8:13 + 9, 17 - 8:17 + 9, 11 - 8:11 + 9] = 0
    assert delta[13, 17, 11] > 10 * far.max()


def test_convs_per_level_adds_one_conv_norm_step_per_level_at_strides_2_and_4():
    """Two convs per level: one more 3x3x3 conv (no bias) + instance norm (scale, bias) at strides 2
    and 4 in the image path and in the decoder, at widths 16 and 32; nothing at full resolution
    or in the default head's parameter tree (older checkpoints restore)."""
    build = lambda n: nnx.eval_shape(lambda: FineHead(*VIT, 1, 2, convs_per_level=n, rngs=nnx.Rngs(0)))
    one, two = build(1), build(2)
    per_step = lambda c: 27 * c * c + 2 * c
    assert head_param_count(two) - head_param_count(one) == 2 * per_step(16) + 2 * per_step(32) == 69_312
    assert one.more is None
    assert [len(m) for m in two.more] == [1, 1, 0]  # decoder levels at strides 4, 2, 1
    assert [len(p) for p in list(two.path)[1:]] == [3, 3]  # down + two conv steps
