"""prepare on a full disk (`ulimit -f`): one line naming the store, what was converted before
stays intact, and a rerun with room completes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from inputs import nnunet

REPO = Path(__file__).resolve().parents[2]


def _prepare(raw: Path, store: Path, file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    # No bytecode writes: under the limit they would leave truncated .pyc files in the checkout.
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare.py"), "--input", str(raw), "--output",
                           str(store), "--workers", "0", "salt=s"], preexec_fn=limit if file_limit else None,
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_full_disk_stops_in_one_line_keeps_earlier_cases_and_a_rerun_completes(tmp_path):
    raw = nnunet(tmp_path, n=1)
    store = tmp_path / "store"
    assert _prepare(raw, store).returncode == 0
    first = (store / "records" / "case0.json").read_bytes()
    nnunet(tmp_path / "more", n=3)  # two more cases join the raw folder
    for name in ("case1_0000.nii.gz", "case2_0000.nii.gz"):
        os.replace(tmp_path / "more" / "raw" / "imagesTr" / name, raw / "imagesTr" / name)
        label = name.replace("_0000", "")
        os.replace(tmp_path / "more" / "raw" / "labelsTr" / label, raw / "labelsTr" / label)
    full = _prepare(raw, store, file_limit=1500)
    lines = [line for line in full.stderr.splitlines() if ": error: " in line]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"lnfm prepare: error: {store}: cannot write"), lines
    assert "File too large" in lines[0]
    assert (store / "records" / "case0.json").read_bytes() == first
    assert sorted(p.name for p in (store / "records").iterdir()) == ["case0.json"]
    done = _prepare(raw, store)
    assert done.returncode == 0 and "converted 2, skipped 1" in done.stdout, done.stdout + done.stderr[-2000:]
    rows = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == ["case0", "case1", "case2"]
    assert (store / "records" / "case0.json").read_bytes() == first
