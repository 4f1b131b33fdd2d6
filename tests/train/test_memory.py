"""Host memory (meminfo and cgroup limits) and the one-line refusal of a step the host cannot hold."""

import logging
import os

import pytest

from lnfm.config import ConfigError
from lnfm.train import memory


def test_host_memory_reads_meminfo_and_a_cgroup_limit(tmp_path):
    total, available = memory.host_memory(cgroups=tmp_path / "none")
    assert abs(total - os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) < 2**20  # the kernel's own figure
    assert 0 < available <= total
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    (tmp_path / "cg").write_text("0::/job.slice/job_7\n")  # v2: a SLURM job's 8 GiB, 3 GiB of it used
    v2 = tmp_path / "root" / "job.slice" / "job_7"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text(f"{8 * 2**30}\n")
    (v2 / "memory.current").write_text(f"{3 * 2**30}\n")
    assert memory.host_memory(meminfo, tmp_path / "cg", tmp_path / "root") == (8 * 2**30, 5 * 2**30)
    (v2 / "memory.max").write_text("max\n")  # no limit: the host's figures
    assert memory.host_memory(meminfo, tmp_path / "cg", tmp_path / "root") == (24000000 * 1024,
                                                                                     20000000 * 1024)
    (tmp_path / "cg").write_text("12:cpu,cpuacct:/docker/ab\n11:memory:/docker/ab\n")  # v1
    v1 = tmp_path / "root" / "memory" / "docker" / "ab"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * 2**30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert memory.host_memory(meminfo, tmp_path / "cg", tmp_path / "root") == (4 * 2**30, 3 * 2**30)
    assert memory.host_memory(tmp_path / "missing") is None


def test_a_step_above_the_total_is_refused_and_above_the_free_memory_warned(caplog):
    gib = 2**30
    need = {"activations": 3 * gib, "batches": gib // 2}
    with pytest.raises(ConfigError, match=r"^train.global_batch=9: a step needs about 3.5 GiB on this host "
                                          r"\(activations 3.0 GiB, batches 0.5 GiB\), more than its 3.0 GiB: "
                                          r"lower it$"):
        memory.judge_host_memory(need, (3 * gib, 3 * gib), "train.global_batch=9", "lower it")
    with caplog.at_level(logging.WARNING, logger="lnfm"):
        memory.judge_host_memory(need, (4 * gib, 3 * gib), "train.global_batch=9", "lower it")
    assert "3.5 GiB on this host" in caplog.text and "more than the 3.0 GiB free now" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lnfm"):
        memory.judge_host_memory(need, (4 * gib, 4 * gib), "x", "y")
    assert caplog.text == ""
