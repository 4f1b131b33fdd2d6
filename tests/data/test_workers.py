"""Worker processes: a dead worker fails only its own case (named with how it died), and workers
never outlive a parent killed with -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lnfm.data.workers import map_in_workers, run_alone


def square_or_die(item: int, die_on: int) -> int:
    if item == die_on:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return item * item


def test_a_dead_worker_fails_only_its_case_and_is_named():
    results, deaths = {}, {}
    map_in_workers(square_or_die, list(range(6)), (3,), 2, lambda i, r: results.__setitem__(i, r),
                   lambda i, how: deaths.__setitem__(i, how))
    assert results == {i: i * i for i in range(6) if i != 3}
    assert deaths == {3: "killed by SIGKILL"}
    assert run_alone(square_or_die, 5, (3,)) == 25


_PARENT = textwrap.dedent("""
    import sys, time
    from lnfm.data.workers import map_in_workers
    from sleepy import sleep_and_record
    map_in_workers(sleep_and_record, [0, 1], (sys.argv[1],), 2, print, print)
""")
_SLEEPY = textwrap.dedent("""
    import os, time
    def sleep_and_record(item, folder):
        open(os.path.join(folder, str(os.getpid())), "w").close()
        time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    (tmp_path / "sleepy.py").write_text(_SLEEPY)
    marks = tmp_path / "pids"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])])}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(marks)], env=env)
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.name) for p in marks.iterdir()]
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "orphaned workers still running"
