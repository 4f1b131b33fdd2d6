"""bench/gpu.py --dry-run: every section of the accelerator benchmark runs at toy size on the CPU.

It asserts that each figure exists and is consistent (no accuracy or speed claim: those
belong to the GPU run recorded in docs/benchmarks.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_section_runs_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a user's machine
    # The dry run claims no speed: XLA's unoptimised CPU backend compiles its programs in a third less CPU time.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--out", str(out),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["section"].split(" (")[0]: r for r in result["rows"]}
    assert result["dry_run"] and "cpu" in result["device"].lower()
    assert set(rows) == {"attention: xla vs numpy float64", "ViT MAE", "Swin SimMIM", "loader",
                         "lnfm predict 64x64x30 CT"}
    assert rows["attention: xla vs numpy float64"]["max_abs_diff"] < 0.05  # bf16 inputs and output
    sections = [r["section"] for r in result["rows"]]
    assert "ViT MAE (LNFM, JAX)" in sections and "ViT MAE (MONAI, PyTorch autocast)" in sections
    for r in result["rows"]:
        assert "error" not in r, r
    lnfm = next(r for r in result["rows"] if r["section"] == "ViT MAE (LNFM, JAX)")
    monai = next(r for r in result["rows"] if r["section"] == "ViT MAE (MONAI, PyTorch autocast)")
    assert lnfm["step_s"] > 0 and lnfm["volumes_per_s"] == pytest.approx(2 / lnfm["step_s"])
    assert lnfm["tokens_per_s"] == pytest.approx(2 * 64 / lnfm["step_s"])  # 32^3 crops, 8^3 patches: 64 tokens
    assert lnfm["mfu"] is None and lnfm["planner_step_s"] is None  # no CPU peak FLOP/s
    assert monai["lnfm_speedup"] == pytest.approx(monai["step_s"] / lnfm["step_s"])
    loader = rows["loader"]
    assert loader["headroom"] == pytest.approx(loader["patches_per_s"] / loader["step_consumes_per_s"])
    assert loader["verdict"] == ("not data-bound" if loader["headroom"] >= 2 else
                                 "DATA-BOUND (loader < 2x the step's consumption)")
    assert rows["lnfm predict 64x64x30 CT"]["wall_s"] > 0
    table = proc.stdout
    assert "| section |" in table and "ViT MAE (LNFM, JAX)" in table and "lnfm predict" in table
