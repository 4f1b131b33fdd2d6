"""Model building blocks shared by the encoders and heads (`lnfm.models.layers`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lnfm.models.heads.blocks import Conv3D
from lnfm.models.layers import PatchEmbed, fan_in_uniform


@pytest.mark.parametrize("scale, shape", [(2.0, (3, 3, 3, 2, 3)), (2.0, (2, 2, 2, 4, 2)), (1.0 / 3.0, (4, 4, 4, 1, 6)),
                                          (2.0, (1, 1, 1, 64, 2))])
def test_fan_in_uniform_is_flax_variance_scaling_bit_for_bit(scale, shape):
    # Drawn as a (fan_in, cout) matrix and reshaped (fast to compile on XLA:CPU), it must stay the
    # library's init of the kernel's own shape, value for value.
    key = jax.random.key(11)
    ours = np.asarray(fan_in_uniform(scale)(key, shape, jnp.float32))
    ref = np.asarray(nnx.initializers.variance_scaling(scale, "fan_in", "uniform")(key, shape, jnp.float32))
    np.testing.assert_array_equal(ours, ref)
    bound = np.sqrt(3.0 * scale / np.prod(shape[:-1]))
    assert np.abs(ours).max() <= bound and np.abs(ours).max() > 0.8 * bound


def test_conv_and_patch_embedding_kernels_use_it():
    # He init (scale 2) for the heads' convolutions, PyTorch's conv default (1/3) for the patch embedding.
    conv = Conv3D(2, 3, 3, rngs=nnx.Rngs(5))
    ref = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")(nnx.Rngs(5).params(), (3, 3, 3, 2, 3))
    np.testing.assert_array_equal(np.asarray(conv.kernel[...]), np.asarray(ref))
    embed = PatchEmbed(1, 6, (4, 4, 4), rngs=nnx.Rngs(5))
    ref = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")(nnx.Rngs(5).params(), (4, 4, 4, 1, 6))
    np.testing.assert_array_equal(np.asarray(embed.proj.kernel[...]), np.asarray(ref))
