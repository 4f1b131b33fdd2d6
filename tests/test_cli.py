"""`lnfm <job>`: the job table and the one error boundary (user error 2, non-finite loss 3, bugs keep tracebacks)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lnfm import cli
from lnfm.config import ConfigError
from lnfm.errors import DataError, LnfmError, NonFiniteLoss
from lnfm.jobs import export

JOBS = ["synth", "prepare", "pretrain", "finetune", "study", "export", "predict", "plan", "demo"]


def test_every_job_is_listed_and_importable(capsys):
    assert list(cli.JOBS) == JOBS
    assert cli.main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == JOBS
    for job in cli.JOBS.values():
        assert callable(__import__(job.module, fromlist=["main"]).main), job.module


def test_no_job_or_an_unknown_one_is_exit_2(capsys):
    assert cli.main([]) == 2
    assert "usage: lnfm <job>" in capsys.readouterr().err
    assert cli.main(["pretrian"]) == 2
    assert capsys.readouterr().err.strip() == ("lnfm: unknown job 'pretrian' (choices: synth, prepare, pretrain, "
                                              "finetune, study, export, predict, plan, demo)")


@pytest.mark.parametrize("error", [LnfmError("scan.nii.gz: not a 3-D image"), DataError("store: dataset is empty"),
                                   ConfigError("train.steps: expected int, got 'x'")])
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, error):
    def fail(argv):
        raise error

    monkeypatch.setattr(export, "main", fail)
    assert cli.main(["export", "--verify", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"lnfm export: error: {error}"]


def test_a_non_finite_loss_exits_3(monkeypatch, capsys):
    def diverge(argv):
        raise NonFiniteLoss("loss is nan at step 7")

    monkeypatch.setattr(export, "main", diverge)
    assert cli.run_job("export", []) == 3
    assert capsys.readouterr().err.strip() == "lnfm export: error: loss is nan at step 7"


@pytest.mark.parametrize("bug", [ValueError("Incompatible shapes for broadcasting: (2, 3) and (4,)"),
                                 OSError(9, "Bad file descriptor"), KeyError("spacing")])
def test_anything_else_is_a_bug_with_its_traceback(monkeypatch, bug):
    def broken(argv):
        raise bug

    monkeypatch.setattr(export, "main", broken)
    with pytest.raises(type(bug)):
        cli.main(["export"])


@pytest.mark.parametrize("full,reason", [
    (OSError(28, "No space left on device", "/data/out/mask.nii.gz"), "No space left on device"),
    (OSError(122, "Disk quota exceeded", "/data/out/mask.nii.gz"), "Disk quota exceeded"),
    # TensorStore's wrapping (under Orbax and the store), raised from a handler's own error
    (ValueError('OUT_OF_RANGE: Failed writing: "/data/out/mask.nii.gz": File too large [os_error_code=\'27\']'),
     "File too large")])
def test_a_full_disk_anywhere_is_one_line_and_exit_2(monkeypatch, capsys, full, reason):
    def writes(argv):
        try:
            raise full
        except Exception as e:
            raise RuntimeError("while saving") from e

    monkeypatch.setattr(export, "main", writes)
    assert cli.run_job("export", []) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lnfm export: error: /data/out/mask.nii.gz: cannot write ({reason}); what was written before is intact"]


def test_a_name_too_long_for_the_file_system_is_one_line_naming_it_and_exit_2(monkeypatch, capsys, tmp_path):
    """Any file operation on a user's path can meet ENAMETOOLONG (`Path.is_file` raises it): the user's
    input, one line naming the path, its over-long names cut to their ends."""
    deep = tmp_path.joinpath(*["y" * 250] * 20, "m.nii.gz")  # no name over 255 bytes, but over 4096 in all
    paths = iter([tmp_path / ("x" * 300 + ".nii.gz"), deep])
    monkeypatch.setattr(export, "main", lambda argv: open(next(paths), "wb"))
    assert cli.run_job("export", []) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lnfm export: error: {tmp_path}/{'x' * 24}...{'x' * 17}.nii.gz: File name too long (a name in it has "
        f"307 bytes, over the 255 a name may have); choose a shorter path"]
    assert cli.run_job("export", []) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(f"/m.nii.gz: File name too long (it has {len(str(deep))} bytes in all); choose a "
                         "shorter path") and len(line) < 300, line


def test_a_link_loop_on_a_path_is_one_line_naming_it_and_exit_2(monkeypatch, capsys, tmp_path):
    """Python 3.11's `Path.resolve` raises RuntimeError from the ELOOP (3.13 raises nothing; the stat after
    it meets the loop): either way one line naming the path."""
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.setattr(export, "main", lambda argv: (tmp_path / "loop" / "m.nii.gz").resolve().stat())
    assert cli.run_job("export", []) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lnfm export: error: {tmp_path}/loop/m.nii.gz: Too many levels of symbolic links (a symbolic link on "
        f"the way leads back to itself); fix the link or choose another path"]


def test_sigterm_stops_a_job_in_one_line_with_exit_143_and_its_cleanup_runs(monkeypatch, capsys):
    import os
    import signal

    cleaned = []

    def long_job(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)
        return 0

    monkeypatch.setattr(export, "main", long_job)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.run_job("export", []) == 143
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err.splitlines() == [
        "lnfm export: stopped by SIGTERM; finished outputs are kept, nothing is left half-written"]


def test_a_shim_script_goes_through_the_same_boundary(repo_root, tmp_path):
    """`python pretrain/pretrain.py` as documented: a missing dataset is one line on stderr and exit 2."""
    proc = subprocess.run([sys.executable, "pretrain/pretrain.py", "--config", "vit_tiny", "--data",
                           str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w")], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"lnfm pretrain: error: {tmp_path / 'nowhere'}: dataset not found (expected a prepared store; see "
        "data_prep/prepare.py)"]
    assert not (tmp_path / "w").exists()


def test_job_usage_names_the_lnfm_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lnfm", "synth", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: lnfm synth ")


def test_a_sigterm_inside_a_deferred_write_waits_for_it_to_finish(monkeypatch, capsys):
    import os
    import signal

    from lnfm.errors import deferred_termination

    done = []

    def job(argv):
        with deferred_termination():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now and only noted the signal
            done.append("write finished")
        done.append("after the write")  # never reached: the pending SIGTERM is raised at the block's end
        return 0

    monkeypatch.setattr(export, "main", job)
    assert cli.run_job("export", []) == 143
    assert done == ["write finished"]
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_a_ctrl_c_inside_a_deferred_write_waits_for_it_too(monkeypatch, capsys):
    import os
    import signal

    from lnfm.errors import deferred_termination

    done = []

    def job(argv):
        with deferred_termination():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("renames finished")
        done.append("after the block")
        return 0

    monkeypatch.setattr(export, "main", job)
    caller = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist workers ignore SIGINT
    try:
        assert cli.run_job("export", []) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back
    finally:
        signal.signal(signal.SIGINT, caller)
    assert done == ["renames finished"]
    assert "stopped by SIGINT" in capsys.readouterr().err


def test_a_ctrl_c_while_the_job_imports_is_one_line_and_exit_130():
    """Ctrl-C in the first second or so, while the job's libraries (JAX, TensorStore) import, stops it as at
    any later moment; raised inside the import it was a traceback, or TensorStore's 'ImportError:
    initialization failed' and exit 1. The child says when the job's module begins to import, and the
    signal follows at a few delays into that import."""
    import signal

    child = ("import signal, sys\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell: pytest-xdist ignores SIGINT\n"
             "class Announce:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'lnfm.jobs.predict':\n"
             "            print('importing', flush=True)\n"
             "sys.meta_path.insert(0, Announce())\n"
             "from lnfm import cli\n"
             "sys.exit(cli.main(['predict', '--help']))\n")
    stopped = 0
    for delay in (0.0, 0.3):  # into imports that take a second or more
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline() == "importing\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0 and out.startswith("usage: "):  # the imports were done before the signal came
            continue
        assert (proc.returncode, err.splitlines()) == (130, [
            "lnfm predict: stopped by SIGINT; finished outputs are kept, nothing is left half-written"]), err[-3000:]
        stopped += 1
    assert stopped, "every SIGINT came after the job's imports"


def test_a_job_module_that_fails_to_import_keeps_its_traceback(monkeypatch):
    """A missing package is a broken install, not an interrupt: its ImportError is not turned into one line."""
    monkeypatch.setitem(cli.JOBS, "export", cli.Job("lnfm.jobs.no_such_job", "a module that is not there"))
    with pytest.raises(ModuleNotFoundError, match="lnfm.jobs.no_such_job"):
        cli.run_job("export", [])


def test_write_callbacks_to_a_closed_event_loop_are_not_printed_but_other_unraisables_are(monkeypatch):
    """After a failed Orbax write, TensorStore reports its in-flight writes' callbacks to the closed
    loop through `sys.unraisablehook` (seen under a file-size limit): the job's one error line
    must stand alone, and any other unraisable exception still reaches the hook."""
    import asyncio
    import gc

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append((u.exc_type, str(u.exc_value))))

    class LateCallback:  # the callback thread, as TensorStore runs it: loop.call_soon_threadsafe
        def __init__(self, loop):
            self.loop = loop

        def __del__(self):
            self.loop.call_soon_threadsafe(print)

    class OtherBug:
        def __del__(self):
            raise ValueError("a different failure")

    def job(argv):
        loop = asyncio.new_event_loop()
        loop.close()
        objs = [LateCallback(loop), OtherBug()]
        del objs
        gc.collect()
        return 0

    monkeypatch.setattr(export, "main", job)
    assert cli.run_job("export", []) == 0
    assert seen == [(ValueError, "a different failure")]
