"""What both training jobs share: the run (`run_training_job`), batch checks, device batches, and
`fit` resuming exactly."""

import dataclasses
import hashlib
import json

import jax
import numpy as np
import pytest

from lnfm.config import ConfigError
from lnfm.data.contract import Normalization, PrepareContract, Preprocessing, read_preprocessing
from lnfm.models.sharding import MeshConfig
from lnfm.runs import PretrainRun
from lnfm.safety import PathClash
from lnfm.train.checkpoint import CheckpointConfig
from lnfm.train.job import Checked, check_batch, device_batch, fit, run_training_job
from lnfm.train.loop import Throughput
from lnfm.train.step import make_train_step
from lnfm.workdir import MetricsWriter, WorkdirError, read_metrics
from train_toy import toy_batches, toy_setup


def test_check_batch():
    check_batch(16, 2, 2, 4)  # 16 = 2 processes x 8; 8 batch shards x microbatches = 8
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        check_batch(16, 1, 3, 1)
    with pytest.raises(ConfigError, match=r"multiple of the 4 batch shards \(mesh data x fsdp\) times "
                                          r"train.accum_steps=3"):
        check_batch(16, 3, 1, 4)


def test_device_batch_keeps_the_named_keys_with_their_dtypes(mesh8):
    sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
    host = {"image": np.arange(16, dtype=np.float64).reshape(8, 2), "label": np.ones((8, 2)), "case_id": ["a"] * 8}
    out = device_batch(host, sharding, {"image": np.float32, "label": np.int32})
    assert set(out) == {"image", "label"}
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(out["image"]), host["image"].astype(np.float32))
    assert out["image"].sharding == sharding


def _fit(tmp_path, mesh, batches, total, on_resume=None):
    setup = toy_setup(mesh)
    step = make_train_step(setup["loss_fn"], setup["tx"], setup["sched"], setup["shardings"], setup["batch_sharding"])
    it = iter(batches)
    return fit(step, setup["state"], setup["shardings"], lambda: jax.device_put(next(it), setup["batch_sharding"]),
               None, workdir=tmp_path, checkpoint=CheckpointConfig(every=2, keep=5, async_save=False), mesh=mesh,
               rules="dp", total_steps=total, writer=MetricsWriter(tmp_path, tensorboard=False),
               throughput=Throughput(8, 8 * 16, None), config={}, log_every=1, on_resume=on_resume)


def test_fit_resumes_from_the_last_checkpoint_and_matches_one_uninterrupted_run(tmp_path, mesh8):
    batches = toy_batches(6)
    straight = _fit(tmp_path / "a", mesh8, batches, 6)
    _fit(tmp_path / "b", mesh8, batches[:3], 3)  # saves at 2 and at the end (3)
    starts = []
    resumed = _fit(tmp_path / "b", mesh8, batches[3:], 6, on_resume=starts.append)
    assert starts == [3] and resumed.step == straight.step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    for a, b in zip(jax.tree.leaves(straight.state["params"]), jax.tree.leaves(resumed.state["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_a_resumed_run_s_training_seconds_count_every_call(tmp_path, mesh8):
    """train_time_s (what an equal-time peer gets) was the last call's seconds only: a run stopped at step 3 and
    resumed reported the resumed call's. Each checkpoint records the sum so far; the resumed call adds to it."""
    import json

    from lnfm.train.loop import TRAIN_TIME_FILE

    batches = toy_batches(6)
    first = _fit(tmp_path / "b", mesh8, batches[:3], 3)  # saves at 2 and at the end (3)
    recorded = json.loads((tmp_path / "b" / "checkpoints" / "3" / TRAIN_TIME_FILE).read_text())["train_s"]
    assert 0 < recorded <= first.train_s
    resumed = _fit(tmp_path / "b", mesh8, batches[3:], 6)
    assert resumed.train_s > recorded
    final = json.loads((tmp_path / "b" / "checkpoints" / "6" / TRAIN_TIME_FILE).read_text())["train_s"]
    assert recorded < final <= resumed.train_s
    again = _fit(tmp_path / "b", mesh8, [], 6)  # a finished run resumed: no step, the recorded seconds
    assert again.train_s == pytest.approx(final, abs=0.05)  # plus the empty loop's own milliseconds


# ----------------------------------------------------------------------------- run_training_job


@dataclasses.dataclass
class _TrainSection:
    steps: int = 10  # a resume may not shorten the run
    global_batch: int = 8
    accum_steps: int = 1


@dataclasses.dataclass
class _JobConfig:
    """The sections the shared run reads: mesh, train (steps, batch), model (a resume key)."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # data parallel over every device
    train: _TrainSection = dataclasses.field(default_factory=_TrainSection)
    model: dict = dataclasses.field(default_factory=lambda: {"depth": 2})


def _preprocessing() -> Preprocessing:
    contract = PrepareContract(version=2, spacing=(1.5, 1.5, 2.0), orientation="RAS", crop_body=True,
                               body_threshold_hu=-500.0, channels=("CT",), ct_storage="int16", label_map={},
                               resample_channels=True)
    return Preprocessing(contract, Normalization((-160.0, 240.0), 5.0), (32, 32, 16))


def _job(workdir, train, check=None, cfg=None, inputs=None) -> int:
    cfg = cfg or _JobConfig()
    return run_training_job(cfg, PretrainRun(workdir), inputs=inputs or {}, resume_keys=("model",),
                            check=check or (lambda c: Checked(c, _preprocessing(), "ctx")), train=train,
                            tensorboard=False)


def test_run_training_job_records_config_preprocessing_and_summary(tmp_path):
    seen = {}

    def train(checked, run, mesh, writer):
        seen.update(context=checked.context, root=run.root, devices=mesh.devices.size)
        assert (run.root / "config.yaml").is_file() and (run.root / ".lnfm.lock").is_file()  # written, held
        return {"step": 7, "loss": np.float32(0.25)}

    assert _job(tmp_path / "w", train) == 0
    assert seen == {"context": "ctx", "root": tmp_path / "w", "devices": jax.device_count()}
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["step"] == 7 and summary["loss"] == 0.25 and summary["wall_time_s"] > 0
    assert summary["config_sha256"] == hashlib.sha256((tmp_path / "w" / "config.yaml").read_bytes()).hexdigest()
    assert read_preprocessing(tmp_path / "w" / "preprocessing.json") == _preprocessing()
    assert not (tmp_path / "w" / ".lnfm.lock").exists()


def test_run_training_job_preempted_failed_or_refused_writes_no_summary(tmp_path):
    assert _job(tmp_path / "pre", lambda *a: None) == 0  # a signal stopped training: resumable, unfinished
    assert (tmp_path / "pre" / "config.yaml").is_file() and not (tmp_path / "pre" / "summary.json").exists()

    def bad_check(cfg):
        raise ConfigError("data.weights has 2 values for 1 datasets")

    with pytest.raises(ConfigError, match="data.weights"):  # checks fail before anything is written
        _job(tmp_path / "chk", lambda *a: {}, check=bad_check)
    assert not (tmp_path / "chk").exists()
    with pytest.raises(ConfigError, match=f"multiple of the {jax.device_count()} batch shards"):
        _job(tmp_path / "batch", lambda *a: {}, cfg=_JobConfig(train=_TrainSection(accum_steps=3)))
    assert not (tmp_path / "batch").exists()
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(PathClash, match="--workdir lies inside --data"):
        _job(data / "run", lambda *a: {}, inputs={"--data": [str(data)]})
    # A started run (a checkpoint) is resumed only with the same model section.
    (tmp_path / "pre" / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(WorkdirError, match=r"model.depth=2 \(new: 3\)"):
        _job(tmp_path / "pre", lambda *a: {}, cfg=_JobConfig(model={"depth": 3}))
    assert not (tmp_path / "pre" / "summary.json").exists()


def test_run_training_job_resumes_only_under_the_recorded_preprocessing(tmp_path):
    """A run's checkpoints were trained under the preprocessing it records; resumed with another
    (a changed CT window, another store's contract) it would mix two and record only the last."""
    assert _job(tmp_path / "w", lambda *a: None) == 0
    (tmp_path / "w" / "checkpoints" / "5").mkdir(parents=True)
    before = (tmp_path / "w" / "preprocessing.json").read_text()
    other = dataclasses.replace(_preprocessing(), normalization=Normalization((-1000.0, 1000.0), 5.0))
    with pytest.raises(WorkdirError, match=r"preprocessing.normalization.hu_window=\[-160.0, 240.0\] "
                                           r"\(new: \[-1000.0, 1000.0\]\)") as e:
        _job(tmp_path / "w", lambda *a: {}, check=lambda c: Checked(c, other, "ctx"))
    assert "the run to resume was trained with" in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith("resume with the same data and settings or choose a new --workdir")
    assert (tmp_path / "w" / "preprocessing.json").read_text() == before
    assert not (tmp_path / "w" / "summary.json").exists()
    assert _job(tmp_path / "w", lambda *a: {"step": 5}) == 0  # the same preprocessing resumes


@pytest.mark.parametrize("sizes,rules,idle", [
    ({"data": 4, "fsdp": 1, "tensor": 2}, "fsdp", "tensor"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "dp", "tensor"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", None),
    ({"data": 1, "fsdp": 8, "tensor": 1}, "dp", None),  # the batch is split over 'fsdp' by every table
])
def test_a_mesh_axis_the_rules_shard_nothing_over_is_refused(sizes, rules, idle):
    """Both training jobs (`run_training_job`) refuse a mesh axis no rule of the table names: its devices held the same
    shards and repeated the same work (the rule table in lnfm.models.sharding, read by hand for each case)."""
    from lnfm.train.job import check_axes_used

    if idle is None:
        check_axes_used(sizes, rules)
        return
    with pytest.raises(ConfigError, match=f"^mesh.{idle}={sizes[idle]}: the sharding rules '{rules}' shard nothing "
                                          f"over the '{idle}' axis.*mesh.rules=fsdp_tp, or set mesh.{idle}=1$"):
        check_axes_used(sizes, rules)


def test_the_fewer_steps_check_counts_the_step_restore_would_use_not_a_corrupt_newer_one(tmp_path, mesh8):
    """Step 4 is corrupt (a flipped byte; restore falls back to step 2): train.steps=3 lengthens the run from
    step 2 and is allowed; train.steps=1 is refused naming step 2, where the resume would start."""
    from lnfm.train.checkpoint import Checkpointer
    from lnfm.train.job import check_resume_steps

    run = PretrainRun(tmp_path / "w")
    state = toy_setup(mesh8)["state"]
    with Checkpointer(run.checkpoints, CheckpointConfig(keep=3)) as ck:
        ck.save(2, state)
        ck.save(4, state)
    data = max((f for f in (run.checkpoints / "4" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    check_resume_steps(run, 3)
    with pytest.raises(WorkdirError, match=r"has reached step 2, beyond train.steps=1; .* give train.steps=2 or more"):
        check_resume_steps(run, 1)


def test_a_step_without_a_checksum_list_counts_only_when_it_reads_back(tmp_path, mesh8, monkeypatch):
    """Steps 2 and 4 of an older lnfm's run, saved without a checksum list; step 4's array file was cut short.
    The fewer-steps check counted step 4 (no list: intact) and refused train.steps=3, though the restore falls
    back to step 2; now a step without a list counts only when its arrays and records read back, as the restore
    finds: step 2, whole, does."""
    import lnfm.train.checkpoint as ckpt
    from lnfm.train import state as st
    from lnfm.train.checkpoint import CHECKSUMS, Checkpointer, intact, newest_intact_step
    from lnfm.train.job import check_resume_steps

    monkeypatch.setattr(ckpt, "_READ_BATCH", 1024)  # the toy's arrays read back a few at a time, as a model's do

    run = PretrainRun(tmp_path / "w")
    setup = toy_setup(mesh8)
    with Checkpointer(run.checkpoints, CheckpointConfig(keep=3)) as ck:
        ck.save(2, setup["state"], config={"note": "x"})
        ck.save(4, setup["state"], config={"note": "x"})
    for step in (2, 4):
        (run.checkpoints / str(step) / CHECKSUMS).unlink()
    data = max((f for f in (run.checkpoints / "4" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert intact(run.checkpoints / "2") and not intact(run.checkpoints / "4")
    assert newest_intact_step(run.checkpoints) == 2
    check_resume_steps(run, 3)
    with pytest.raises(WorkdirError, match=r"has reached step 2, beyond train.steps=1; .* give train.steps=2 or more"):
        check_resume_steps(run, 1)
    with Checkpointer(run.checkpoints, CheckpointConfig()) as ck:  # the restore agrees
        assert ck.restore_latest(st.abstract_state(setup["state"], setup["shardings"]))[1] == 2
