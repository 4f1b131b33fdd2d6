"""The scale planner: its figures equal those of the pretraining job's own compiled step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lnfm.jobs import plan as planner
from lnfm.models.sharding import batch_sharding, make_mesh, use_rules
from lnfm.jobs.pretrain import build_training, step_flops

REQ = planner.PlanRequest(model="vit_tiny", patch=32, global_batch=8, mesh={"fsdp": 8}, device="v5e",
                          overrides=("model.depth=2",))


@pytest.fixture(scope="module")
def planned():
    return planner.plan(REQ)


@pytest.fixture(scope="module")
def reference():
    """The job's step built the job's way (real, allocated arrays) and compiled here."""
    cfg = planner.pretrain_config(REQ)
    mesh = make_mesh(cfg.mesh)
    graphdef, state, shardings, step_fn = build_training(cfg, mesh)
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 32, 1), np.float32, sharding=batch_sharding(mesh))}
    with use_rules(mesh, cfg.mesh.rules):
        compiled = step_fn.lower(state, batch).compile()
    return cfg, graphdef, state, compiled


def _local_bytes(tree) -> int:
    """Bytes of one device's shards of real arrays."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def test_memory_figures_match_the_compiled_job_step(planned, reference):
    _, _, state, compiled = reference
    m = compiled.memory_analysis()
    mem = planned["memory"]
    assert mem["argument"] == m.argument_size_in_bytes
    assert mem["output"] == m.output_size_in_bytes
    assert mem["alias"] == m.alias_size_in_bytes
    assert mem["temp"] == m.temp_size_in_bytes
    assert mem["params"] == _local_bytes(state["params"])
    assert mem["opt_state"] == _local_bytes(state["opt_state"])
    assert 0 < mem["params"] < sum(x.nbytes for x in jax.tree.leaves(state["params"]))  # FSDP shards them
    assert mem["peak"] == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                           + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def test_flops_and_step_time(planned, reference):
    cfg, graphdef, state, compiled = reference
    assert planned["model_flops_per_step"] == pytest.approx(step_flops(cfg, graphdef, state))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert planned["xla_flops_per_device"] == pytest.approx(cost["flops"])
    peak = 197.0e12  # TPU v5e bf16, the lnfm.train.mfu table
    want = planned["model_flops_per_step"] / (8 * peak * planner.DEFAULT_MFU)
    assert planned["step_time_s"] == pytest.approx(want)
    assert planned["fits"] and planned["advice"] == []
    text = planner.report(planned)
    assert "fits" in text and "assumed MFU 40%" in text


def test_analytic_state_bytes_are_exact(planned):
    a = planner.analytic_plan(REQ)
    assert a["memory"]["params"] == planned["memory"]["params"]
    assert a["memory"]["opt_state"] == pytest.approx(planned["memory"]["opt_state"], rel=0.01)  # + Adam counters
    assert a["params"] == planned["params"] and a["source"] == "analytic"


def test_data_parallel_replicates_the_state(planned):
    dp = planner.analytic_plan(planner.PlanRequest(model="vit_tiny", patch=32, global_batch=8, mesh={"data": 8},
                                                   overrides=("model.depth=2",)))
    assert dp["rules"] == "dp"
    assert dp["memory"]["params"] == 4 * dp["params"]  # every float32 parameter on every device
    assert dp["memory"]["params"] > 5 * planned["memory"]["params"]


def test_a_configuration_that_does_not_fit_gets_advice():
    gib = planner.GIB
    p = {"fits": False, "usable_bytes": 14.4 * gib, "devices": 64, "mesh": {"data": 64, "fsdp": 1, "tensor": 1},
         "remat": "none", "memory": {"params": 2.5 * gib, "opt_state": 5 * gib, "temp": 30 * gib,
                                     "peak": 38 * gib}}
    tips = " ".join(planner.advice(p))
    assert "--mesh fsdp=64" in tips and "--remat full" in tips and "train.accum_steps=8" in tips


def test_mesh_parsing_and_device_environment():
    assert planner.parse_mesh("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    for bad in ("fsdp", "pipe=2", "fsdp=0", ""):
        with pytest.raises(ValueError, match="--mesh"):
            planner.parse_mesh(bad)
    env = planner.device_env(256)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=256") == 1
    assert "--xla_force_host_platform_device_count=8" not in env["XLA_FLAGS"]


def test_wrong_device_count_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 16 devices but this process sees 8"):
        planner.plan(planner.PlanRequest(model="vit_tiny", patch=32, global_batch=16, mesh={"fsdp": 16}))


def test_planner_batch_sharding_is_the_jobs():
    # The planner's batch sharding is the job's: leading axis over (data, fsdp).
    mesh = make_mesh(planner.pretrain_config(REQ).mesh)
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert NamedSharding(mesh, PartitionSpec()).is_fully_replicated


def test_the_pretraining_jobs_memory_check_counts_the_planners_step(planned, monkeypatch):
    """On a CPU host the job checks the planner's figure before the workdir is written: the compiled step's
    peak on each of this host's 8 devices, plus the loader's batches (batch x voxels x float32, prefetch
    2 + 1 being assembled)."""
    from lnfm.config import ConfigError
    from lnfm.jobs import pretrain

    cfg = planner.pretrain_config(REQ)
    mesh = make_mesh(cfg.mesh)
    gib = 2**30
    step = planned["memory"]["peak"] * 8
    batches = 8 * 32**3 * 4 * 3
    tiny_host = (step + batches - 1, step + batches - 1)  # one byte short: refused, with both parts named
    with pytest.raises(ConfigError, match=rf"^train.global_batch=8 of 32x32x32 patches: a step needs about "
                                          rf"{(step + batches) / gib:.1f} GiB on this host \(batches "
                                          rf"{batches / gib:.1f} GiB, step {step / gib:.1f} GiB\)"):
        pretrain.check_memory(cfg, mesh, tiny_host)
    pretrain.check_memory(cfg, mesh, (step + batches, step + batches))  # exactly enough: runs
    # A batch whose loader buffers alone exceed the host is refused without compiling anything.
    monkeypatch.setattr(pretrain, "build_training", lambda *a, **k: pytest.fail("compiled a step that cannot fit"))
    huge = planner.pretrain_config(planner.PlanRequest(model="vit_tiny", patch=32, global_batch=100000,
                                                       mesh={"data": 8}, device="v5e"))
    with pytest.raises(ConfigError, match=r"batches 36.6 GiB\), more than its 16.0 GiB: lower train.global_batch "
                                          r"or model.img_size$"):
        pretrain.check_memory(huge, make_mesh(huge.mesh), (16 * gib, 16 * gib))
