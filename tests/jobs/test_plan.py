"""The scale planner: its figures equal those of the pretraining job's own compiled step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lnfm.config import ConfigError
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
    with pytest.raises(ConfigError, match=r"^--mesh data=2,fsdp=2,data=4: the axis 'data' is given twice; give each "
                                          r"axis once$"):
        planner.parse_mesh("data=2,fsdp=2,data=4")  # a dict kept the last size: 8 devices planned as 16
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


TINY8 = dict(model="vit_tiny", patch=32, global_batch=8, mesh={"data": 8}, device="v5e", overrides=("model.depth=2",))


@pytest.mark.parametrize("change, message", [
    ({"global_batch": 12}, "--global-batch 12: train.global_batch=12 must be a multiple of the 8 batch shards "
                           "(mesh data x fsdp) times train.accum_steps=1"),
    ({"accum_steps": 0}, "--accum-steps 0: train.accum_steps must be at least 1 (microbatches per step), got 0"),
    ({"assumed_mfu": 0.0}, "--assumed-mfu must be in (0, 1] (the share of the devices' peak FLOP/s the step "
                           "reaches), got 0"),
    ({"patch": 36}, "--patch 36: model.img_size [36, 36, 36] is not a whole number of model.patch_size [8, 8, 8] "
                    "tokens"),
    ({"overrides": ("train.steps=0",)}, "train.steps must be at least 1 (optimizer steps), got 0"),
    ({"overrides": ("mesh.fsdp=2",)}, "override mesh.fsdp=2: --mesh data=8 sets mesh.fsdp; give it with --mesh only"),
], ids=["batch-over-shards", "accum-steps-zero", "mfu-zero", "patch-not-whole-patches", "steps-zero", "mesh-override"])
def test_the_compiled_and_the_analytic_plan_refuse_the_same_requests(change, message):
    """One check for both modes: the same request gets the same one line from each, before anything compiles."""
    req = planner.PlanRequest(**{**TINY8, **change})
    for mode in (planner.plan, planner.analytic_plan):
        with pytest.raises(ConfigError) as e:
            mode(req)
        assert str(e.value) == message, mode.__name__


def test_accum_steps_reach_the_analytic_figures():
    """--accum-steps 2 halves the microbatch, so the activations (temp less the float32 gradients and updates,
    2 x the local parameter bytes) are half those of --accum-steps 1; the batch itself is the same."""
    one = planner.analytic_plan(planner.PlanRequest(**{**TINY8, "global_batch": 16}))
    two = planner.analytic_plan(planner.PlanRequest(**{**TINY8, "global_batch": 16, "accum_steps": 2}))
    assert (one["accum_steps"], two["accum_steps"]) == (1, 2)
    params = one["memory"]["params"]
    act1, act2 = one["memory"]["temp"] - 2 * params, two["memory"]["temp"] - 2 * params
    assert act1 == pytest.approx(2 * act2, abs=2)  # temp is truncated to whole bytes
    assert one["memory"]["other_args"] == two["memory"]["other_args"] == 2 * 32**3 * 4  # 16 volumes over 8 shards


def test_float16_is_planned_analytically_but_not_compiled_on_a_cpu():
    """The analytic plan is of the accelerator (16-bit activations: half float32's); the compiled plan runs
    on XLA:CPU, which has no float16 matmul."""
    f32 = planner.analytic_plan(planner.PlanRequest(**TINY8))
    f16 = planner.analytic_plan(planner.PlanRequest(**TINY8, dtype="float16"))
    assert f16["dtype"] == "float16"
    params = f32["memory"]["params"]
    assert f32["memory"]["temp"] - 2 * params == pytest.approx(2 * (f16["memory"]["temp"] - 2 * params), abs=2)
    with pytest.raises(ConfigError, match=r"^--dtype float16: the compiled plan runs on XLA:CPU, which has no "
                                          r"float16 matmul; plan it with --analytic, or use bfloat16$"):
        planner.plan(planner.PlanRequest(**TINY8, dtype="float16"))


def test_an_override_may_set_what_no_option_gives():
    """mesh.rules is the option's only when --rules is given; without it the override is the rule table."""
    assert planner.pretrain_config(planner.PlanRequest(**{**TINY8, "overrides": ("mesh.rules=fsdp",)})).mesh.rules \
        == "fsdp"
    with pytest.raises(ConfigError, match=r"^override mesh.rules=fsdp: --rules dp sets mesh.rules; give it with "
                                          r"--rules only$"):
        planner.pretrain_config(planner.PlanRequest(**{**TINY8, "rules": "dp", "overrides": ("mesh.rules=fsdp",)}))
    # a mesh given as a mapping sets its keys only: --mesh's sizes stay (it was refused as "--mesh sets mesh.data")
    mesh = planner.pretrain_config(planner.PlanRequest(**{**TINY8, "overrides": ("mesh={rules: fsdp}",)})).mesh
    assert (mesh.rules, mesh.data, mesh.fsdp) == ("fsdp", 8, 1)
    with pytest.raises(ConfigError, match=r"^override mesh=\{data: 4\}: --mesh data=8 sets mesh.data; give it with"):
        planner.pretrain_config(planner.PlanRequest(**{**TINY8, "overrides": ("mesh={data: 4}",)}))


IDLE_TENSOR = ("mesh axis 'tensor' (4 devices) is not used by the rules 'fsdp': nothing is sharded over it, so its "
               "devices repeat the same work and split no memory; the step time counts 2 of the 8 devices; "
               "--rules fsdp_tp shards over it")


def test_a_mesh_axis_no_rule_shards_over_speeds_nothing_up():
    """--mesh data=2,tensor=4 under vit_tiny's 'fsdp' rules: no rule names 'tensor', so the 8 devices do the work
    of the 2 data shards. By hand: model FLOPs / (2 x 989.4e12 FLOP/s (H100) x 0.4), and the memory of data=2
    alone; the report says so in one warning line. Under fsdp_tp the same mesh counts all 8."""
    base = dict(model="vit_tiny", patch=32, global_batch=8, device="h100", overrides=("model.depth=2",))
    two = planner.analytic_plan(planner.PlanRequest(**base, mesh={"data": 2}))
    analytic = planner.analytic_plan(planner.PlanRequest(**base, mesh={"data": 2, "tensor": 4}))
    for idle in (analytic, planner.plan(planner.PlanRequest(**base, mesh={"data": 2, "tensor": 4}))):
        assert idle["step_time_s"] == pytest.approx(idle["model_flops_per_step"] / (2 * 989.4e12 * 0.4))
        assert (idle["rules"], idle["devices"], idle["working_devices"]) == ("fsdp", 8, 2)
        assert idle["memory"]["params"] == two["memory"]["params"] == 4 * idle["params"]  # float32, not split
        assert idle["warnings"] == [IDLE_TENSOR]
        text = planner.report(idle)
        assert [line for line in text.splitlines() if line.startswith("warning:")] == [f"warning: {IDLE_TENSOR}"]
        assert "= model FLOPs / (2 x 989 TFLOP/s peak" in text
    assert two["warnings"] == [] and two["step_time_s"] == pytest.approx(analytic["step_time_s"])
    tp = planner.analytic_plan(planner.PlanRequest(**base, mesh={"data": 2, "tensor": 4}, rules="fsdp_tp"))
    assert (tp["working_devices"], tp["warnings"]) == (8, [])
    assert tp["step_time_s"] == pytest.approx(tp["model_flops_per_step"] / (8 * 989.4e12 * 0.4))


def test_tensor_parallel_splits_the_activations_the_rules_shard_over_tensor():
    """fsdp_tp maps act_heads and mlp to 'tensor': by hand (Korthikanti et al. 2022), a block keeps
    10 h + (24 h + 5 a s) / t bytes per token at 16 bits, here float32 (x2), local batch 8 / data 2 = 4, for
    the vit_tiny encoder (h 64, a 4, 2 blocks, 16 visible tokens) and decoder (h 64, a 4, 1 block, 64 tokens).
    Under 'fsdp' the same mesh splits nothing over 'tensor' (t = 1)."""
    base = dict(model="vit_tiny", patch=32, global_batch=8, mesh={"data": 2, "tensor": 4}, remat="none",
                overrides=("model.depth=2",))

    def by_hand(t):
        return sum(4 * seq * depth * 2 * (10 * 64 + (24 * 64 + 5 * 4 * seq) / t) for depth, seq in ((2, 16), (1, 64)))

    for rules, t in (("fsdp_tp", 4), ("fsdp", 1)):
        mem = planner.analytic_plan(planner.PlanRequest(**base, rules=rules))["memory"]
        assert mem["temp"] - 2 * mem["params"] == int(by_hand(t))  # temp = activations + f32 grads and updates


def test_the_analytic_tensor_parallel_saving_follows_the_compiled_steps():
    """Against XLA's memory analysis of the compiled step on this mesh (a model whose transformer activations
    dominate its temporaries): fsdp_tp over tensor=4 leaves 0.42 of fsdp's temporaries compiled, 0.32 analytic
    (0.91 before the analytic plan split activations by the rule table)."""
    base = dict(model="vit_tiny", patch=32, global_batch=4, mesh={"data": 2, "tensor": 4}, remat="none",
                overrides=("model.depth=2", "model.patch_size=4,4,4", "model.width=128", "model.decoder_width=128"))
    share = {}
    for how in (planner.plan, planner.analytic_plan):
        fsdp, tp = (how(planner.PlanRequest(**base, rules=r))["memory"]["temp"] for r in ("fsdp", "fsdp_tp"))
        share[how] = tp / fsdp
    assert share[planner.analytic_plan] == pytest.approx(share[planner.plan], abs=0.15)


def test_expected_step_time_at_full_and_impossible_mfu():
    from lnfm.train.mfu import expected_step_time

    h100 = planner.DEVICES["h100"]["kind"]
    # 8 H100s at 989.4 TFLOP/s each and MFU 1: 7.9152e15 FLOPs take one second
    assert expected_step_time(7.9152e15, h100, 8, 1.0) == pytest.approx(1.0)
    for bad in (0.0, -0.5, float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"assumed_mfu must be in \(0, 1\]"):
            expected_step_time(7.9152e15, h100, 8, bad)


def test_plan_knows_its_own_table_and_nothing_else(tmp_path):
    import hashlib
    import json

    md = tmp_path / "t.md"
    text, cells = "| a | b |\n|---|---|\n| 1 | 2 |\n", [{"x": 1}]
    planner.write_table(md, text, cells)
    js_text = json.dumps(cells, indent=1)
    first, _, rest = md.read_text().partition("\n")
    table_sha, json_sha = (hashlib.sha256(t.encode()).hexdigest()[:16] for t in (text, js_text))
    assert first == (f"<!-- written by lnfm plan --table (replaced by --force while unchanged) sha256:{table_sha} "
                     f"json-sha256:{json_sha} -->")
    assert rest == text and (tmp_path / "t.md.json").read_text() == js_text
    assert planner.own_table_json_digest(md) == json_sha
    planner.check_table_paths(md, force=True)  # its own, unchanged: --force may replace it
    with pytest.raises(ConfigError, match=rf"^--table {md}: exists \(a table lnfm plan wrote\); pass --force"):
        planner.check_table_paths(md, force=False)
    (tmp_path / "t.md.json").write_text(js_text + " ")  # the JSON changed: no longer plan's
    with pytest.raises(ConfigError, match=rf"^--table {md}: {md}.json exists and is not the JSON lnfm plan wrote"):
        planner.check_table_paths(md, force=True)
    (tmp_path / "t.md.json").unlink()
    planner.check_table_paths(md, force=True)  # a missing JSON is simply written
    md.write_text(md.read_text().replace("| 1 |", "| 9 |"))  # an edited table is the user's
    assert planner.own_table_json_digest(md) is None
    (tmp_path / "plain.md").write_text(first + "\n")  # the mark over other content
    assert planner.own_table_json_digest(tmp_path / "plain.md") is None
    (tmp_path / "bin.md").write_bytes(b"\xff\xfe\x00")
    assert planner.own_table_json_digest(tmp_path / "bin.md") is None


def test_a_table_inside_an_export_or_a_run_workdir_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """A table written into an export broke its checksums (`export --verify`: not listed in checksums.sha256)."""
    from tree_helpers import tree_digest

    from lnfm.cli import run_job

    export, workdir = tmp_path / "export", tmp_path / "wd"
    export.mkdir()
    (export / "model.json").write_text("{}")
    (export / "checksums.sha256").write_text("")
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.yaml").write_text("model: {}\n")
    monkeypatch.setattr(planner, "table", lambda *a: ("| a |\n|---|\n", []))  # the table itself takes minutes
    before = tree_digest(tmp_path)
    for md, reason in ((export / "x.md", f"lies inside the model export {export}"),
                       (export / "sub" / "x.md", f"lies inside the model export {export}"),
                       (workdir / "x.md", f"lies inside the pretraining workdir {workdir}")):
        assert run_job("plan", ["--table", str(md)]) == 2, md
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--table {md}: {reason}" in err, err
        assert tree_digest(tmp_path) == before, md
    assert run_job("plan", ["--table", str(tmp_path / "t.md")]) == 0  # elsewhere: written
    assert (tmp_path / "t.md").is_file()


def test_a_table_write_that_fails_keeps_the_earlier_pair(tmp_path, monkeypatch):
    """A full disk while the new table is written: the earlier table and JSON stay, still plan's, and no
    temporary file is left (a new table beside the old JSON would make that JSON look like the user's)."""
    import errno
    import hashlib

    md = tmp_path / "t.md"
    planner.write_table(md, "| old |\n", [{"old": 1}])
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(planner, "atomic_write_text", full)
    with pytest.raises(OSError, match="No space left"):
        planner.write_table(md, "| new |\n", [{"new": 1}])
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == before
    assert sorted(before) == ["t.md", "t.md.json"]
    planner.check_table_paths(md, force=True)  # the pair is still plan's
