"""Multi-process pretraining: two jax.distributed processes reproduce one process's losses."""

from __future__ import annotations

import socket

import numpy as np
from pretrain_helpers import finish, losses, output, start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(phantom_store, tmp_path):
    args = ["train.steps=5", "checkpoint.every=100"]
    port = str(_free_port())
    single = start(phantom_store, tmp_path / "single", *args, devices=4)
    procs = [start(phantom_store, tmp_path / "multi", *args, devices=2, tag=str(k),
                   LNFM_COORDINATOR=f"localhost:{port}", LNFM_NUM_PROCESSES="2", LNFM_PROCESS_ID=str(k))
             for k in (0, 1)]
    for k, p in enumerate(procs):
        assert finish(p, tmp_path / "multi", tag=str(k)) == 0, output(tmp_path / "multi", str(k))
    assert finish(single, tmp_path / "single") == 0, output(tmp_path / "single")
    multi, one = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(one) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([multi[s] for s in one], [one[s] for s in one], rtol=1e-5)
    ckpt = tmp_path / "multi" / "checkpoints" / "5" / "data"
    assert sorted(p.name for p in ckpt.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert "over 4 devices (cpu), 2 processes" in (tmp_path / "multi" / "log.txt").read_text()
