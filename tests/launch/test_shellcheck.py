"""Every launcher script passes shellcheck (skipped where shellcheck is not installed)."""

import shutil
import subprocess

import pytest

SCRIPTS = ["launch/local.sh", "launch/slurm/job.sh", "launch/slurm/per_gpu.sbatch", "launch/slurm/per_node.sbatch",
           "launch/tpu/tpu.sh"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(repo_root, script):
    res = subprocess.run(["shellcheck", "-x", "--shell=bash", script], cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_script_is_listed_and_executable(repo_root):
    found = sorted(str(p.relative_to(repo_root)) for pattern in ("*.sh", "*.sbatch")
                   for p in (repo_root / "launch").rglob(pattern))
    assert found == sorted(SCRIPTS)
    for script in SCRIPTS:
        if script != "launch/slurm/job.sh":  # sourced, not run
            assert (repo_root / script).stat().st_mode & 0o111, f"{script} is not executable"
