"""A non-editable install (`pip install .` into a fresh folder) runs the jobs from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_installed_package_runs_a_tiny_pipeline_outside_the_checkout(repo_root, tmp_path):
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo_root / name, src / name)
    shutil.copytree(repo_root / "lnfm", src / "lnfm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(site), str(src)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def lnfm(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "lnfm", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
        return proc

    where = subprocess.run([sys.executable, "-c", "import lnfm; print(lnfm.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "lnfm" / "__init__.py")  # the copy in site/, not the checkout
    lnfm("synth", "--site", "pelvis", "--num-cases", "2", "--seed", "0", "--shape", "48,48,24", "--out", "phantoms",
         "--no-gallery")
    lnfm("prepare", "--input", "phantoms", "--output", "store", "--site-preset", "pelvis", "--workers", "0")
    records = [json.loads(line) for line in (work / "store" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["case_id"] for r in records) == ["pelvis_000", "pelvis_001"]
    assert all(r["spacing"] == pytest.approx([1.5, 1.5, 1.5]) for r in records)  # the packaged pelvis preset
    plan = json.loads(lnfm("plan", "--analytic", "--json", "--model", "vit_b", "--mesh", "fsdp=64",
                           "--global-batch", "256").stdout)
    assert plan["size"] == "b" and plan["devices"] == 64  # the packaged vit_b pretraining preset
