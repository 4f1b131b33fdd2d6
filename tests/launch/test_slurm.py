"""The sbatch scripts, run by bash against stand-ins for srun / scancel / scontrol.

The stand-ins record their arguments and behave like SLURM where it matters:
srun runs the command as one local task, scancel --signal delivers the signal
to that task, scontrol prints host names. This checks the requeue protocol
(USR1 -> SIGTERM to the steps -> the job exits 0 -> scontrol requeue) for real.
"""

import os
import signal
import stat
import subprocess
import time

import pytest

FAKES = {
    "srun": """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_GPUS_ON_NODE=4
echo $$ > "$FAKE_DIR/srun.pid"
exec "$@"
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$FAKE_LOG"
sig=${1#--signal=}
kill -"$sig" "$(cat "$FAKE_DIR/srun.pid")"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-007\\ngpu-node-008\\n'; fi
""",
}

# A stand-in training job: reports its rendezvous settings, saves and exits 0 on SIGTERM.
JOB = ('trap "echo checkpoint saved; exit 0" TERM; '
       'echo "started coord=${LNFM_COORDINATOR:-auto} n=${LNFM_NUM_PROCESSES:-auto} '
       'rank=${LNFM_PROCESS_ID:-auto} local=${LNFM_LOCAL_DEVICE_IDS:-auto}"; '
       'if [ -n "$FAIL_WITH" ]; then exit "$FAIL_WITH"; fi; '
       'while true; do sleep 0.05; done')


@pytest.fixture
def slurm(tmp_path, repo_root):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
               FAKE_LOG=str(tmp_path / "calls.log"), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(repo_root),
               SLURM_JOB_NODELIST="gpu-node-[007-008]", SLURM_JOB_NUM_NODES="2",
               LNFM_COORDINATOR="stale:1")  # a leftover that the scripts must clear

    def start(script: str, extra_env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(repo_root / "launch" / "slurm" / script), "bash", "-c", JOB],
                                env={**env, **(extra_env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=tmp_path)

    def calls() -> list[str]:
        log = tmp_path / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    return start, calls


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 30.0) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(needle):
            return lines
    proc.kill()
    rest = proc.stdout.read()
    raise AssertionError(f"{needle!r} not printed; got {lines} {rest!r}, exit {proc.wait()}")


def test_usr1_checkpoints_then_requeues(slurm):
    start, calls = slurm
    proc = start("per_gpu.sbatch")
    lines = _wait_for_line(proc, "started coord=")
    assert "coord=auto n=auto rank=auto" in lines[-1]  # per-GPU tasks use jax's SLURM auto-detection
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    log = calls()
    assert log[0].startswith("srun --kill-on-bad-exit=1")
    assert "scancel --signal=TERM 4242" in log
    assert log[-1] == "scontrol requeue 4242"


def test_failure_is_reported_and_not_requeued(slurm):
    start, calls = slurm
    proc = start("per_gpu.sbatch", {"FAIL_WITH": "3"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert not any(c.startswith(("scontrol requeue", "scancel")) for c in calls())


def test_plain_sigterm_waits_for_the_step_without_requeue(slurm, tmp_path):
    start, calls = slurm
    proc = start("per_gpu.sbatch")
    _wait_for_line(proc, "started coord=")
    # On scancel or preemption SLURM signals the steps and the batch shell alike.
    os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    assert not any(c.startswith(("scontrol requeue", "scancel")) for c in calls())


def test_per_node_passes_explicit_rendezvous(slurm):
    start, calls = slurm
    proc = start("per_node.sbatch")
    lines = _wait_for_line(proc, "started coord=")
    port = 20000 + 4242 % 20000
    assert f"coord=gpu-node-007:{port} n=1 rank=0 local=0,1,2,3" in lines[-1]
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert calls()[-1] == "scontrol requeue 4242"
    assert any(c.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1") for c in calls())


def test_dry_run_prints_the_srun_command(slurm, repo_root):
    start, calls = slurm
    proc = start("per_gpu.sbatch", {"LNFM_DRY_RUN": "1"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "srun --kill-on-bad-exit=1 --cpu-bind=none bash -c" in out
    assert calls() == []


PER_NODE_SRUN = "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpu-bind=none bash -c $'\\nlnfm_coordinator () "
USER_COMMAND = [".venv/bin/python", "pretrain/pretrain.py", "--workdir", "/shared/runs/vit b"]


def _per_node_dry_run(repo_root, env, command=tuple(USER_COMMAND)) -> list[str]:
    proc = subprocess.run(["bash", str(repo_root / "launch" / "slurm" / "per_node.sbatch"), *command],
                          env={**env, "LNFM_DRY_RUN": "1"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_per_node_dry_run_prints_the_rendezvous_and_the_srun_command(slurm, repo_root, tmp_path):
    """per_gpu's LNFM_DRY_RUN=1, for per_node: inside an allocation the rendezvous the tasks get and the srun
    line, with no srun or scancel; on a login node (no SLURM_* at all, as a user tries it before sbatch) the
    same with placeholders, where it stopped on an unbound SLURM_JOB_NODELIST."""
    start, calls = slurm
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
               FAKE_LOG=str(tmp_path / "calls.log"), LNFM_ROOT=str(repo_root))
    for extra, head in (({}, "FIRST_NODE:PORT"),
                        ({"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[007-008]"}, "gpu-node-007:24242")):
        lines = _per_node_dry_run(repo_root, {**env, **extra})
        assert lines[0] == (f"lnfm: rendezvous LNFM_COORDINATOR={head} (process 0 on the allocation's first node; "
                            f"each task derives it)")
        (srun,) = [line for line in lines if line.startswith("srun ")]
        assert srun.startswith(PER_NODE_SRUN) and "export LNFM_COORDINATOR=$coordinator" in srun
        assert srun.endswith("' lnfm-task .venv/bin/python pretrain/pretrain.py --workdir /shared/runs/vit\\ b")
        assert not any(c.startswith(("srun", "scancel", "scontrol requeue")) for c in calls())
    assert calls() == ["scontrol show hostnames gpu-node-[007-008]"]


def test_the_per_node_dry_run_srun_line_runs_as_printed_in_an_allocation(slurm, repo_root, tmp_path, monkeypatch):
    """The printed task read LNFM_HEAD, which only the batch script sets: pasted into another allocation's shell it
    gave each task an empty LNFM_COORDINATOR, refused with the rank as not set together. Each task now derives the
    rendezvous from its step's SLURM_JOB_NODELIST and SLURM_JOB_ID, and the job's check takes it."""
    from lnfm.train.distributed import detect

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LNFM_"))}
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
               FAKE_LOG=str(tmp_path / "calls.log"))
    lines = _per_node_dry_run(repo_root, {**env, "LNFM_ROOT": str(repo_root)}, ("env",))  # on a login node
    (srun,) = [line for line in lines if line.startswith("srun ")]
    proc = subprocess.run(["bash", "-c", srun], env={**env, "SLURM_JOB_ID": "4242",
                                                       "SLURM_JOB_NODELIST": "gpu-node-[007-008]"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    task_env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("LNFM_"))
    for name in [k for k in os.environ if k.startswith(("LNFM_", "SLURM_"))]:
        monkeypatch.delenv(name)
    for name, value in task_env.items():
        monkeypatch.setenv(name, value)
    spec = detect()
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("gpu-node-007:24242", 1, 0)
    assert spec.local_device_ids == (0, 1, 2, 3) and spec.source == "env"


def test_per_node_prints_its_multi_line_task_as_one_quoted_line(repo_root):
    """The step's header line printed per_node's task raw: its lines came out as lines of their own, and
    "vit b" as two words. Now the header and the dry run's srun line are one line each, the same command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    lines = _per_node_dry_run(repo_root, {**env, "LNFM_ROOT": str(repo_root)})
    assert len(lines) == 3 and lines[1].startswith("lnfm: job ? restart 0 on ? node(s): srun "), lines
    assert lines[1].endswith(": " + lines[2]) and lines[2].startswith(PER_NODE_SRUN)


def test_per_node_outside_an_allocation_is_a_one_line_error(repo_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(repo_root / "launch" / "slurm" / "per_node.sbatch"), "true"],
                          env={**env, "LNFM_ROOT": str(repo_root)}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("lnfm: SLURM_JOB_NODELIST or SLURM_JOB_ID is not set: submit this script with sbatch "
                           "(LNFM_DRY_RUN=1 prints the step instead)\n")


def test_sbatch_headers_request_requeue_and_warning_signal(repo_root):
    for script in ("per_gpu.sbatch", "per_node.sbatch"):
        text = (repo_root / "launch" / "slurm" / script).read_text()
        headers = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
        assert "--requeue" in headers
        assert "--signal=B:USR1@120" in headers
        assert "--open-mode=append" in headers
