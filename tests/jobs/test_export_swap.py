"""`export --force` killed in the middle of its swap (previous export moved aside, new one not yet
in place): the next export puts the previous one back before anything else, and leaves no
temporary or backup folder."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export_helpers import tiny  # noqa: F401  (session fixture)
from lnfm.jobs.export import ExportError, export_model, verify_export

REPO = Path(__file__).resolve().parents[2]

# `lnfm export` that dies (SIGKILL, no cleanup) as it renames its finished temporary folder into place.
_DIE_AT_SWAP = """
import os, pathlib, signal, sys
from lnfm.cli import main

real = pathlib.Path.rename

def rename(self, target):
    if ".tmp-" in self.name:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, target)

pathlib.Path.rename = rename
sys.exit(main(sys.argv[1:]))
"""


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_kill_during_the_swap_is_recovered_by_the_next_export(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "exp"
    export_model(tiny.workdir, out, "safetensors")
    before = _digest(out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _DIE_AT_SWAP, "export", "--checkpoint", str(tiny.workdir), "--out",
                           str(out), "--format", "safetensors", "--force"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    backups = [p for p in tmp_path.iterdir() if p.name.startswith(".exp.old-")]
    assert not out.exists() and len(backups) == 1 and _digest(backups[0]) == before  # the window
    # Any next export to that folder first puts the previous export back: here one without --force,
    # which then refuses to replace it.
    with pytest.raises(ExportError, match="already exists"):
        export_model(tiny.workdir, out, "safetensors")
    assert _digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    export_model(tiny.workdir, out, "safetensors", force=True)
    assert verify_export(out) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
