"""The CPU-only notice of an accelerator-sized finetune preset."""

from __future__ import annotations

import jax
import pytest

from lnfm.jobs import finetune_cpu
from lnfm.jobs.finetune import load_finetune_config


def test_accelerator_preset_on_a_cpu_names_the_estimate_and_the_cpu_preset():
    cfg = load_finetune_config("mediastinum", [])
    flops = finetune_cpu.step_flops(cfg)
    # A ViT-tiny + fine-head step at 160x160x96, batch 2: hundreds of GFLOPs (forward + backward). Its
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
