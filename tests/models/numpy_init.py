"""Fast parameter init and quick-compiling jit for model tests.

Eager `nnx` construction compiles one XLA random program per parameter shape
(seconds each on a busy CPU); tests that only need *some* well-scaled weights
build the model abstractly and fill it from numpy instead.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def numpy_init(build, seed: int = 0):
    """`build()` evaluated abstractly, then parameters filled from numpy: kernels and
    tables ~ N(0, 1/fan_in), LayerNorm/InstanceNorm scales 1, biases 0."""
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = []
    for path, leaf in nnx.to_flat_state(state):
        name = str(path[-1])
        shape, dtype = leaf.shape, leaf.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            value = jax.random.key(seed)
        elif name == "scale":
            value = np.ones(shape)
        elif name == "bias" or len(shape) <= 1:
            value = 0.02 * rng.standard_normal(shape)
        else:
            fan_in = math.prod(shape[:-1]) or 1
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
        if not isinstance(value, jax.Array):
            value = jnp.asarray(value, dtype)
        flat.append((path, leaf.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# XLA's CPU backend at optimisation level 0 compiles these small models about 3x
# faster and runs them at similar speed; tests compile far more than they run.
_QUICK = {"xla_backend_optimization_level": 0}


def quick_jit(fn):
    """Jit `fn(module, *arrays)` (a pure forward: the module is not changed) with the
    quick-compile options; one compiled program per module structure and shapes."""
    cache = {}

    def call(module, *args):
        graphdef, state = nnx.split(module)
        if graphdef not in cache:
            cache[graphdef] = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a), compiler_options=_QUICK)
        return cache[graphdef](state, *args)

    return call
