"""The best model and its best.json are one commit: a kill just after a new best model is saved,
or in the middle of saving it, never leaves best.json naming another step than the model
(best.json used to be written beside best/ after the save)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lnfm.runs import RepeatRun
from lnfm.train.checkpoint import CheckpointConfig, Checkpointer

REPO = Path(__file__).resolve().parents[2]

# Saves best models at steps 2 and 4 as the finetuning job does, then dies (SIGKILL, no cleanup):
# right after the step-4 save returns ("after"), or while step 4 is being sealed ("during").
_SAVE_AND_DIE = """
import os, signal, sys
import numpy as np
import lnfm.train.checkpoint as ckpt
from lnfm.jobs.finetune import save_best

root, when = sys.argv[1], sys.argv[2]
if when == "during":
    real = ckpt.write_checksums
    def dying(folder):
        if os.path.basename(str(folder)).startswith("4."):
            os.kill(os.getpid(), signal.SIGKILL)
        real(folder)
    ckpt.write_checksums = dying
ck = ckpt.Checkpointer(os.path.join(root, "best"), ckpt.CheckpointConfig(keep=1, async_save=False))
for step, dice in ((2, 0.3), (4, 0.6)):
    save_best(ck, step, {"model": {"w": np.full(100, step, np.float32)}}, {"c": 1}, {"step": step, "val_dice": dice})
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when,step,dice", [("after", 4, 0.6), ("during", 2, 0.3)])
def test_a_kill_around_a_new_best_model_leaves_record_and_model_agreeing(tmp_path, when, step, dice):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(tmp_path), when], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    rep = RepeatRun(tmp_path)
    assert rep.best_record() == {"step": step, "val_dice": dice}
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Checkpointer(rep.best, CheckpointConfig(keep=1, async_save=False)) as ck:
        state, restored = ck.restore_latest({"model": {"w": jax.ShapeDtypeStruct((100,), np.float32, sharding=one)}})
    assert restored == step
    np.testing.assert_array_equal(np.asarray(state["model"]["w"]), np.full(100, step, np.float32))
