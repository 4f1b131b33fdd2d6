"""Finetuning on a CPU: the CPU recipe (`--quick`, QUICK) and the one-line notice a CPU-only
finetune of an accelerator-sized preset prints.

The estimate is the planner's usual one: the step's model FLOPs from XLA's cost
analysis of the segmenter at the configured patch and batch (forward + backward
= 3 forwards; lowered, not compiled), divided by the FLOP rate this CPU reaches
on the configured model's own forward and backward with its loss at the CPU
recipe's 2 x 32^3 (`cpu_step_rate`: the same layers, norms and activations in the
same mix, compiled in about 5 s), times the configured steps. It still errs
short, by about 1.25x for the head and neck and mediastinum presets on a 2-core
CPU (measured 2026-12-05: 2.9 against 3.6 s/step, 5.5 against 7.4 s/step), because
a large patch runs at a lower rate than a small one; a rate from a dense 3x3x3
convolution alone, used before, erred short by 4-5x.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lnfm.models.segmenter import segmenter_from_config
from lnfm.segmentation.losses import model_output_loss
from lnfm.train.memory import cpu_host_memory, judge_host_memory, worth_compiling
from lnfm.train.mfu import forward_flops, train_flops

CPU_BUDGET_S = 3600.0  # a preset whose estimate exceeds this on the CPU is sized for an accelerator
SLOW_CPU_FLOPS = 1e9  # below any CPU's rate on a finetuning step (2 cores: about 45 GFLOP/s for ViT-tiny + fine
# at 2 x 32^3): runs that fit the budget at this rate fit it anywhere and skip the measurement
CPU_PRESET = "--quick"  # applies QUICK below

# `--quick`: the CPU recipe (32^3 patches, 8-12 minutes on 2 cores) with the fine head, whose strided
# convolutions are matmuls and whose full-resolution level has 8 channels, so a CPU step costs about
# what a MONAI U-Net's does (docs/results/fewshot_peer.md). The site's freezing strategy is kept.
# 2800 steps is the 10-minute point: on 5 dev seeds it beat 600 steps held-out (+0.037, p = 0.033) and
# in-domain (+0.054, p = 0.013) (docs/results/README.md). `make demo` passes its own, shorter, step count.
# The parameters' moving average (decay 0.998) is what is validated, kept and exported: +0.011 in-domain
# (p = 0.003) over 5 dev seeds, no loss held-out, under a rule written before the run (docs/results/README.md).
QUICK = ["site.patch=[32,32,32]", "train.steps=2800", "train.global_batch=2", "train.eval_every=400",
         "train.log_every=50", "checkpoint.every=400", "optim.warmup_steps=20", "optim.lr=2e-3",
         "optim.ema_decay=0.998", "head.kind=fine", "inference.overlap=0.25",
         "model.img_size=[32,32,32]", "model.patch_size=[8,8,8]"]


PROBE_PATCH = (32, 32, 32)  # the CPU recipe's patch and batch: small enough to compile in seconds
PROBE_BATCH = 2


def probe_config(cfg):
    """`cfg` at the probe's patch and batch (the model's img_size with it, as the CPU recipe sets)."""
    return dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, patch=PROBE_PATCH),
                               model=dataclasses.replace(cfg.model, img_size=PROBE_PATCH),
                               train=dataclasses.replace(cfg.train, global_batch=PROBE_BATCH))


_PROBES: dict[str, tuple] = {}  # one compile per segmenter and loss in a process: the memory check and the notice


def _probe_grad(cfg):
    """(the compiled gradient of `cfg`'s segmenter and loss at the probe's patch and batch, its parameters)."""
    probe = probe_config(cfg)
    key = repr((probe.model, probe.head, probe.loss, probe.site.labels))
    if key not in _PROBES:
        _PROBES[key] = _compile_probe(probe)
    return _PROBES[key]


def _compile_probe(probe):
    model = segmenter_from_config(probe.model, probe.head, len(probe.site.labels), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.full((PROBE_BATCH, *PROBE_PATCH, probe.model.in_channels), 0.5, jnp.float32)
    y = (jnp.arange(math.prod(PROBE_PATCH)).reshape(PROBE_PATCH) % 7 == 0).astype(jnp.int32)
    y = jnp.broadcast_to(y, (PROBE_BATCH, *PROBE_PATCH))
    grad = jax.jit(jax.grad(lambda p: model_output_loss(probe.loss, nnx.merge(graphdef, p, rest)(x), y)))
    return grad.lower(params).compile(), params


def cpu_step_rate(cfg) -> float:
    """FLOP/s this machine reaches on `cfg`'s own segmenter and loss, forward and backward (the
    gradient of every parameter), at the probe's patch and batch: best of 3, compilation excluded."""
    grad, params = _probe_grad(cfg)
    jax.block_until_ready(grad(params))
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(grad(params))
        best = min(best, time.perf_counter() - t)
    return step_flops(probe_config(cfg)) / best


def step_flops(cfg) -> float | None:
    """Model FLOPs of one finetuning step (global batch, site patch) from the segmenter's lowered forward."""
    model = nnx.eval_shape(lambda: segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((cfg.train.global_batch, *cfg.site.patch, cfg.model.in_channels), jnp.float32)
    return train_flops(forward_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x))


def _recipe() -> dict[str, str]:
    return dict(o.split("=", 1) for o in QUICK)


def _recipe_summary() -> str:
    q = _recipe()
    edge = json.loads(q["site.patch"])[0]
    return f"{edge}^3 patches, the {q['head.kind']} head, {q['train.steps']} steps"


def is_cpu_recipe(cfg) -> bool:
    """Whether `cfg` has the CPU recipe's patch and head and its batch or a smaller one: the notice has
    nothing lighter to suggest then, however slow this CPU."""
    quick = _recipe()
    return (list(cfg.site.patch) == json.loads(quick["site.patch"]) and cfg.head.kind == quick["head.kind"]
            and cfg.train.global_batch <= int(quick["train.global_batch"]))


def cpu_notice(cfg, rate: float | None = None) -> str | None:
    """The notice when `cfg` would take longer than CPU_BUDGET_S on this CPU; None when it fits or
    an accelerator is present."""
    if jax.default_backend() != "cpu" or is_cpu_recipe(cfg):
        return None
    flops = step_flops(cfg)
    if not flops or flops * cfg.train.steps / SLOW_CPU_FLOPS <= CPU_BUDGET_S:
        return None
    per_step = flops / (rate or cpu_step_rate(cfg))
    total = per_step * cfg.train.steps
    if total <= CPU_BUDGET_S:
        return None
    return (f"no accelerator: the {cfg.site.name} preset ({cfg.head.kind} head, "
            f"{'x'.join(map(str, cfg.site.patch))} patch, batch {cfg.train.global_batch}, {cfg.train.steps} steps) "
            f"is sized for a GPU; planner estimate on this CPU: {per_step:.0f} s/step, {total / 3600:.1f} h in all. "
            f"Use the CPU preset instead: add {CPU_PRESET} ({_recipe_summary()})")


# Host memory on a CPU backend (lnfm.train.memory): a step that cannot fit is refused before the workdir is written.


def batch_bytes(cfg, processes: int = 1) -> tuple[int, int]:
    """(one host batch's bytes, the loader's and the step's copies of it in all): float32 image channels plus
    int32 labels per voxel; the loader buffers `prefetch` batches per worker (or in this process), one
    more is being assembled and one is on the device."""
    one = cfg.train.global_batch // processes * math.prod(cfg.site.patch) * 4 * (cfg.model.in_channels + 1)
    return one, one * (cfg.loader.prefetch * max(1, cfg.loader.workers) + 2)


def step_bytes(cfg, processes: int = 1) -> dict[str, int]:
    """This host's memory for one training step of `cfg`: XLA's temporaries (activations and workspace)
    of the probe's gradient, per voxel of a patch, times the micro-batch's voxels; the batches; the
    parameters with the optimizer's moments, gradients and moving average (5 copies)."""
    grad, params = _probe_grad(cfg)
    per_voxel = grad.memory_analysis().temp_size_in_bytes / (PROBE_BATCH * math.prod(PROBE_PATCH))
    micro = cfg.train.global_batch // processes // max(1, cfg.train.accum_steps)
    state = 5 * 4 * sum(x.size for x in jax.tree.leaves(params))
    return {"activations": int(per_voxel * micro * math.prod(cfg.site.patch)),
            "batches": batch_bytes(cfg, processes)[1], "state": state}


def check_memory(cfg, memory: tuple[int, int] | None = None) -> None:
    """Refuse, in one line, a CPU finetune whose step needs more memory than this host has; warn when it
    needs more than is free now. The probe (5-25 s to compile) only runs for a step that could need half
    the free memory at the heaviest segmenter's figure; its batches are always counted."""
    if (memory := cpu_host_memory(memory)) is None:
        return
    processes = jax.process_count()
    need = {"batches": batch_bytes(cfg, processes)[1]}
    micro_voxels = cfg.train.global_batch // processes // max(1, cfg.train.accum_steps) * math.prod(cfg.site.patch)
    if worth_compiling(need["batches"], micro_voxels, memory):
        need = step_bytes(cfg, processes)
    what = f"train.global_batch={cfg.train.global_batch} of {'x'.join(map(str, cfg.site.patch))} patches"
    split = need.get("activations", 0) > need["batches"]  # accumulation splits the activations, not the batch
    judge_host_memory(need, memory, what, "lower train.global_batch or site.patch"
                      + (", or raise train.accum_steps" if split else ""))
