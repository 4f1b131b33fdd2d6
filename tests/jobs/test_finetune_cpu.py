"""The CPU-only notice of an accelerator-sized finetune preset."""

from __future__ import annotations

import jax
import pytest

from lnfm.config import ConfigError
from lnfm.jobs import finetune_cpu
from lnfm.jobs.finetune import load_finetune_config


def test_accelerator_preset_on_a_cpu_names_the_estimate_and_the_cpu_preset():
    cfg = load_finetune_config("mediastinum", [])
    flops = finetune_cpu.step_flops(cfg)
    # A ViT-tiny + fine-head step at 112x112x96, batch 2: hundreds of GFLOPs (forward + backward). Its
    # 2000 steps fit an hour at 200 GFLOP/s, so a notice here needs the rate of this CPU, not a fast one.
    assert 1e11 < flops < 1e14 and flops * cfg.train.steps / 2e11 < finetune_cpu.CPU_BUDGET_S
    rate = 1e10
    line = finetune_cpu.cpu_notice(cfg, rate)
    assert line is not None and "\n" not in line
    assert "mediastinum" in line and "--quick" in line
    assert f"{flops / rate:.0f} s/step" in line
    assert f"{flops / rate * cfg.train.steps / 3600:.1f} h" in line


def test_a_run_that_fits_on_any_cpu_is_not_measured(monkeypatch):
    """A few steps of the mediastinum preset fit the budget at even 1 GFLOP/s: no notice, and no
    convolution is timed to find out."""
    monkeypatch.setattr(finetune_cpu, "cpu_step_rate", lambda cfg: pytest.fail("measured a run that fits anywhere"))
    cfg = load_finetune_config("mediastinum", ["train.steps=2"])
    assert finetune_cpu.step_flops(cfg) * 2 / 1e9 < finetune_cpu.CPU_BUDGET_S
    assert finetune_cpu.cpu_notice(cfg) is None


def test_no_notice_for_the_cpu_preset_or_on_an_accelerator(monkeypatch):
    assert finetune_cpu.cpu_notice(load_finetune_config("pelvis", [], quick=True), 1e10) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert finetune_cpu.cpu_notice(load_finetune_config("mediastinum", []), 1e10) is None


def test_the_cpu_recipe_gets_no_notice_however_slow_the_cpu():
    """A CPU too slow for --quick within the budget must not be told to add --quick."""
    slow = 1e6  # FLOP/s: every preset, the CPU recipe included, estimates far past the budget
    quick = load_finetune_config("pelvis", ["train.steps=1000000"], quick=True)
    assert finetune_cpu.is_cpu_recipe(quick)
    assert finetune_cpu.cpu_notice(quick, slow) is None
    # The CPU recipe with a larger patch is no longer it, and is told so.
    bigger = load_finetune_config("pelvis", ["site.patch=[64,64,64]", "model.img_size=[64,64,64]",
                                                "train.steps=1000000"], quick=True)
    assert not finetune_cpu.is_cpu_recipe(bigger)
    line = finetune_cpu.cpu_notice(bigger, slow)
    assert line is not None and "--quick" in line and "64x64x64" in line


def test_the_rate_is_measured_on_the_configured_model_at_the_probe_patch():
    """The probe keeps the preset's model, head and loss and changes only patch, img_size and batch;
    it runs the loss with deep supervision too (the step's own tuple output)."""
    import math

    cfg = load_finetune_config("mediastinum", ["head.deep_supervision=true"])
    probe = finetune_cpu.probe_config(cfg)
    assert tuple(probe.site.patch) == tuple(probe.model.img_size) == finetune_cpu.PROBE_PATCH
    assert probe.train.global_batch == finetune_cpu.PROBE_BATCH
    assert probe.head == cfg.head and probe.loss == cfg.loss and probe.model.size == cfg.model.size
    # the probe's FLOPs scale with its voxels: a 2 x 32^3 step is a small fraction of the preset's
    assert 0 < finetune_cpu.step_flops(probe) < finetune_cpu.step_flops(cfg) / 20
    rate = finetune_cpu.cpu_step_rate(cfg)
    assert math.isfinite(rate) and rate > finetune_cpu.SLOW_CPU_FLOPS


# Host memory: a step that cannot fit is refused before the workdir is written (it ended in the kernel's OOM kill).

def test_the_step_estimate_bounds_xla_s_own_figure_for_the_real_patch():
    """The estimate scales the probe's temporaries (2 x 32^3) to the run's patch and micro-batch. Reference:
    XLA's memory analysis of the same gradient compiled at the run's own 64^3 patch and batch 3. The probe's
    figure per voxel is larger than a big patch's (measured: 1092 against 900 bytes for the fine head at
    96^3), so the estimate errs high, never low, and by less than half."""
    import math

    import jax.numpy as jnp
    from flax import nnx

    from lnfm.models.segmenter import segmenter_from_config
    from lnfm.segmentation.losses import model_output_loss

    cfg = load_finetune_config("pelvis", ["site.patch=[64,64,64]", "model.img_size=[64,64,64]",
                                          "train.global_batch=6", "train.accum_steps=2"])
    est = finetune_cpu.step_bytes(cfg)["activations"]
    model = nnx.eval_shape(lambda: segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.ShapeDtypeStruct((3, 64, 64, 64, 1), jnp.float32)
    y = jax.ShapeDtypeStruct((3, 64, 64, 64), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, x, y: model_output_loss(cfg.loss, nnx.merge(graphdef, p, rest)(x), y)))
    real = grad.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes
    assert real <= est < 1.5 * real, (est, real)
    assert finetune_cpu.batch_bytes(cfg) == (6 * 64**3 * 8, 6 * 64**3 * 8 * (2 + 2))
    assert math.prod(cfg.site.patch) == 64**3


def test_a_step_that_cannot_fit_is_one_line_before_the_workdir(tmp_path, capsys, monkeypatch):
    """train.global_batch=100000 filled the memory until the kernel killed the job (exit 137, no message)."""
    from lnfm.cli import run_job
    from lnfm.data.prepare import PrepareConfig, prepare_dataset
    from lnfm.data.synth import SynthConfig, write_dataset

    monkeypatch.setattr(finetune_cpu, "_probe_grad", lambda cfg: pytest.fail("compiled for a batch that cannot fit"))
    store = tmp_path / "store"
    write_dataset(SynthConfig(site="pelvis", num_cases=4, seed=1, shape=(24, 24, 16), gallery=False,
                              use_real_shapes=False, spacing_inplane=(1.5, 1.5), slice_thickness=(1.5, 1.5),
                              nodes_per_case=(1, 1), short_axis_mm=(8.0, 10.0)), tmp_path / "raw")
    prepare_dataset(str(tmp_path / "raw"), str(store), PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0),
                    show_progress=False)
    capsys.readouterr()
    rc = run_job("finetune", ["--site", "pelvis", "--quick", "--data", str(store), "--init", "scratch",
                              "--workdir", str(tmp_path / "wd"), "train.global_batch=100000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("lnfm finetune: error: train.global_batch=100000 of "
                                                           "32x32x32 patches: a step needs about"), err
    assert "lower train.global_batch" in err[0] and not (tmp_path / "wd").exists()


def test_a_step_larger_than_the_host_is_refused_and_one_larger_than_the_free_memory_warned(monkeypatch, caplog):
    cfg = load_finetune_config("pelvis", ["site.patch=[64,64,64]", "model.img_size=[64,64,64]",
                                          "train.global_batch=4"])
    need = finetune_cpu.step_bytes(cfg)
    assert need["activations"] > need["batches"] > 0 and need["state"] > 0
    gib = 2**30
    with pytest.raises(ConfigError, match=r"^train.global_batch=4 of 64x64x64 patches: a step needs about .* GiB "
                                          r"on this host \(activations .*, more than its 0.5 GiB: .* or raise "
                                          r"train.accum_steps$"):
        finetune_cpu.check_memory(cfg, (gib // 2, gib // 2))
    with caplog.at_level("WARNING", logger="lnfm"):
        finetune_cpu.check_memory(cfg, (10**15, gib // 2))
    assert "more than the 0.5 GiB free now" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lnfm"):
        finetune_cpu.check_memory(cfg, (10**15, 10**15))
        monkeypatch.setattr(finetune_cpu, "_probe_grad", lambda cfg: pytest.fail("compiled for the CPU recipe"))
        # the CPU recipe (2 x 32^3) fits a 16 GiB host at the heaviest segmenter's figure: nothing compiled
        finetune_cpu.check_memory(load_finetune_config("pelvis", [], quick=True), (16 * gib, 16 * gib))
    assert caplog.text == ""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # accelerators report their own out-of-memory
    finetune_cpu.check_memory(cfg, (1, 1))
