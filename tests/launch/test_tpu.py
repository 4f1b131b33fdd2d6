"""launch/tpu/tpu.sh: dry-run rendering, and the watcher's recovery loop against a scripted gcloud."""

import os
import shlex
import stat
import subprocess

import pytest

ENV = {"PROJECT": "lnfm-proj", "ZONE": "us-east5-a", "TPU_NAME": "lnfm-v5p", "ACCELERATOR_TYPE": "v5p-64",
       "RUNTIME_VERSION": "v2-alpha-tpuv5", "BUCKET": "gs://lnfm-bucket"}
COMMAND = ["python3", "pretrain/pretrain.py", "--config", "vit_l", "--data", "/gcs/store",
           "--workdir", "/gcs/runs/vit l"]

# Plays back queued-resource states and ssh exit codes from files, one per call; logs every call.
FAKE_GCLOUD = r"""#!/bin/bash
echo "$*" >> "$FAKE_DIR/calls.log"
pop() { local first; first=$(head -n 1 "$1"); if [ "$(wc -l < "$1")" -gt 1 ]; then sed -i 1d "$1"; fi; echo "$first"; }
case "$*" in
  *"queued-resources describe"*) s=$(pop "$FAKE_DIR/states"); [ "$s" = MISSING ] && exit 1; echo "$s" ;;
  *"tpu-vm ssh"*"--command=cd ~/lnfm"*) exit "$(pop "$FAKE_DIR/run_codes")" ;;
esac
exit 0
"""


def _run(repo_root, args, env=None, timeout=60):
    return subprocess.run(["bash", str(repo_root / "launch" / "tpu" / "tpu.sh"), *args],
                          env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=repo_root)


def _gcloud_lines(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud ")]


def test_dry_run_create_uses_queued_resources_and_spot(repo_root):
    res = _run(repo_root, ["--dry-run", "create"], {"SPOT": "1"})
    assert res.returncode == 0, res.stderr
    (cmd,) = _gcloud_lines(res.stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert cmd[5] == "lnfm-v5p-qr"
    for flag in ("--project=lnfm-proj", "--zone=us-east5-a", "--node-id=lnfm-v5p", "--accelerator-type=v5p-64",
                 "--runtime-version=v2-alpha-tpuv5", "--spot"):
        assert flag in cmd


def test_dry_run_run_reaches_every_worker_with_the_exact_command(repo_root):
    res = _run(repo_root, ["--dry-run", "run", "--", *COMMAND])
    assert res.returncode == 0, res.stderr
    (cmd,) = _gcloud_lines(res.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lnfm-v5p"]
    assert "--worker=all" in cmd
    remote = next(c for c in cmd if c.startswith("--command="))[len("--command="):]
    assert remote.startswith("cd ~/lnfm && exec ")
    assert shlex.split(remote.split("exec ", 1)[1]) == COMMAND  # the space in the workdir survives


def test_dry_run_watch_prints_the_recovery_pass(repo_root):
    res = _run(repo_root, ["--dry-run", "watch", "--", *COMMAND])
    assert res.returncode == 0, res.stderr
    cmds = [" ".join(c[:5]) for c in _gcloud_lines(res.stdout)]
    assert cmds == ["gcloud compute tpus queued-resources create", "gcloud compute tpus tpu-vm scp",
                    "gcloud compute tpus tpu-vm ssh", "gcloud compute tpus tpu-vm ssh"]
    assert "gcsfuse --implicit-dirs lnfm-bucket /gcs" in res.stdout.replace("\\", "")


@pytest.mark.parametrize("spot, flagged", [("1", True), ("true", True), ("TRUE", True), ("yes", True),
                                           ("0", False), ("false", False), ("", False)])
def test_dry_run_create_reads_the_spellings_of_spot(repo_root, spot, flagged):
    """SPOT=true was read as no: the spot flag never reached gcloud."""
    res = _run(repo_root, ["--dry-run", "create"], {"SPOT": spot})
    assert res.returncode == 0, res.stderr
    (cmd,) = _gcloud_lines(res.stdout)
    assert ("--spot" in cmd) == flagged


def test_a_spot_value_that_is_no_yes_or_no_is_a_one_line_error(repo_root):
    res = _run(repo_root, ["--dry-run", "create"], {"SPOT": "ture"})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == "tpu.sh: SPOT must be 1/true/yes or 0/false/no, got 'ture'\n"


def _words(script: str) -> list[str]:
    """A remote shell line as its shell splits it into words and operators."""
    return list(shlex.shlex(script, posix=True, punctuation_chars=True))


def _holds(words: list[str], part: list[str]) -> bool:
    return any(words[i:i + len(part)] == part for i in range(len(words)))


def test_dry_run_setup_keeps_a_mount_with_a_space_one_path(repo_root):
    """MOUNT went into the workers' shell line unquoted: '/mnt/lnfm data' made and mounted two folders."""
    res = _run(repo_root, ["--dry-run", "setup"], {"MOUNT": "/mnt/lnfm data"})
    assert res.returncode == 0, res.stderr
    ssh = next(c for c in _gcloud_lines(res.stdout) if c[4] == "ssh")
    words = _words(next(c for c in ssh if c.startswith("--command="))[len("--command="):])
    for part in (["sudo", "mkdir", "-p", "/mnt/lnfm data", "&&"], ["chown", "$", "USER", "/mnt/lnfm data", "&&"],
                 ["(", "mountpoint", "-q", "/mnt/lnfm data", "||"],
                 ["gcsfuse", "--implicit-dirs", "lnfm-bucket", "/mnt/lnfm data", ")"]):
        assert _holds(words, part), (part, words)


@pytest.mark.parametrize("missing", ["PROJECT", "ACCELERATOR_TYPE"])
def test_missing_setting_is_a_one_line_error(repo_root, missing):
    res = _run(repo_root, ["--dry-run", "create"], {missing: ""})
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and missing in res.stderr


def test_watch_recreates_after_preemption_and_reruns(repo_root, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    # Active -> job killed by preemption (ssh 255), slice SUSPENDED -> deleted -> MISSING ->
    # recreated, provisioning -> ACTIVE -> set up -> rerun succeeds on a healthy slice.
    (tmp_path / "states").write_text("\n".join(
        ["ACTIVE", "SUSPENDED", "SUSPENDED", "DELETING", "MISSING", "PROVISIONING", "ACTIVE", "ACTIVE",
         "ACTIVE"]) + "\n")
    (tmp_path / "run_codes").write_text("255\n0\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "POLL_SECONDS": "0"}
    res = _run(repo_root, ["watch", "--", *COMMAND], env)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    kinds = [" ".join(c.split()[2:4]) for c in calls if "describe" not in c]
    assert kinds == ["tpu-vm ssh",                  # first run, preempted
                     "queued-resources delete",      # suspended slice removed
                     "queued-resources create",      # and queued again
                     "tpu-vm scp", "tpu-vm ssh",     # setup on the fresh workers
                     "tpu-vm ssh"]                   # rerun: resumes from the bucket workdir
    assert "job finished" in res.stdout


def test_watch_gives_up_after_repeated_failures_on_a_healthy_slice(repo_root, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "states").write_text("ACTIVE\n")
    (tmp_path / "run_codes").write_text("7\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "POLL_SECONDS": "0",
           "MAX_FAILURES": "2"}
    res = _run(repo_root, ["watch", "--", *COMMAND], env)
    assert res.returncode == 7
    runs = [c for c in (tmp_path / "calls.log").read_text().splitlines() if "--command=cd ~/lnfm" in c]
    assert len(runs) == 2
