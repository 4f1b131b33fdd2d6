import os
import time
import signal

import jax
import numpy as np
import pytest

from lnfm.train.checkpoint import CheckpointConfig, Checkpointer
from lnfm.train.loop import Hook, NonFiniteLoss, Throughput, parse_profile_steps, run_loop
from lnfm.train.step import make_train_step
from lnfm.workdir import MetricsWriter, read_metrics
from train_toy import toy_batches, toy_setup


def loop(tmp_path, mesh, batches, *, total, hooks=(), ckpt_every=0, **kw):
    setup = toy_setup(mesh)
    step = make_train_step(setup["loss_fn"], setup["tx"], setup["sched"], setup["shardings"], setup["batch_sharding"])
    it = iter(batches)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep=10))
    writer = MetricsWriter(tmp_path, tensorboard=False)
    result = run_loop(step, setup["state"], lambda: jax.device_put(next(it), setup["batch_sharding"]),
                      start_step=0, total_steps=total, writer=writer, throughput=Throughput(8, 8 * 16, 1e9),
                      checkpointer=ck, ckpt_every=ckpt_every, hooks=hooks, **kw)
    return result, ck


def test_logs_every_n_steps_and_saves_at_the_end(tmp_path, mesh8):
    result, ck = loop(tmp_path, mesh8, toy_batches(7), total=7, log_every=3, ckpt_every=4)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["step_time"] > 0 and rows[-1]["volumes_per_s"] > 0 and rows[-1]["mfu"] is None  # CPU: n/a
    assert ck.all_steps() == [4, 7] and not result.preempted and result.step == 7


def test_nonfinite_loss_names_the_step_and_saves_nothing_after_it(tmp_path, mesh8):
    batches = toy_batches(8)
    batches[5]["x"][:] = np.inf  # step 6 is bad
    with pytest.raises(NonFiniteLoss, match="at step 6"):
        loop(tmp_path, mesh8, batches, total=8, ckpt_every=2)
    with Checkpointer(tmp_path / "ck", CheckpointConfig()) as ck:
        assert ck.all_steps() == [2, 4]


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path, mesh8):
    hook = Hook(3, lambda step, state: os.kill(os.getpid(), signal.SIGTERM))
    result, ck = loop(tmp_path, mesh8, toy_batches(10), total=10, hooks=(hook,), ckpt_every=100)
    assert result.preempted and result.step == 3 and ck.all_steps() == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed afterwards


def test_profile_steps(tmp_path, mesh8):
    assert parse_profile_steps("") is None and parse_profile_steps("2:4") == (2, 4)
    with pytest.raises(ValueError, match="A:B"):
        parse_profile_steps("4")
    loop(tmp_path, mesh8, toy_batches(4), total=4, profile=(1, 3), profile_dir=tmp_path / "profile")
    assert any(p.name.endswith(".xplane.pb") for p in (tmp_path / "profile").rglob("*"))


def test_step_time_excludes_hook_and_save_time(tmp_path, mesh8):
    slow = Hook(1, lambda step, state: time.sleep(0.4))  # e.g. a validation pass after every step
    t0 = time.perf_counter()
    result, _ = loop(tmp_path, mesh8, toy_batches(9), total=9, hooks=(slow,), log_every=4, ckpt_every=2)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(tmp_path) if "step_time" in r]
    assert rows and all(r["step_time"] < 0.3 for r in rows), rows  # the toy step itself takes milliseconds
    # The run's training seconds (what an equal-time peer gets) leave the 9 x 0.4 s of hooks out too.
    assert 0 < result.train_s < wall - 9 * 0.4


class _FakeHosts:
    """Two processes, as seen by one of them: counts allgathers, the other host's flag."""

    def __init__(self, other_flag_from_step: int):
        self.calls: list[int] = []
        self.other_from = other_flag_from_step
        self.step = 0

    def allgather(self, flag):
        self.calls.append(self.step)
        return np.asarray([int(flag), int(self.step >= self.other_from)])


def test_multi_process_preemption_syncs_every_n_steps_only(monkeypatch):
    from lnfm.train import loop as loop_mod

    hosts = _FakeHosts(other_flag_from_step=13)
    monkeypatch.setattr(loop_mod.jax, "process_count", lambda: 2)
    monkeypatch.setattr(loop_mod.multihost_utils, "process_allgather", hosts.allgather)
    guard = loop_mod.PreemptionGuard(sync_every=10)
    stops = []
    for step in range(1, 31):
        hosts.step = step
        stops.append(guard.should_stop(step))
    assert hosts.calls == [10, 20, 30]  # one host-device sync per 10 steps, not per step
    assert stops.index(True) + 1 == 20  # the other host was signalled at 13: both stop at the next sync step
    with pytest.raises(ValueError, match=">= 1"):
        loop_mod.PreemptionGuard(sync_every=0)


def test_planner_step_time_formula():
    from lnfm.train.mfu import expected_step_time

    # 3.958e15 FLOPs on 8 H100s (989.4 TFLOP/s each) at 40% MFU: 1.25 s.
    assert expected_step_time(3.958e15, "NVIDIA H100 80GB HBM3", 8) == pytest.approx(3.958e15 / (8 * 989.4e12 * 0.4))
    assert expected_step_time(1e12, "cpu", 1) is None
