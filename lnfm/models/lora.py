"""Low-rank adapters (LoRA) on the attention projections of an encoder.

`apply_lora(encoder, rank, alpha, rngs)` wraps every `qkv` and `proj` nnx.Linear
(ViT and Swin attention alike) in a `LoRALinear`: output = base(x) +
(alpha / rank) * x @ A @ B, with B zero-initialised so the wrapped encoder starts
out computing exactly what it did. Adapter weights are `LoRAParam`, a subclass of
nnx.Param, so an optimizer can train only them (`nnx.Optimizer(model, tx,
wrt=LoRAParam)`, or the `lora` strategy in `lnfm.segmentation.strategies`).
`merge_lora(encoder)` folds the adapters into the base kernels and removes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.layers import no_eager_sharding

TARGETS = ("qkv", "proj")


class LoRAParam(nnx.Param):
    """A low-rank adapter weight (selectable apart from the frozen base weights)."""


def _names(var: nnx.Variable) -> tuple:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else (None, None)


class LoRALinear(nnx.Module):
    """`base(x) + (alpha / rank) * (x @ lora_a) @ lora_b`; `base` keeps its own parameters."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = float(alpha) / rank
        din, dout = base.in_features, base.out_features
        dtype = base.kernel[...].dtype
        in_name, out_name = _names(base.kernel)
        # A ~ U(-1/sqrt(din), 1/sqrt(din)) as in PyTorch's nn.Linear default; B = 0.
        bound = 1.0 / din ** 0.5
        a = jax.random.uniform(rngs.params(), (din, rank), jnp.float32, -bound, bound).astype(dtype)
        with no_eager_sharding():
            self.lora_a = LoRAParam(a, out_sharding=(in_name, None))
            self.lora_b = LoRAParam(jnp.zeros((rank, dout), dtype), out_sharding=(None, out_name))

    def delta(self) -> jax.Array:
        """Full-rank weight update (din, dout) the adapter adds to the base kernel."""
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        low = x.astype(y.dtype) @ self.lora_a[...].astype(y.dtype)
        return y + self.scale * (low @ self.lora_b[...].astype(y.dtype))


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set_child(node, key, value) -> None:
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def _parent(root, path):
    node = root
    for key in path[:-1]:
        node = _child(node, key)
    return node


def apply_lora(encoder: nnx.Module, rank: int = 8, alpha: float = 16.0, *, rngs: nnx.Rngs,
               targets: tuple[str, ...] = TARGETS) -> nnx.Module:
    """Wrap, in place, every nnx.Linear named in `targets` inside `encoder` with a
    LoRALinear; returns the encoder. Raises if nothing matched."""
    found = [(tuple(path), node) for path, node in nnx.iter_graph(encoder)
             if isinstance(node, nnx.Linear) and path and path[-1] in targets]
    if not found:
        raise ValueError(f"no nnx.Linear named {list(targets)} in {type(encoder).__name__}; nothing to adapt")
    for path, node in found:
        _set_child(_parent(encoder, path), path[-1], LoRALinear(node, rank, alpha, rngs=rngs))
    return encoder


def merge_lora(encoder: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (kernel += alpha/rank * A @ B) and put
    the plain nnx.Linear back, in place; returns the encoder."""
    found = [(tuple(path), node) for path, node in nnx.iter_graph(encoder) if isinstance(node, LoRALinear)]
    for path, node in found:
        base = node.base
        base.kernel[...] = (base.kernel[...].astype(jnp.float32) + node.delta()).astype(base.kernel[...].dtype)
        _set_child(_parent(encoder, path), path[-1], base)
    return encoder
