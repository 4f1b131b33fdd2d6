"""Shared pieces of the pretraining-job tests: fast tiny overrides and subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from override_helpers import once

REPO = Path(__file__).resolve().parents[3]
ENTRY = str(REPO / "pretrain" / "pretrain.py")

# vit_tiny with 2 blocks, 8 volumes per step, metrics every step, no previews: seconds per run on CPU.
FAST = ["model.depth=2", "train.global_batch=8", "train.log_every=1", "train.image_every=0",
        "optim.warmup_steps=2", "optim.lr=3e-3", "checkpoint.every=4", "data.workers=0"]


# Unoptimised XLA code compiles in half the time; every run in a comparison uses the same flags.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def env_for(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_XLA}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("LNFM_COORDINATOR", "LNFM_NUM_PROCESSES", "LNFM_PROCESS_ID"):
        env.pop(k, None)
    return env


def command(store: str, workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, ENTRY, "--config", "vit_tiny", "--data", store, "--workdir", str(workdir),
            *once(FAST, overrides)]


def start(store: str, workdir: Path, *overrides: str, devices: int = 8) -> subprocess.Popen:
    """Launch the entry script; its output goes to WORKDIR.out."""
    log = open(Path(f"{workdir}.out"), "w")
    return subprocess.Popen(command(store, workdir, *overrides), env=env_for(devices), stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)


def finish(proc: subprocess.Popen, workdir: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out; output:\n{output(workdir)}") from None


def output(workdir: Path) -> str:
    path = Path(f"{workdir}.out")
    return path.read_text()[-4000:] if path.exists() else ""


def losses(workdir: Path) -> dict[int, float]:
    path = Path(workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metric rows: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def checkpoint_steps(workdir: Path) -> list[int]:
    ck = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.exists() else []


def wait_for(predicate, proc: subprocess.Popen, workdir: Path, timeout: float = 240, what: str = "") -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited (rc {proc.returncode}) before {what}; output:\n{output(workdir)}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}; output:\n{output(workdir)}")
        time.sleep(0.05)
