"""launch/local.sh: multi-process runs on one machine, failure handling, and the pretraining job through it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.synth import SynthConfig, write_dataset

# Unoptimised XLA code compiles in half the time; both sides of each comparison use it.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(repo_root, nproc, devices, *command, env=None, timeout=300):
    env = {**env} if env else None
    return subprocess.Popen(["bash", str(repo_root / "launch" / "local.sh"), "--num-processes", str(nproc),
                             "--devices-per-process", str(devices), "--port", str(_free_port()), "--grace", "5",
                             "--", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=repo_root, env=env)


def _env(repo_root):
    env = dict(os.environ, XLA_FLAGS=FAST_XLA, PYTHONPATH=str(repo_root))
    for k in ("LNFM_COORDINATOR", "LNFM_NUM_PROCESSES", "LNFM_PROCESS_ID"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(SynthConfig(site="pelvis", num_cases=4, seed=0, shape=(64, 64, 24), gallery=False,
                              use_real_shapes=False), root / "raw")
    store = str(root / "store")
    result = prepare_dataset(str(root / "raw"), store, PrepareConfig(workers=0, salt="test", spacing=(1.5, 1.5, 1.5)),
                             show_progress=False)
    assert result.ok, result.failures
    return store


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_pretraining_two_processes_match_one_process_with_four_devices(repo_root, phantom_store, tmp_path):
    """2 processes x 2 devices through local.sh reproduce 1 process x 4 devices (jax.distributed on localhost).

    It is also the suite's multi-process pretraining test: the job's coordinator, per-process data
    shards and checkpoints, started as a user starts them."""
    job = [sys.executable, "pretrain/pretrain.py", "--config", "vit_tiny", "--data", phantom_store, "--workdir"]
    fast = ["model.depth=2", "train.global_batch=8", "train.log_every=1", "train.image_every=0",
            "optim.warmup_steps=2", "optim.lr=3e-3", "data.workers=0", "train.steps=4", "checkpoint.every=100"]
    env = _env(repo_root)
    multi = _launch(repo_root, 2, 2, *job, str(tmp_path / "multi"), *fast, env=env)
    single = _launch(repo_root, 1, 4, *job, str(tmp_path / "single"), *fast, env=env)
    out_multi, _ = multi.communicate(timeout=400)
    out_single, _ = single.communicate(timeout=400)
    assert multi.returncode == 0, out_multi[-3000:]
    assert single.returncode == 0, out_single[-3000:]
    assert any(line.startswith("[1] ") for line in out_multi.splitlines())  # rank-prefixed output
    two, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    assert "over 4 devices (cpu), 2 processes" in (tmp_path / "multi" / "log.txt").read_text()
    # The final checkpoint holds each process's own data-iterator state.
    ckpt = tmp_path / "multi" / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in ckpt.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_allreduce_over_processes_equals_one_process(repo_root, tmp_path):
    env = _env(repo_root)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    job = [sys.executable, "tests/launch/allreduce_job.py"]
    two = _launch(repo_root, 2, 2, *job, str(tmp_path / "two"), env=env)
    one = _launch(repo_root, 1, 4, *job, str(tmp_path / "one"), env=env)
    out_two, _ = two.communicate(timeout=200)
    out_one, _ = one.communicate(timeout=200)
    assert two.returncode == 0 and one.returncode == 0, out_two + out_one
    results = [json.loads((tmp_path / "two" / f"result_{k}.json").read_text()) for k in (0, 1)]
    ref = json.loads((tmp_path / "one" / "result_0.json").read_text())
    rows = np.arange(12, dtype=np.float32).reshape(4, 3) ** 1.5  # computed here, independently of JAX
    assert ref["sum"] == pytest.approx(float(rows.sum()), rel=1e-6)
    for k, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) == (k, 2, 4, 2)
        assert r["source"] == "env"
        assert r["sum"] == pytest.approx(ref["sum"], rel=1e-6)
        np.testing.assert_allclose(r["mean"], rows.mean(axis=0), rtol=1e-6)


def test_a_failing_rank_stops_the_others_and_sets_the_exit_status(repo_root):
    script = ('trap "echo stopped cleanly; exit 0" TERM; echo "rank $LNFM_PROCESS_ID of $LNFM_NUM_PROCESSES '
              'at $LNFM_COORDINATOR, $JAX_PLATFORMS, $XLA_FLAGS"; '
              'if [ "$LNFM_PROCESS_ID" = 2 ]; then exit 7; fi; while true; do sleep 0.05; done')
    proc = _launch(repo_root, 3, 5, "bash", "-c", script)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7, out
    lines = out.splitlines()
    for rank in (0, 1, 2):
        assert any(line.startswith(f"[{rank}] rank {rank} of 3 at localhost:") and
                   line.endswith("cpu, --xla_force_host_platform_device_count=5") for line in lines), out
    assert sum(line.endswith("stopped cleanly") for line in lines) == 2
    assert "process 2 exited with status 7; stopping the others" in out


@pytest.mark.parametrize("args,message", [
    (["--num-processes", "0", "--", "true"], "--num-processes must be a positive integer"),
    (["--num-processes", "2", "--port", "99999", "--", "true"], "--port must be a TCP port"),
    (["--num-processes", "2"], "no command given"),
    (["--num-processes", "2", "--bogus", "--", "true"], "unknown option '--bogus'"),
])
def test_bad_arguments_give_one_line_errors(repo_root, args, message):
    res = subprocess.run(["bash", str(repo_root / "launch" / "local.sh"), *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1


def test_gpu_mode_splits_visible_devices(repo_root):
    proc = subprocess.run(["bash", str(repo_root / "launch" / "local.sh"), "--num-processes", "2", "--",
                           "bash", "-c", 'echo "gpus=$CUDA_VISIBLE_DEVICES local=$LNFM_LOCAL_DEVICE_IDS '
                                         'platforms=${JAX_PLATFORMS:-unset}"'],
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["[0] gpus=4,5 local=0,1 platforms=unset",
                                                "[1] gpus=6,7 local=0,1 platforms=unset"]


@pytest.mark.parametrize("visible", ["", "-1", "-1,0"])
def test_an_empty_cuda_visible_devices_means_no_gpu(repo_root, tmp_path, visible):
    """CUDA reads CUDA_VISIBLE_DEVICES='' as no GPU, and stops at the first invalid id ('-1': none); the script ran in
    GPU mode over nvidia-smi's four for '', and over a GPU named '-1' for '-1'."""
    (tmp_path / "nvidia-smi").write_text('#!/bin/sh\nfor g in 0 1 2 3; do echo "GPU $g: NVIDIA H100"; done\n')
    (tmp_path / "nvidia-smi").chmod(0o755)
    proc = subprocess.run(["bash", str(repo_root / "launch" / "local.sh"), "--num-processes", "2", "--",
                           "bash", "-c", 'echo "gpus=[$CUDA_VISIBLE_DEVICES] local=${LNFM_LOCAL_DEVICE_IDS:-unset} '
                                         'platforms=${JAX_PLATFORMS:-unset} $XLA_FLAGS"'],
                          capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": visible})
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [
        f"[{r}] gpus=[{visible}] local=unset platforms=cpu --xla_force_host_platform_device_count=1" for r in (0, 1)]
    assert proc.stderr == (f"local.sh: CUDA_VISIBLE_DEVICES='{visible}' makes no GPU visible: CPU mode, 1 device per "
                           "process\n")
