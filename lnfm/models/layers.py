"""Transformer building blocks shared by the ViT, MAE and Swin models.

Every parameter carries logical axis names (resolved to the mesh by
`lnfm.models.sharding.RULES`). Defaults follow MONAI's ViT blocks (LayerNorm eps
1e-5, exact-erf GELU) so weights move between the two without options.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lnfm.models.sharding import constrain

log = logging.getLogger("lnfm.models")

LN_EPS = 1e-5
TOKENS = ("batch", "length", "act_embed")  # logical names of a (B, T, D) token stream
HEADS4 = ("batch", "length", "act_heads", None)  # (B, T, heads, head_dim)
HEADS5 = ("batch", "length", "act_heads", None, None)  # (B, T, heads, 3, head_dim)

_trunc = nnx.initializers.truncated_normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def fan_in_uniform(scale: float):
    """`variance_scaling(scale, "fan_in", "uniform")` for (..., cin, cout) kernels, drawn as a
    (fan_in, cout) matrix and reshaped.

    The values equal the library's draw in the kernel's own shape bit for bit (the same fan-in, and
    threefry's bits follow the flat index), but XLA:CPU compiles the partitionable threefry over a
    5-D shape about 10x slower (2-6 s per kernel against 0.2 s): seconds before a model's first step.
    """
    base = nnx.initializers.variance_scaling(scale, "fan_in", "uniform")

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(shape)
        return base(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

    return init


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def dtype_of(name: str):
    """'float32' / 'bfloat16' / 'float16' -> jnp dtype, with a clear error."""
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype '{name}'") from None


def dtype_problem_here(name: str, where: str = "model.dtype") -> str | None:
    """Why compute dtype `name` cannot run on this process's backend: XLA:CPU has no float16 matmul
    (dot_general refuses F16_F16_F32), so a float16 model fails at its first attention."""
    if name == "float16" and jax.default_backend() == "cpu":
        return f"{where} float16 does not run on a CPU (XLA:CPU has no float16 matmul); use bfloat16 or float32"
    return None


def no_eager_sharding():
    """Build parameters without a mesh; `create_sharded_model` places them afterwards."""
    return nnx.use_eager_sharding(False)


def linear(din: int, dout: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs, bias: bool = True,
           dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
    """nnx.Linear with logical names on kernel (din, dout) and bias (dout,)."""
    with no_eager_sharding():
        return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=nnx.with_partitioning(_trunc, names),
                          bias_init=nnx.with_partitioning(_zeros, (names[1],)), rngs=rngs)


def layer_norm(dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.LayerNorm:
    """LayerNorm with MONAI's epsilon and logical name 'norm'."""
    with no_eager_sharding():
        return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                             scale_init=nnx.with_partitioning(_ones, ("norm",)),
                             bias_init=nnx.with_partitioning(_zeros, ("norm",)), rngs=rngs)


def param(value: jax.Array, names: tuple) -> nnx.Param:
    """A free-standing parameter (token, table) with logical names."""
    with no_eager_sharding():
        return nnx.Param(value, out_sharding=names)


def attention_implementation(dtype, head_dim: int) -> str:
    """'cudnn' (fused flash attention) on GPU where its kernels apply, else 'xla'.

    Chosen explicitly: `implementation=None` is the XLA path in the installed JAX,
    which materialises the full T x T scores. cuDNN's fused kernel needs fp16/bf16
    inputs and a head dimension that is a multiple of 8 up to 128.
    """
    ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)
    impl = "cudnn" if ok else "xla"
    _log_attention_once(impl, jnp.dtype(dtype).name, head_dim)
    return impl


@functools.cache
def _log_attention_once(impl: str, dtype: str, head_dim: int) -> None:
    log.info("attention: %s (backend %s, %s, head_dim %d)", impl, jax.default_backend(), dtype, head_dim)


class Attention(nnx.Module):
    """Multi-head self-attention: packed `qkv` laid out head-major (heads, 3, head_dim), then `proj`.

    Head-major packing puts each head's q, k and v side by side, so splitting the
    packed axis over the 'tensor' mesh axis gives every rank whole heads (Megatron
    style) and attention runs sharded by heads with no all-gather of the qkv output.
    MONAI packs (3, heads, head_dim); `lnfm.models.interop` permutes on exchange.
    """

    def __init__(self, width: int, heads: int, *, qkv_bias: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = linear(width, 3 * width, ("embed", "qkv"), bias=qkv_bias, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)
        self.proj = linear(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.heads
        qkv = constrain(self.qkv(x).reshape(b, t, self.heads, 3, hd), HEADS5)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        out = jax.nn.dot_product_attention(q, k, v, implementation=attention_implementation(q.dtype, hd))
        out = constrain(out, HEADS4)
        return self.proj(out.reshape(b, t, d))


class MLP(nnx.Module):
    """Two-layer MLP with exact (erf) GELU."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = linear(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = linear(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, qkv_bias: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layer_norm(width, **kw)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias, **kw)
        self.norm2 = layer_norm(width, **kw)
        self.mlp = MLP(width, mlp_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return constrain(x, TOKENS)


def run_block(block: nnx.Module, x: jax.Array, remat: str = "none") -> jax.Array:
    """Apply a block, rematerialised under the named checkpoint policy."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy '{remat}' (choices: {', '.join(REMAT_POLICIES)})")
    if remat == "none":
        return block(x)
    return nnx.remat(lambda blk, h: blk(h), policy=REMAT_POLICIES[remat])(block, x)


class PatchEmbed(nnx.Module):
    """Non-overlapping conv patch embedding of a channel-last volume (B, X, Y, Z, C) -> (B, gx, gy, gz, D)."""

    def __init__(self, in_channels: int, width: int, patch_size: tuple[int, int, int], *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.patch_size = tuple(int(p) for p in patch_size)
        init = fan_in_uniform(1.0 / 3.0)  # PyTorch's conv default
        with no_eager_sharding():
            self.proj = nnx.Conv(in_channels, width, kernel_size=self.patch_size, strides=self.patch_size,
                                 padding="VALID", dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=nnx.with_partitioning(init, (None, None, None, "patch", "embed")),
                                 bias_init=nnx.with_partitioning(_zeros, ("embed",)),
                                 rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for axis, (n, p) in enumerate(zip(x.shape[1:4], self.patch_size)):
            if n % p:
                raise ValueError(f"input size {tuple(x.shape[1:4])} is not divisible by patch {self.patch_size} "
                                 f"(axis {axis})")
        return self.proj(x)


def sincos_3d(grid: tuple[int, int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 3D sin-cos table (gx*gy*gz, dim), tokens in C order of (gx, gy, gz).

    Feature layout matches MONAI's `build_sincos_position_embedding`: blocks of
    dim//6 features [sin Y, cos Y, sin X, cos X, sin Z, cos Z]; when dim is not a
    multiple of 6 the remaining features are zero.
    """
    pos_dim = dim // 6
    if pos_dim == 0:
        raise ValueError(f"sin-cos position embedding needs width >= 6, got {dim}")
    omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float64) / pos_dim)
    gx, gy, gz = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid), indexing="ij")
    parts = []
    for coord in (gy, gx, gz):
        out = coord.reshape(-1)[:, None] * omega[None, :]
        parts += [np.sin(out), np.cos(out)]
    table = np.concatenate(parts, axis=1)
    pad = dim - table.shape[1]
    return np.pad(table, ((0, 0), (0, pad))).astype(np.float32)


def resize_table(table: jax.Array, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int]) -> jax.Array:
    """Trilinearly resample a learned (N, D) position table from one token grid to another."""
    if tuple(src_grid) == tuple(dst_grid):
        return table
    d = table.shape[-1]
    vol = table.reshape(*src_grid, d)
    return jax.image.resize(vol, (*dst_grid, d), method="trilinear").reshape(-1, d)
