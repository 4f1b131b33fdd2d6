"""Workdir outputs: resolved config, metrics.jsonl, TensorBoard events, plain progress lines;
the exclusive lock and the resume check."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lnfm import workdir as W
from lnfm.config import load_config


@dataclasses.dataclass
class Cfg:
    steps: int = 3
    lr: float = 0.5


def test_open_workdir_writes_config_and_metrics(tmp_path):
    cfg = Cfg(steps=4)
    writer = W.open_workdir(tmp_path / "run", cfg)
    writer.write(1, loss=2.5, lr=0.1)
    writer.write(2, loss=float("nan"))
    writer.close()
    assert load_config(Cfg, str(tmp_path / "run" / "config.yaml")) == cfg
    rows = W.read_metrics(tmp_path / "run")
    assert rows[0] == {"step": 1, "loss": 2.5, "lr": 0.1}
    assert rows[1]["loss"] is None  # NaN is not JSON; every line must parse
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "log.txt").exists()
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_a_held_back_config_is_written_by_record_config_once(tmp_path):
    """A resumed run's config.yaml is written once its checkpoint restored (lnfm.train.job.fit): until then
    the recorded one stays as it was; a writer of another process writes none."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("recorded")
    writer = W.open_workdir(tmp_path / "run", Cfg(steps=4), write_config=False, tensorboard=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == "recorded"
    writer.record_config()
    assert load_config(Cfg, str(tmp_path / "run" / "config.yaml")) == Cfg(steps=4)
    (tmp_path / "run" / "config.yaml").write_text("recorded")
    writer.record_config()  # once
    writer.close()
    assert (tmp_path / "run" / "config.yaml").read_text() == "recorded"
    other = W.open_workdir(tmp_path / "other", Cfg(), is_main=False, tensorboard=False)
    other.record_config()
    other.close()
    assert not (tmp_path / "other" / "config.yaml").exists()


def test_a_workdirs_log_ends_with_its_writer(tmp_path):
    """Two runs in one process (finetuning's repeats, the benchmarks, the Python API): each log.txt holds its
    own run's lines only. The handlers were never removed, so repeat_0/log.txt went on collecting every later
    repeat's and job's lines."""
    log = logging.getLogger("lnfm.test")
    first = W.open_workdir(tmp_path / "a", Cfg())
    log.info("line of run a")
    first.close()
    second = W.open_workdir(tmp_path / "b", Cfg())
    log.info("line of run b")
    outer = W.open_workdir(tmp_path / "b" / "repeat_0", Cfg())  # a repeat inside a run: both logs get its lines
    log.info("line of b's repeat")
    outer.close()
    second.close()
    log.info("line after both")
    a = (tmp_path / "a" / "log.txt").read_text()
    b = (tmp_path / "b" / "log.txt").read_text()
    r = (tmp_path / "b" / "repeat_0" / "log.txt").read_text()
    assert "line of run a" in a and "run b" not in a and "repeat" not in a and "after" not in a
    assert "line of run b" in b and "line of b's repeat" in b and "run a" not in b and "after" not in b
    assert "line of b's repeat" in r and "line of run b" not in r and "after" not in r
    assert not any(getattr(h, "baseFilename", "").startswith(str(tmp_path)) for h in logging.getLogger("lnfm").handlers)

def test_progress_plain_lines_when_not_tty(capsys):
    bar = W.progress(range(20), desc="convert")
    assert list(bar) == list(range(20))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("convert 20/20")
    assert 2 <= len(err) <= 12  # about every 10%, not one line per item


def test_atomic_write_leaves_no_temp(tmp_path):
    W.atomic_write_text(tmp_path / "a" / "x.json", "{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


# ----------------------------------------------------------------------------- lock and resume checks

_HOLD = ("import sys, time; from lnfm.workdir import lock_folder\n"
         "with lock_folder(sys.argv[1]):\n"
         "    print('locked', flush=True); time.sleep(60)\n")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_is_refused_naming_the_holder_and_kill9_releases(tmp_path):
    proc = _holder(tmp_path / "wd")
    try:
        with pytest.raises(W.WorkdirError) as e:
            with W.lock_folder(tmp_path / "wd"):
                pass
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(tmp_path / "wd")) and f"pid {proc.pid} on " in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with W.lock_folder(tmp_path / "wd"):  # the kernel released the dead holder's lock
        (tmp_path / "wd" / "x").write_text("1")
    assert (tmp_path / "wd" / "x").exists()


def test_a_folder_the_lock_created_is_removed_when_left_empty(tmp_path):
    with W.lock_folder(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with W.lock_folder(tmp_path / "old"):
        pass
    assert (tmp_path / "old").is_dir()  # it existed before: kept
    (tmp_path / "file").write_text("data")
    with pytest.raises(W.WorkdirError, match="file: exists and is not a folder"):
        with W.lock_folder(tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "data"


def test_check_resume_refuses_another_model_and_keeps_config(tmp_path):
    @dataclasses.dataclass
    class Model:
        size: str = "tiny"
        dims: tuple = (16, 16, 16)

    @dataclasses.dataclass
    class Run:
        model: Model = dataclasses.field(default_factory=Model)
        train: Cfg = dataclasses.field(default_factory=Cfg)

    W.open_workdir(tmp_path, Run()).close()
    before = (tmp_path / "config.yaml").read_bytes()
    W.check_resume(tmp_path, Run(train=Cfg(steps=99)), ("model",), has_run=True)  # longer training: fine
    with pytest.raises(W.WorkdirError) as e:
        W.check_resume(tmp_path, Run(model=Model(size="base")), ("model",), has_run=True)
    assert 'model.size="tiny" (new: "base")' in str(e.value) and "\n" not in str(e.value)
    W.check_resume(tmp_path, Run(model=Model(size="base")), ("model",), has_run=False)  # nothing to resume
    assert (tmp_path / "config.yaml").read_bytes() == before


def test_stale_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    from lnfm.workdir import remove_stale_temps, temp_file

    names = {".mask.part12-0123abcd.nii.gz": False, ".r.csv.tmp12-89abcdef": False,  # a killed writer's: no lock
             "mask.nii.gz": True, ".lnfm.lock": True, "failures.parts": True, "notes.tmp12-0123abcd": True}
    for name in names:
        (tmp_path / name).write_text("x")
    with temp_file(tmp_path / "r.csv") as mine:  # this process is writing it
        remove_stale_temps(tmp_path)
        assert mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(n for n, kept in names.items() if kept), mine.name])
    remove_stale_temps(tmp_path / "missing")  # nothing to do


def test_an_earlier_versions_temporary_files_are_removed_once_a_day_old(tmp_path):
    """lnfm before temp_file named its temporaries `.NAME.tmp<pid>` / `.NAME.part<pid>`, no token and no lock: no
    longer recognised, a killed writer's stayed for good. Their writer shows no sign of life, so they go once
    untouched for a day (each was renamed within one write); younger ones, and other names, stay."""
    from lnfm.workdir import remove_stale_temps

    old, young = time.time() - 25 * 3600, time.time() - 23 * 3600
    names = {".mask.part12.nii.gz": (old, False), ".r.csv.tmp12": (old, False), ".p.png.tmp7.png": (old, False),
             ".mask.part13.nii.gz": (young, True), ".r.csv.tmp13": (time.time(), True),  # may still be written
             ".r.csv.tmp": (old, True), "r.csv.tmp12": (old, True), ".r.csv.tmp12x": (old, True),  # not its names
             "mask.nii.gz": (old, True)}
    for name, (mtime, _) in names.items():
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (mtime, mtime))
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, (_, kept) in names.items() if kept)


def test_a_job_whose_folder_was_moved_leaves_the_old_path_to_the_next_job(tmp_path):
    """The user moves a running job's workdir and starts another job at the old path. The first job, ending,
    removed the lock file at that path, the second job's: a third then took the folder the second still ran in.
    An empty folder made there for the next job was removed too."""
    wd = tmp_path / "wd"
    first = W.lock_folder(wd)
    first.__enter__()
    wd.rename(tmp_path / "moved")
    with W.lock_folder(wd):  # the next job, in the old path's new folder
        first.__exit__(None, None, None)
        assert W.lock_holder(wd / W.LOCK_FILE) is not None
        with pytest.raises(W.WorkdirError, match="in use by another lnfm job"):
            with W.lock_folder(wd):
                pass
    second = W.lock_folder(tmp_path / "new")
    second.__enter__()
    (tmp_path / "new").rename(tmp_path / "moved2")
    (tmp_path / "new").mkdir()  # the user's folder for the next job
    second.__exit__(None, None, None)
    assert (tmp_path / "new").is_dir()


def test_a_temporary_file_is_removed_only_when_no_process_holds_its_lock(tmp_path):
    """Two predicts in separate PID namespaces (containers sharing an output folder) saw each other's pids as
    dead: each removed the other's temporary files while they were written, failing the other's case."""
    import subprocess
    import sys

    from lnfm.workdir import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    # another namespace's writer: its pid (here, a dead one) means nothing in this namespace, its lock does
    held = tmp_path / f".mask.part{dead}-0123abcd.nii.gz"
    held.write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); sys.stdin.read()", str(held)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        remove_stale_temps(tmp_path)
        assert held.exists()
    finally:
        holder.stdin.close()
        holder.wait()
    remove_stale_temps(tmp_path)  # its writer is gone, however it died
    assert not held.exists()
    # one pid, two writers (two namespaces): two names
    from lnfm.workdir import temp_file

    with temp_file(tmp_path / "r.csv") as a, temp_file(tmp_path / "r.csv") as b:
        assert a != b and a.exists() and b.exists()


def test_a_folder_of_files_without_a_config_yaml_is_no_run_s_workdir(tmp_path):
    """pretrain --workdir on a user's folder (summary.json, log.txt, metrics.jsonl, no config.yaml) replaced
    their summary and preprocessing.json and appended to their log and metrics, exit 0."""
    from lnfm.workdir import WorkdirError, check_config_is_this_jobs

    @dataclasses.dataclass
    class Cfg:
        steps: int = 1

    check_config_is_this_jobs(tmp_path / "new", Cfg())  # no folder yet
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lnfm.lock").write_text("")  # the job's own lock file
    check_config_is_this_jobs(tmp_path / "empty", Cfg())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.json").write_text('{"mine": true}')
    with pytest.raises(WorkdirError, match=r"holds summary.json but no config.yaml: not a run's workdir"):
        check_config_is_this_jobs(tmp_path / "mine", Cfg())


def test_readers_share_a_runs_lock_that_a_training_job_is_refused_while_they_hold(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with W.lock_folder(run, shared=True, then="read it later"):
        with W.lock_folder(run, shared=True):  # a second export of the same run
            with pytest.raises(W.WorkdirError, match="in use by another lnfm job"):
                with W.lock_folder(run):
                    pass
    assert list(run.iterdir()) == []  # the last reader removed the lock file
    proc = _holder(run)
    try:
        with pytest.raises(W.WorkdirError) as e:
            with W.lock_folder(run, shared=True, then="read it later"):
                pass
        assert f"pid {proc.pid} on " in str(e.value) and str(e.value).endswith("; read it later")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
