import jax
import jax.numpy as jnp
import numpy as np

from lnfm.train.step import make_train_step
from train_toy import make_mesh, toy_batches, toy_setup


def run(setup, batches, **kw):
    step = make_train_step(setup["loss_fn"], setup["tx"], setup["sched"], setup["shardings"],
                           setup["batch_sharding"], **kw)
    state, losses = setup["state"], []
    for b in batches:
        state, metrics = step(state, jax.device_put(b, setup["batch_sharding"]))
        losses.append(float(metrics["loss"]))
    return state, losses, metrics


def test_loss_decreases_and_metrics_are_reported(mesh8):
    state, losses, metrics = run(toy_setup(mesh8), toy_batches(40))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert int(state["step"]) == 40
    assert set(metrics) == {"loss", "grad_norm", "lr", "mse"}  # non-scalar aux ('recon') is dropped


def test_sharded_params_match_single_device():
    batches = toy_batches(6)
    _, one, _ = run(toy_setup(make_mesh(1)), batches)
    state8, eight, _ = run(toy_setup(make_mesh(8), shard_kernels=True), batches)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    kernel = state8["params"]["decoder"]["kernel"].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)


def test_gradient_accumulation_equals_full_batch(mesh8):
    batches = toy_batches(3)
    full, _, _ = run(toy_setup(mesh8, noise=0.0), batches)
    accum, _, _ = run(toy_setup(mesh8, noise=0.0), batches, accum_steps=2)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(accum["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_float32_master_weights(mesh8):
    state, losses, _ = run(toy_setup(mesh8), toy_batches(10), compute_dtype="bfloat16")
    assert all(np.isfinite(losses))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(x.dtype == jnp.float32 for x in moments)


def test_nonfinite_step_leaves_params_unchanged(mesh8):
    setup = toy_setup(mesh8)
    before = jax.tree.map(np.asarray, setup["state"]["params"])
    bad = toy_batches(1)[0]
    bad["x"][0, 0] = np.nan
    state, losses, _ = run(setup, [bad], donate=False)
    assert np.isnan(losses[0])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)


def test_params_ema_in_the_sharded_donated_step(mesh8):
    """The moving average lives in the optimizer state, sharded like the params it averages (kernels
    split over 'data'), survives donation, and the params move exactly as without it."""
    from lnfm.train.optim import ema_params

    batches = toy_batches(6)
    plain, _, _ = run(toy_setup(mesh8, shard_kernels=True), batches)
    state, _, _ = run(toy_setup(mesh8, shard_kernels=True, ema_decay=0.5), batches)
    for a, b in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    ema = ema_params(state["opt_state"])
    kernel = ema["decoder"]["kernel"].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert not np.allclose(kernel, state["params"]["decoder"]["kernel"].value)
