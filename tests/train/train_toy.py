"""A tiny NNX model with the SSL call signature `loss, aux = model(x, key)`, and helpers
that place it on a mesh of virtual CPU devices, for the train-core tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lnfm.train import optim, state as st


class ToyDenoiser(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs, hidden: int = 32, noise: float = 0.1):
        self.noise = noise
        self.encoder = nnx.Linear(dim, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.decoder = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array):
        noisy = x + self.noise * jax.random.normal(key, x.shape, x.dtype)
        y = self.decoder(nnx.gelu(self.norm(self.encoder(noisy))))
        loss = jnp.mean((y.astype(jnp.float32) - x.astype(jnp.float32)) ** 2)
        return loss, {"mse": loss, "recon": y}


DIM = 16


def make_mesh(n: int) -> jax.sharding.Mesh:
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def place(model: nnx.Module, mesh: jax.sharding.Mesh, shard_kernels: bool) -> None:
    """Replicate every parameter, or split 2-D kernels over 'data' along their first axis."""
    def spec(x):
        if shard_kernels and x.ndim == 2 and x.shape[0] % mesh.size == 0:
            return NamedSharding(mesh, P("data", None))
        return NamedSharding(mesh, P())

    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, spec(x)), state))


def toy_setup(mesh, *, lr=1e-2, steps=50, shard_kernels=False, seed=0, noise=0.1, hidden=32, **optim_kw):
    model = ToyDenoiser(DIM, nnx.Rngs(seed), hidden=hidden, noise=noise)
    place(model, mesh, shard_kernels)
    cfg = optim.OptimConfig(lr=lr, warmup_steps=0, **optim_kw)
    tx, sched = optim.make_optimizer(cfg, nnx.state(model, nnx.Param), steps, 8)
    graphdef, state, shardings = st.create_train_state(model, tx, seed, NamedSharding(mesh, P()))

    def loss_fn(params, frozen, rest, batch, key):
        return st.merge_model(graphdef, params, frozen, rest)(batch["x"], key)

    return dict(graphdef=graphdef, state=state, shardings=shardings, tx=tx, sched=sched, loss_fn=loss_fn,
                batch_sharding=NamedSharding(mesh, P("data")))


def toy_batches(n: int, batch: int = 8, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, DIM)).astype(np.float32)
    return [{"x": (base + 0.3 * rng.normal(size=(batch, DIM))).astype(np.float32)} for _ in range(n)]


