import logging
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from lnfm.train import state as st
from lnfm.train.checkpoint import CHECKSUMS, CheckpointConfig, CheckpointError, Checkpointer, restore_params
from train_toy import make_mesh, toy_setup


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def loader(n=64):
    return grain.DataLoader(data_source=grain.sources.RangeDataSource(0, n, 1),
                            sampler=grain.samplers.IndexSampler(n, shuffle=True, seed=3, num_epochs=1),
                            operations=[grain.transforms.Batch(4)], worker_count=0)


def test_restore_onto_a_different_mesh_reshards(tmp_path):
    saved = toy_setup(make_mesh(8), shard_kernels=True, seed=1)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep=2))
    ck.save(7, saved["state"], config={"note": "x"})
    ck.close()
    fresh = toy_setup(make_mesh(2), shard_kernels=True, seed=2)  # other values, other mesh
    target = st.abstract_state(fresh["state"], fresh["shardings"])
    with Checkpointer(tmp_path / "ck", CheckpointConfig()) as ck:
        state, step = ck.restore_latest(target)
    assert step == 7 and leaves_equal(state, saved["state"])
    kernel = state["params"]["decoder"]["kernel"].value
    assert kernel.sharding.mesh.size == 2 and kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
    params = restore_params(tmp_path / "ck", target["params"])
    assert leaves_equal(params, saved["state"]["params"])


def test_data_iterator_position_is_restored(tmp_path, mesh8):
    setup = toy_setup(mesh8)
    it = loader().__iter__()
    for _ in range(3):
        next(it)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig())
    ck.save(3, setup["state"], it)
    ck.wait()
    expected = [next(it) for _ in range(2)]
    fresh = loader().__iter__()
    ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"]), fresh)
    ck.close()
    got = [next(fresh) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh8, caplog):
    """The fallback and the unverified restore are said in log.txt without the workdir's path (its name can be a
    patient's: only the checkpoint folder's own name, and orbax's reason with the path cut out)."""
    setup = toy_setup(mesh8)
    ck_dir = tmp_path / "CANARY_Doe_John" / "checkpoints"
    ck = Checkpointer(ck_dir, CheckpointConfig(keep=3))
    ck.save(1, setup["state"])
    ck.wait()
    later = dict(setup["state"], step=setup["state"]["step"] + 5)
    ck.save(2, later)
    ck.close()
    for f in (ck_dir / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (ck_dir / "1" / CHECKSUMS).unlink()  # as an older lnfm saved it: restored unverified
    logger = logging.getLogger("lnfm")  # may not propagate to the root once a workdir set up logging
    logger.addHandler(caplog.handler)
    try:
        with Checkpointer(ck_dir, CheckpointConfig()) as ck:
            state, step = ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"]))
    finally:
        logger.removeHandler(caplog.handler)
    assert step == 1 and int(state["step"]) == 0
    assert "checkpoint 2 in checkpoints/ cannot be restored" in caplog.text and "falling back" in caplog.text
    assert "checkpoint 1 in checkpoints/ has no" in caplog.text
    assert "CANARY" not in caplog.text and str(tmp_path) not in caplog.text
    assert (ck_dir / "corrupt_2").is_dir() and not (ck_dir / "2").exists()


def test_a_truncated_step_without_a_checksum_list_is_one_line_naming_the_run_and_the_step(tmp_path, mesh8):
    """An older lnfm wrote no checksum list: export and finetune --init read such a step unverified, and a file of
    it cut short (a copy that stopped) was Orbax's traceback. It is one line naming the folder and the step, as a
    step whose list fails is; a step that reads back whole but does not fit the target keeps its traceback."""
    import re

    setup = toy_setup(mesh8)
    ck_dir = tmp_path / "run" / "checkpoints"
    ck = Checkpointer(ck_dir, CheckpointConfig())
    ck.save(3, setup["state"])
    ck.close()
    (ck_dir / "3" / CHECKSUMS).unlink()
    for data in (f for f in (ck_dir / "3" / "state").rglob("*") if f.is_file() and f.parent.name == "d"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # the arrays' data files, cut short
    target = st.abstract_state(setup["state"], setup["shardings"])["params"]
    said = f"^{re.escape(str(ck_dir))}: checkpoint step 3 cannot be read \\(.+\\); it has no {CHECKSUMS} \\(saved by"
    with pytest.raises(CheckpointError, match=said) as caught:
        restore_params(ck_dir, target)
    assert "\n" not in str(caught.value)
    other = toy_setup(mesh8, hidden=48)
    ck = Checkpointer(tmp_path / "fine", CheckpointConfig())
    ck.save(1, setup["state"])
    ck.close()
    (tmp_path / "fine" / "1" / CHECKSUMS).unlink()
    with pytest.raises(Exception) as caught:  # another model's target: not a damaged file
        restore_params(tmp_path / "fine", st.abstract_state(other["state"], other["shardings"])["params"])
    assert not isinstance(caught.value, CheckpointError)


def test_unrestorable_everywhere_raises_and_moves_nothing(tmp_path, mesh8):
    small = toy_setup(mesh8)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig())
    ck.save(1, small["state"])
    ck.close()
    other = toy_setup(mesh8, hidden=48)  # a changed model: no checkpoint fits it
    with Checkpointer(tmp_path / "ck", CheckpointConfig()) as ck, \
            pytest.raises(CheckpointError, match="no checkpoint could be restored"):
        ck.restore_latest(st.abstract_state(other["state"], other["shardings"]))
    assert (tmp_path / "ck" / "1").is_dir()


def test_a_save_after_the_folder_moved_is_refused_and_does_not_recreate_it(tmp_path, mesh8):
    """Orbax recreated a moved checkpoint folder at its old path and saved there, splitting the run in two; now the
    save is refused in one line naming the folder, and the moved folder keeps its checkpoint."""
    import re

    from lnfm.errors import LnfmError

    setup = toy_setup(mesh8)
    ck = Checkpointer(tmp_path / "wd" / "checkpoints", CheckpointConfig())
    ck.save(1, setup["state"])
    ck.wait()
    (tmp_path / "wd").rename(tmp_path / "moved")
    old = re.escape(str(tmp_path / "wd" / "checkpoints"))
    with pytest.raises(LnfmError, match=f"^{old}: moved, renamed or removed"):  # one line, exit 2
        ck.save(2, setup["state"])
    ck.close()
    assert not (tmp_path / "wd").exists()
    with Checkpointer(tmp_path / "moved" / "checkpoints", CheckpointConfig()) as moved:
        assert moved.all_steps() == [1]


def _move_during_save(monkeypatch, step, moment, move):
    """Run `move()` while step `step` is saved in the background: once its folder is made, before any array is
    written ("arrays"), or once everything is written, before the commit ("commit")."""
    import orbax.checkpoint as ocp

    import lnfm.train.checkpoint as ckpt

    if moment == "arrays":
        real = ocp.path.atomicity.AtomicRenameTemporaryPath.create

        async def create(self, *args, **kwargs):
            made = await real(self, *args, **kwargs)
            if self.get_final().name == str(step):
                move()
            return made

        monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "create", create)
    else:
        real = ckpt.write_checksums

        def write(folder):
            if Path(folder).name.split(".")[0] == str(step):
                move()
            real(folder)

        monkeypatch.setattr(ckpt, "write_checksums", write)


@pytest.mark.parametrize("moment", ["arrays", "commit"])
def test_a_save_in_flight_when_the_folder_moves_commits_where_it_went(tmp_path, mesh8, monkeypatch, moment):
    """The user moves the run while step 2 is saved in the background. The step was lost without a word (its
    writes and its commit went to the old path: they failed, or TensorStore remade the old path's folders and
    wrote part of the step there). The save now follows the folder: step 2 commits where it went, whole, nothing
    is left at the old path, the next save ends the job in one line, and the moved run resumes from step 2."""
    import re

    from lnfm.errors import FolderMoved
    from lnfm.train.checkpoint import newest_intact_step

    setup = toy_setup(mesh8)
    wd, moved = tmp_path / "wd", tmp_path / "moved"
    ck = Checkpointer(wd / "checkpoints", CheckpointConfig(keep=3))
    ck.save(1, setup["state"])
    ck.wait()
    _move_during_save(monkeypatch, 2, moment, lambda: wd.rename(moved))
    later = dict(setup["state"], step=setup["state"]["step"] + 2)
    ck.save(2, later)
    ck.wait()
    old = re.escape(str(wd / "checkpoints"))
    with pytest.raises(FolderMoved, match=f"^{old}: moved, renamed or removed [^;]*; [^;]*resume\\)$"):
        ck.save(3, later)
    ck.close()
    assert not wd.exists()
    assert newest_intact_step(moved / "checkpoints") == 2
    with Checkpointer(moved / "checkpoints", CheckpointConfig()) as ck:
        state, step = ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"]))
    assert step == 2 and int(state["step"]) == int(later["step"])


def test_a_save_cut_short_by_the_folder_going_away_names_the_lost_step(tmp_path, mesh8, monkeypatch):
    """The run is moved to another disk (copied, then removed) while step 2 is saved: that step cannot be kept.
    The job used to end with the folder's line alone; now the line names step 2 as lost, and the copy resumes
    from step 1, the newest intact step."""
    import shutil

    from lnfm.errors import FolderMoved
    from lnfm.train.checkpoint import newest_intact_step

    setup = toy_setup(mesh8)
    wd, moved = tmp_path / "wd", tmp_path / "moved"
    ck = Checkpointer(wd / "checkpoints", CheckpointConfig(keep=3))
    ck.save(1, setup["state"])
    ck.wait()

    def to_another_disk():
        shutil.copytree(wd, moved)
        shutil.rmtree(wd)

    _move_during_save(monkeypatch, 2, "commit", to_another_disk)
    ck.save(2, setup["state"])
    with pytest.raises(FolderMoved, match="; checkpoint 2 was being saved and is lost: the rerun resumes from the "
                                          "one before$"):
        ck.wait()
    ck.close()
    assert not wd.exists()
    assert newest_intact_step(moved / "checkpoints") == 1
    with Checkpointer(moved / "checkpoints", CheckpointConfig()) as ck:
        assert ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"]))[1] == 1
        assert ck.all_steps() == [1]


def test_no_checkpoint_and_missing_params(tmp_path, mesh8):
    setup = toy_setup(mesh8)
    with Checkpointer(tmp_path / "ck", CheckpointConfig()) as ck:
        assert ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"])) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_params(tmp_path / "ck", setup["state"]["params"])


def test_a_bit_flip_is_caught_by_the_checksums_and_the_previous_step_restores(tmp_path, mesh8, caplog):
    """Orbax itself reads a flipped bit in an array as a valid (wrong) value; the checksum list
    written after each commit makes it an unreadable checkpoint that falls back with a warning."""
    from lnfm.train.checkpoint import CHECKSUMS, verify_checksums

    setup = toy_setup(mesh8)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep=3))
    ck.save(1, setup["state"])
    ck.save(2, dict(setup["state"], step=setup["state"]["step"] + 5))
    ck.close()
    for step in (1, 2):
        assert (tmp_path / "ck" / str(step) / CHECKSUMS).is_file() and verify_checksums(tmp_path / "ck" / str(step))
    data = max((f for f in (tmp_path / "ck" / "2" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit, in the largest array file
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checksums(tmp_path / "ck" / "2")
    with pytest.raises(CheckpointError, match="checksum mismatch"):  # --init and export refuse it outright
        restore_params(tmp_path / "ck", st.abstract_state(setup["state"], setup["shardings"])["params"])
    logger = logging.getLogger("lnfm")
    logger.addHandler(caplog.handler)
    try:
        with Checkpointer(tmp_path / "ck", CheckpointConfig()) as ck:
            state, step = ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"]))
    finally:
        logger.removeHandler(caplog.handler)
    assert step == 1 and int(state["step"]) == 0 and leaves_equal(state["params"], setup["state"]["params"])
    assert "checkpoint 2" in caplog.text and "checksum mismatch" in caplog.text and "falling back" in caplog.text
    assert (tmp_path / "ck" / "corrupt_2").is_dir()


def test_a_step_checked_then_restored_is_hashed_once_and_a_file_changed_since_is_hashed_again(tmp_path, mesh8,
                                                                                             monkeypatch):
    """finetune --init checks the step (`check_latest_step`, before the workdir is written) and restores it (once
    per repeat): each hashed every file of it again. A step settled on disk is hashed once; one written just now
    (a file time could not tell a change in the same tick) or changed since is hashed at each check."""
    from lnfm.train import checkpoint
    from lnfm.train.checkpoint import check_latest_step

    setup = toy_setup(mesh8)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig())
    ck.save(3, setup["state"])
    ck.close()
    target = st.abstract_state(setup["state"], setup["shardings"])["params"]
    files = len((tmp_path / "ck" / "3" / CHECKSUMS).read_text().splitlines())
    hashed = []
    sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path) or sha256(path))

    for settled_ns, hashes in ((10**18, 3 * files), (0, files)):  # written just now, or long ago
        monkeypatch.setattr(checkpoint, "_SETTLED_NS", settled_ns, raising=False)
        hashed.clear()
        check_latest_step(tmp_path / "ck")
        for _ in range(2):
            assert leaves_equal(restore_params(tmp_path / "ck", target), setup["state"]["params"])
        assert len(hashed) == hashes, settled_ns

    data = max((f for f in (tmp_path / "ck" / "3" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (tmp_path / "flipped").write_bytes(bytes(raw))
    (tmp_path / "flipped").replace(data)  # same size, as a copy tool writes it
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        restore_params(tmp_path / "ck", target)
