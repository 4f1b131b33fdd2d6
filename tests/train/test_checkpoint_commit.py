"""A kill at the moment a step's checksum list is written: the step is not committed, so no
committed step is ever restored unverified (the list used to be written after the commit)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from lnfm.train.checkpoint import CHECKSUMS, CheckpointConfig, Checkpointer, verify_checksums

REPO = Path(__file__).resolve().parents[2]

# Saves steps 1 and 2; the process kills itself (SIGKILL, no cleanup) as step 2's list is written.
_SAVE_AND_DIE = """
import os, signal, sys
from pathlib import Path
import numpy as np
import lnfm.train.checkpoint as ckpt

real = ckpt.write_checksums

def dying(folder):
    if Path(folder).name.split(".")[0] == "2":
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder)

ckpt.write_checksums = dying
ck = ckpt.Checkpointer(sys.argv[1], ckpt.CheckpointConfig(keep=3, async_save=True))
for step in (1, 2):
    ck.save(step, {"w": np.full(1000, step, np.float32)}, config={"step": step})
ck.close()
"""


def _target():
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"w": jax.ShapeDtypeStruct((1000,), np.float32, sharding=one)}


def test_a_kill_while_the_checksum_list_is_written_leaves_no_unlisted_committed_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(tmp_path / "ck")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    committed = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    assert committed == ["1"], committed  # step 2 died before its commit
    assert (tmp_path / "ck" / "1" / CHECKSUMS).is_file() and verify_checksums(tmp_path / "ck" / "1")
    with Checkpointer(tmp_path / "ck", CheckpointConfig()) as ck:
        state, step = ck.restore_latest(_target())
        assert step == 1 and ck.all_steps() == [1]
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full(1000, 1, np.float32))
        ck.save(2, {"w": np.full(1000, 2, np.float32)})  # the resumed run: Orbax removes the leftover first
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2"]
    assert verify_checksums(tmp_path / "ck" / "2")


def test_files_committed_with_a_step_are_inside_it_and_listed(tmp_path):
    with Checkpointer(tmp_path / "ck", CheckpointConfig(async_save=True)) as ck:
        ck.save(3, {"w": np.zeros(10, np.float32)}, files={"note.json": '{"a": 1}'})
    step = tmp_path / "ck" / "3"
    assert (step / "note.json").read_text() == '{"a": 1}'
    listed = dict(reversed(line.split("  ", 1)) for line in (step / CHECKSUMS).read_text().splitlines())
    assert "note.json" in listed and "_CHECKPOINT_METADATA" in listed
    assert verify_checksums(step)
