"""The training tail both jobs share: batch checks, device batches, and `fit` resuming exactly."""

import jax
import numpy as np
import pytest

from lnfm.config import ConfigError
from lnfm.train.checkpoint import CheckpointConfig
from lnfm.train.job import check_batch, device_batch, fit
from lnfm.train.loop import Throughput
from lnfm.train.step import make_train_step
from lnfm.workdir import MetricsWriter, read_metrics
from train_toy import toy_batches, toy_setup


def test_check_batch():
    check_batch(16, 2, 2, 4)  # 16 = 2 processes x 8; 8 batch shards x microbatches = 8
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        check_batch(16, 1, 3, 1)
    with pytest.raises(ConfigError, match=r"multiple of the 4 batch shards \(mesh data x fsdp\) times "
                                          r"train.accum_steps=3"):
        check_batch(16, 3, 1, 4)


def test_device_batch_keeps_the_named_keys_with_their_dtypes(mesh8):
    sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
    host = {"image": np.arange(16, dtype=np.float64).reshape(8, 2), "label": np.ones((8, 2)), "case_id": ["a"] * 8}
    out = device_batch(host, sharding, {"image": np.float32, "label": np.int32})
    assert set(out) == {"image", "label"}
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(out["image"]), host["image"].astype(np.float32))
    assert out["image"].sharding == sharding


def _fit(tmp_path, mesh, batches, total, on_resume=None):
    setup = toy_setup(mesh)
    step = make_train_step(setup["loss_fn"], setup["tx"], setup["sched"], setup["shardings"], setup["batch_sharding"])
    it = iter(batches)
    return fit(step, setup["state"], setup["shardings"], lambda: jax.device_put(next(it), setup["batch_sharding"]),
               None, workdir=tmp_path, checkpoint=CheckpointConfig(every=2, keep=5, async_save=False), mesh=mesh,
               rules="dp", total_steps=total, writer=MetricsWriter(tmp_path, tensorboard=False),
               throughput=Throughput(8, 8 * 16, None), config={}, log_every=1, on_resume=on_resume)


def test_fit_resumes_from_the_last_checkpoint_and_matches_one_uninterrupted_run(tmp_path, mesh8):
    batches = toy_batches(6)
    straight = _fit(tmp_path / "a", mesh8, batches, 6)
    _fit(tmp_path / "b", mesh8, batches[:3], 3)  # saves at 2 and at the end (3)
    starts = []
    resumed = _fit(tmp_path / "b", mesh8, batches[3:], 6, on_resume=starts.append)
    assert starts == [3] and resumed.step == straight.step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    for a, b in zip(jax.tree.leaves(straight.state["params"]), jax.tree.leaves(resumed.state["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
