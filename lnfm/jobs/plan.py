"""Scale planner: compile the real pretraining step ahead of time for a device mesh, without running it.

    python launch/plan.py --model vit_h --patch 160 --global-batch 1024 --mesh fsdp=256 --device h100

The pretraining job's own builder, `lnfm.jobs.pretrain.build_training(cfg, mesh,
abstract=True)` (same model, sharding rules, optimizer, loss and train step), gives the
state as abstract arrays (`jax.ShapeDtypeStruct` with shardings), which are lowered and
compiled by XLA for a mesh of virtual CPU devices, so nothing is allocated. Reported per device:
- memory: XLA's `memory_analysis()` of the compiled step (arguments, outputs,
  temporaries = activations and workspace, generated code) and the exact split of
  the arguments into parameters and optimizer state from their shardings;
- FLOPs per step: model FLOPs (3 x the SSL forward, `lnfm.jobs.pretrain.step_flops`)
  and XLA's cost analysis of the compiled per-device program (includes remat);
- expected step time = model FLOPs / (devices x peak bf16 FLOP/s x assumed MFU),
  with peaks from `lnfm.train.mfu` and the assumed MFU stated.

Both the compiled and the analytic plan start from `checked_config`: the pretraining job's own
config and batch checks, so a request the job would refuse is one line (exit 2), not a traceback
or a figure of nothing. `--table` writes a markdown table whose first line marks it as plan's, so
that it never replaces a file of the user's (and `--force` replaces only its own, unchanged).

XLA's CPU backend plans memory differently from GPU/TPU backends (fusion, layouts),
so treat the figures as estimates of the accelerator's (typically within tens of
percent); parameter and optimizer bytes are exact. The process must see exactly
mesh-size devices: `main` runs itself in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lnfm.config import ConfigError, override_key_list, parse_args_once
from lnfm.data.loader import check_loader
from lnfm.jobs.pretrain import (PretrainConfig, abstract_batch, build_training, check_token_grid,
                                load_pretrain_config, step_flops)
from lnfm.models.build import build_ssl_model
from lnfm.models.mae import decoder_dims, num_visible
from lnfm.models.sharding import idle_axes, logical_shards, make_mesh, rules_using, use_rules
from lnfm.models.vit import token_grid, vit_dims
from lnfm.runs import model_folder_around
from lnfm.safety import check_apart
from lnfm.train.job import check_batch, check_run_config
from lnfm.train.memory import memory_figures
from lnfm.train.mfu import ASSUMED_MFU, expected_step_time, peak_flops
from lnfm.workdir import atomic_write_text, temp_file

GIB = 1024**3

# Per-device HBM (GiB) and bandwidth (TB/s) by accelerator, plus the jax device_kind
# string that lnfm.train.mfu matches for the peak FLOP/s.
DEVICES: dict[str, dict[str, Any]] = {
    "h100": {"kind": "NVIDIA H100 80GB HBM3", "hbm_gib": 80, "hbm_tbps": 3.35},
    "h200": {"kind": "NVIDIA H200", "hbm_gib": 141, "hbm_tbps": 4.8},
    "a100": {"kind": "NVIDIA A100-SXM4-80GB", "hbm_gib": 80, "hbm_tbps": 2.04},
    "v4": {"kind": "TPU v4", "hbm_gib": 32, "hbm_tbps": 1.2},
    "v5e": {"kind": "TPU v5 lite", "hbm_gib": 16, "hbm_tbps": 0.82},
    "v5p": {"kind": "TPU v5p", "hbm_gib": 95, "hbm_tbps": 2.76},
    "v6e": {"kind": "TPU v6 lite", "hbm_gib": 32, "hbm_tbps": 1.64},
}
USABLE_FRACTION = 0.9  # share of HBM a job can count on (runtime, allocator and fragmentation keep the rest)
DEFAULT_MFU = ASSUMED_MFU  # assumed model FLOPs utilisation for the step-time estimate


@dataclasses.dataclass
class PlanRequest:
    model: str = "vit_b"  # pretraining preset (lnfm/configs/pretrain) or YAML path
    patch: int = 96  # cubic training crop side in voxels (model.img_size)
    global_batch: int = 256  # volumes per optimizer step
    mesh: dict = dataclasses.field(default_factory=lambda: {"fsdp": 8})  # mesh axis sizes (data, fsdp, tensor)
    rules: str | None = None  # sharding rules (dp, fsdp, fsdp_tp); default: dp when fsdp=tensor=1, else the preset's
    device: str = "h100"  # accelerator for fit and step time (see DEVICES)
    remat: str | None = None  # rematerialisation policy override (none, full, ...)
    dtype: str | None = None  # compute dtype override (float32, bfloat16)
    accum_steps: int | None = None  # gradient-accumulation microbatches override
    assumed_mfu: float = DEFAULT_MFU  # MFU assumed for the step-time estimate
    overrides: tuple[str, ...] = ()  # extra pretraining config overrides key=value

    def num_devices(self) -> int:
        return math.prod(int(v) for v in self.mesh.values())


def parse_mesh(text: str) -> dict:
    """'fsdp=64,data=4' -> {'fsdp': 64, 'data': 4}, with a one-line error for anything else."""
    mesh = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("data", "fsdp", "tensor") or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh: '{part}' is not data=N, fsdp=N or tensor=N")
        if key in mesh:  # a dict would keep the last size without a word
            raise ConfigError(f"--mesh {text}: the axis '{key}' is given twice; give each axis once")
        mesh[key] = int(value)
    if not mesh:
        raise ConfigError("--mesh is empty (e.g. fsdp=8 or data=4,fsdp=2)")
    return mesh


def option_keys(req: PlanRequest) -> dict[str, str]:
    """Config key -> the option (with its value) that sets it in this request: the crop, batch and mesh
    always, the others when given."""
    mesh = ",".join(f"{k}={v}" for k, v in req.mesh.items())
    keys = {"model.img_size": f"--patch {req.patch}", "train.global_batch": f"--global-batch {req.global_batch}",
            "mesh.data": f"--mesh {mesh}", "mesh.fsdp": f"--mesh {mesh}", "mesh.tensor": f"--mesh {mesh}"}
    for key, flag, value in (("mesh.rules", "--rules", req.rules), ("model.remat", "--remat", req.remat),
                             ("model.dtype", "--dtype", req.dtype), ("train.accum_steps", "--accum-steps",
                                                                     req.accum_steps)):
        if value is not None:
            keys[key] = f"{flag} {value}"
    return keys


def check_overrides(req: PlanRequest) -> None:
    """Refuse an override of a key an option sets (or of its whole section): one of the two would be
    ignored, and the report would describe the other."""
    keys = option_keys(req)
    for text in req.overrides:
        for key in override_key_list([text]):  # `mesh={rules: dp}` sets mesh.rules alone
            for set_key, option in keys.items():
                if key == set_key or set_key.startswith(key + "."):
                    flag = option.split()[0]
                    raise ConfigError(f"override {text}: {option} sets {set_key}; give it with {flag} only")


def pretrain_config(req: PlanRequest) -> PretrainConfig:
    """The pretraining config the job would run with these planner settings (unchecked: see `checked_config`)."""
    check_overrides(req)
    sets = [f"model.img_size={req.patch},{req.patch},{req.patch}", f"train.global_batch={req.global_batch}",
            f"mesh.data={req.mesh.get('data', 1)}", f"mesh.fsdp={req.mesh.get('fsdp', 1)}",
            f"mesh.tensor={req.mesh.get('tensor', 1)}"]
    rules = req.rules or ("dp" if req.mesh.get("fsdp", 1) == 1 and req.mesh.get("tensor", 1) == 1 else None)
    if rules:
        sets.append(f"mesh.rules={rules}")
    if req.remat is not None:
        sets.append(f"model.remat={req.remat}")
    if req.dtype is not None:
        sets.append(f"model.dtype={req.dtype}")
    if req.accum_steps is not None:  # 0 is a value to refuse, not "no override"
        sets.append(f"train.accum_steps={req.accum_steps}")
    return load_pretrain_config(req.model, [*sets, *req.overrides])


def _name_options(e: ConfigError, keys: dict[str, str]) -> ConfigError:
    """`e` prefixed by the options that set the keys it names ('--accum-steps 0: train.accum_steps must be
    ...'): the user gave the option, not the key."""
    msg = str(e)
    found = sorted((m.start(), option) for key, option in keys.items()
                   if (m := re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", msg)))
    options = list(dict.fromkeys(option for _, option in found))
    return ConfigError(f"{', '.join(options)}: {msg}") if options else e


def checked_config(req: PlanRequest, compiles: bool) -> PretrainConfig:
    """The pretraining config of this request, refused in one line where the pretraining job would refuse
    it (its own config and batch checks) or where the figures would mean nothing. The compiled and the
    analytic plan both start here, so both refuse the same requests; `compiles` adds only that XLA:CPU,
    which compiles the plan, has no float16 matmul."""
    if req.device not in DEVICES:
        raise ConfigError(f"--device: unknown device '{req.device}' (choices: {', '.join(DEVICES)})")
    mfu = req.assumed_mfu
    if not (math.isfinite(mfu) and 0 < mfu <= 1):  # NaN fails too
        raise ConfigError(f"--assumed-mfu must be in (0, 1] (the share of the devices' peak FLOP/s the step "
                          f"reaches), got {mfu:g}")
    check_overrides(req)  # here, not in the try below: its message names the option and the key already
    keys = option_keys(req)
    try:
        cfg = pretrain_config(req)
        # The job runs on req.device, not on this host: the host's dtype check applies only where this
        # host compiles (below), so check_run_config sees a dtype every backend runs.
        check_run_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32")))
        check_loader(cfg.data, "data")
        check_batch(cfg.train.global_batch, cfg.train.accum_steps, 1, cfg.mesh.data * cfg.mesh.fsdp)
        check_token_grid(cfg.model)
    except ConfigError as e:
        raise _name_options(e, keys) from None
    if compiles and cfg.model.dtype == "float16":
        where = keys.get("model.dtype", "model.dtype=float16")
        raise ConfigError(f"{where}: the compiled plan runs on XLA:CPU, which has no float16 matmul; plan it "
                          f"with --analytic, or use bfloat16")
    return cfg


def working_devices(mesh: dict[str, int], rules: str) -> tuple[int, list[str]]:
    """(devices that split the step's work, the mesh axes of size > 1 that split nothing) under this rule
    table: an axis no rule names holds copies of the same shards, so it divides neither time nor memory."""
    idle = idle_axes(mesh, rules)
    return math.prod(size for axis, size in mesh.items() if axis not in idle), idle


def idle_axes_warning(mesh: dict[str, int], rules: str) -> list[str]:
    """One warning line naming the mesh axes the rules never shard over (none when every axis is used)."""
    working, idle = working_devices(mesh, rules)
    if not idle:
        return []
    names = ", ".join(f"'{axis}' ({mesh[axis]} devices)" for axis in idle)
    using = rules_using(idle)
    hint = f"; --rules {' or '.join(using)} shards over it" if using else ""
    return [f"mesh axis {names} is not used by the rules '{rules}': nothing is sharded over it, so its devices "
            f"repeat the same work and split no memory; the step time counts {working} of the "
            f"{math.prod(mesh.values())} devices{hint}"]


def per_device_bytes(tree) -> int:
    """Bytes one device holds for a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def plan(req: PlanRequest) -> dict:
    """Compile the step for `req` on this process's devices and return every figure (JSON-ready)."""
    cfg = checked_config(req, compiles=True)
    n = req.num_devices()
    if jax.device_count() != n:
        raise ConfigError(f"the mesh needs {n} devices but this process sees {jax.device_count()}")
    mesh = make_mesh(cfg.mesh)
    # The job's own builder over abstract arrays, outside use_rules as the job calls it.
    graphdef, state, _, step_fn = build_training(cfg, mesh, abstract=True)
    with use_rules(mesh, cfg.mesh.rules):
        compiled = step_fn.lower(state, abstract_batch(cfg, mesh)).compile()
    mem = memory_figures(compiled)
    model_flops = step_flops(cfg, graphdef, state)
    dev = DEVICES[req.device]
    peak = peak_flops(dev["kind"])
    working, _ = working_devices(dict(mesh.shape), cfg.mesh.rules)
    step_time = expected_step_time(model_flops, dev["kind"], working, req.assumed_mfu)
    usable = dev["hbm_gib"] * GIB * USABLE_FRACTION
    params_b, opt_b = per_device_bytes(state["params"]), per_device_bytes(state["opt_state"])
    out = {
        "model": req.model, "arch": cfg.model.arch, "size": cfg.model.size, "patch": req.patch,
        "global_batch": cfg.train.global_batch, "accum_steps": cfg.train.accum_steps,
        "mesh": dict(mesh.shape), "rules": cfg.mesh.rules, "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "devices": n, "device": req.device, "hbm_gib": dev["hbm_gib"],
        "params": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
        "memory": {**mem, "params": params_b, "opt_state": opt_b,
                   "other_args": mem["argument"] - params_b - opt_b},
        "model_flops_per_step": model_flops, "xla_flops_per_device": _cost_flops(compiled),
        "peak_flops": peak, "assumed_mfu": req.assumed_mfu, "step_time_s": step_time, "working_devices": working,
        "warnings": idle_axes_warning(dict(mesh.shape), cfg.mesh.rules),
        "usable_bytes": usable, "fits": mem["peak"] <= usable, "source": "compiled",
    }
    out["advice"] = advice(out)
    return out


def _act_bytes_per_token_layer(width: int, heads: int, seq: int, remat: str) -> tuple[dict, dict]:
    """(kept per layer, working set of one layer) in 16-bit activation bytes per token, by the logical axis
    that shards each part (the rule table then says over which mesh axes: `analytic_plan`).

    After Korthikanti et al. 2022 (Reducing Activation Recomputation in Large Transformer
    Models): a block keeps about 34 h + 5 a s bytes per token without recomputation: 10 h of
    residual-stream width (act_embed: layer-norm inputs, residual, dropout masks), 8 h of q, k, v and
    the attention output plus the 5 a s of scores, all split by head (act_heads), and 16 h of MLP hidden
    (fc1's output axis, 'mlp'); their 10 h + 24 h / t + 5 a s / t under t-way tensor parallelism. With
    full remat only its 2 h-byte input is kept and one block's set is rebuilt at a time;
    dots_saveable keeps the matmul outputs (about 24 h + 4 a s: qkv, attention and fc1 outputs split).
    """
    full = {"act_embed": 10 * width, "act_heads": 8 * width + 5 * heads * seq, "mlp": 16 * width}
    dots = {"act_embed": 8 * width, "act_heads": 8 * width + 4 * heads * seq, "mlp": 8 * width}
    kept = {"none": full, "full": {"act_embed": 2 * width}, "dots_saveable": dots,
            "dots_with_no_batch_dims_saveable": dots}.get(remat, full)
    return kept, full


def analytic_plan(req: PlanRequest) -> dict:
    """The same figures from closed-form estimates, for meshes too large to compile here.

    Parameter and optimizer bytes are exact (abstract model + sharding rules, shard
    shapes rounded up as XLA pads them); activations follow `_act_bytes_per_token_layer`
    for the MAE encoder (visible tokens) and decoder (all tokens), plus float32 gradients
    and updates the size of the local parameter shard.
    """
    cfg = checked_config(req, compiles=False)
    if cfg.model.arch != "vit":
        raise ConfigError(f"--model {req.model}: the analytic model covers ViT MAE only, not {cfg.model.arch}")
    n = req.num_devices()
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    model = nnx.eval_shape(lambda: build_ssl_model(cfg.model, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)

    def local_bytes(x, spec) -> int:
        shape = [-(-d // logical_shards(name, sizes, cfg.mesh.rules)) if name else d for d, name in zip(x.shape, spec)]
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    leaves = jax.tree.leaves(params)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params_b = sum(local_bytes(x, s) for x, s in zip(leaves, spec_leaves))
    opt_b = 2 * params_b  # Adam first and second moments, float32, sharded like the parameters
    shards = sizes["data"] * sizes["fsdp"]
    local_batch = cfg.train.global_batch // shards // cfg.train.accum_steps
    tokens = math.prod(token_grid(cfg.model.img_size, cfg.model.patch_size))
    visible = num_visible(tokens, cfg.model.mask_ratio)
    enc = vit_dims(cfg.model)
    dec_w, dec_d, dec_h, _ = decoder_dims(cfg.model)
    scale = 1.0 if cfg.model.dtype in ("bfloat16", "float16") else 2.0

    def local(terms: dict) -> float:  # each part divided as the rule table splits its logical axis
        return sum(v / logical_shards(name, sizes, cfg.mesh.rules) for name, v in terms.items())

    act = 0.0
    for width, depth, heads, seq in ((enc.width, enc.depth, enc.heads, visible), (dec_w, dec_d, dec_h, tokens)):
        kept, full = map(local, _act_bytes_per_token_layer(width, heads, seq, cfg.model.remat))
        act += local_batch * seq * (kept * depth + (full if cfg.model.remat != "none" else 0)) * scale
    temp = act + 2 * params_b  # float32 gradients and updates of the local shard
    batch_b = local_batch * cfg.train.accum_steps * math.prod(cfg.model.img_size) * cfg.model.in_channels * 4
    n_params = sum(x.size for x in leaves)
    # 6 N flops per token through the encoder (visible) and decoder (all), the usual dense estimate.
    dec_params = 12 * dec_w * dec_w * dec_d
    model_flops = 6.0 * cfg.train.global_batch * ((n_params - dec_params) * visible + dec_params * tokens)
    dev = DEVICES[req.device]
    peak = peak_flops(dev["kind"])
    mem = {"argument": params_b + opt_b + batch_b, "output": 0, "alias": 0, "temp": int(temp), "generated_code": 0,
           "params": params_b, "opt_state": opt_b, "other_args": batch_b}
    mem["peak"] = mem["argument"] + mem["temp"]
    usable = dev["hbm_gib"] * GIB * USABLE_FRACTION
    working, _ = working_devices(sizes, cfg.mesh.rules)
    out = {
        "model": req.model, "arch": cfg.model.arch, "size": cfg.model.size, "patch": req.patch,
        "global_batch": cfg.train.global_batch, "accum_steps": cfg.train.accum_steps, "mesh": sizes,
        "rules": cfg.mesh.rules, "remat": cfg.model.remat, "dtype": cfg.model.dtype, "devices": n,
        "device": req.device, "hbm_gib": dev["hbm_gib"], "params": int(n_params), "memory": mem,
        "model_flops_per_step": model_flops, "xla_flops_per_device": None, "peak_flops": peak,
        "assumed_mfu": req.assumed_mfu, "working_devices": working,
        "step_time_s": expected_step_time(model_flops, dev["kind"], working, req.assumed_mfu),
        "warnings": idle_axes_warning(sizes, cfg.mesh.rules),
        "usable_bytes": usable, "fits": mem["peak"] <= usable, "source": "analytic",
    }
    out["advice"] = advice(out)
    return out


def advice(p: dict) -> list[str]:
    """What would make a configuration that does not fit fit (empty when it fits)."""
    if p["fits"]:
        return []
    mem, usable, tips = p["memory"], p["usable_bytes"], []
    state_b = mem["params"] + mem["opt_state"]
    fsdp = p["mesh"].get("fsdp", 1)
    if fsdp < p["devices"] and state_b > 0.25 * usable:
        tips.append(f"shard parameters and optimizer state: --mesh fsdp={p['devices']} "
                    f"(state {state_b / GIB:.1f} GiB -> about {state_b * fsdp / p['devices'] / GIB:.2f} GiB "
                    f"per device)")
    if p["remat"] in ("none", None):
        tips.append("rematerialise each block: --remat full (activations shrink to about one block's worth)")
    room = usable - (mem["peak"] - mem["temp"])
    if room > 0 and mem["temp"] > room:
        k = 2 ** math.ceil(math.log2(mem["temp"] / room))
        tips.append(f"split the step into microbatches: train.accum_steps={k} (same global batch)")
    if room <= 0:
        tips.append("the state alone exceeds the device: more devices in fsdp, or a larger-memory device")
    return tips


def fmt_gib(b: float | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 10 else f"{b / 1024**2:.2f} MiB"


def report(p: dict) -> str:
    """Human-readable summary of one plan."""
    m = p["memory"]
    lines = [
        f"{p['model']} ({p['arch']}-{p['size']}, {p['params'] / 1e6:.1f}M trainable params), crop {p['patch']}^3, "
        f"global batch {p['global_batch']} (accum {p['accum_steps']}), remat {p['remat']}, compute {p['dtype']}",
        f"mesh {p['mesh']} ({p['devices']} devices), rules '{p['rules']}', on {p['device']} "
        f"({p['hbm_gib']} GiB HBM, {USABLE_FRACTION:.0%} usable)",
        *(f"warning: {w}" for w in p["warnings"]),
        "per-device memory (" + ("XLA memory analysis of the compiled step" if p["source"] == "compiled"
                                 else "analytic estimate, no compile") + "):",
        f"  parameters        {fmt_gib(m['params'])}",
        f"  optimizer state   {fmt_gib(m['opt_state'])}",
        f"  batch + other     {fmt_gib(m['other_args'])}",
        f"  activations/temp  {fmt_gib(m['temp'])}",
        f"  outputs (not aliased) {fmt_gib(m['output'] - m['alias'])}, generated code {fmt_gib(m['generated_code'])}",
        f"  peak estimate     {fmt_gib(m['peak'])}  -> {'fits' if p['fits'] else 'DOES NOT FIT'}",
    ]
    mf, xf = p["model_flops_per_step"], p["xla_flops_per_device"]
    lines.append(f"FLOPs per step: model {mf:.3e} (3 x forward); XLA per device {xf:.3e} "
                 f"(x{p['devices']} = {xf * p['devices']:.3e}, includes remat)" if mf and xf
                 else f"FLOPs per step: model {mf:.3e} (analytic 6 x params x tokens); XLA per device n/a"
                 if mf else "FLOPs per step: n/a")
    if p["step_time_s"]:
        lines.append(f"expected step time {p['step_time_s'] * 1e3:.2f} ms = model FLOPs / ({p['working_devices']} x "
                     f"{p['peak_flops'] / 1e12:.0f} TFLOP/s peak x assumed MFU {p['assumed_mfu']:.0%}); "
                     f"{p['global_batch'] / p['step_time_s']:.1f} volumes/s")
    for tip in p["advice"]:
        lines.append(f"to fit: {tip}")
    return "\n".join(lines)


TABLE_MODELS = ("vit_b", "vit_l", "vit_h")
TABLE_PATCHES = (96, 160)
TABLE_DEVICES = (8, 64, 256)
TABLE_BATCH_PER_DEVICE = 4


def _compiled_cell(req: PlanRequest, timeout_s: float) -> dict | None:
    """Plan one cell in a fresh interpreter with the right device count; None on timeout or failure."""
    cmd = [sys.executable, "-m", "lnfm", "plan", "--model", req.model, "--patch", str(req.patch),
           "--global-batch", str(req.global_batch), "--mesh", ",".join(f"{k}={v}" for k, v in req.mesh.items()),
           "--device", req.device, "--json"]
    try:
        res = subprocess.run(cmd, env=device_env(req.num_devices()), capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(res.stdout) if res.returncode == 0 else None


def table(compile_max_devices: int, compile_models: tuple[str, ...], timeout_s: float,
          device: str = "h100") -> tuple[str, list[dict]]:
    """Markdown table of per-device memory for ViT-B/L/H MAE under DP and FSDP; compiled where asked."""
    rows, cells = [], []
    head = ("| model | crop | devices | global batch | strategy | remat | params+opt / device | "
            "activations (temp) / device | peak / device | fits h100 (80 GiB) | fits v5e (16 GiB) | source |")
    rows += [head, "|" + "---|" * 12]
    for model in TABLE_MODELS:
        for patch in TABLE_PATCHES:
            for n in TABLE_DEVICES:
                for strategy in ("dp", "fsdp"):
                    mesh = {"data": n} if strategy == "dp" else {"fsdp": n}
                    req = PlanRequest(model=model, patch=patch, global_batch=TABLE_BATCH_PER_DEVICE * n,
                                      mesh=mesh, device=device)
                    p = None
                    if n <= compile_max_devices and model in compile_models:
                        p = _compiled_cell(req, timeout_s)
                    if p is None:
                        p = analytic_plan(req)
                    cells.append(p)
                    m = p["memory"]
                    fits = {d: m["peak"] <= DEVICES[d]["hbm_gib"] * GIB * USABLE_FRACTION for d in ("h100", "v5e")}
                    rows.append(f"| {model} | {patch}^3 | {n} | {p['global_batch']} | {strategy} | {p['remat']} | "
                                f"{fmt_gib(m['params'] + m['opt_state'])} | {fmt_gib(m['temp'])} | "
                                f"{fmt_gib(m['peak'])} | {'yes' if fits['h100'] else 'NO'} | "
                                f"{'yes' if fits['v5e'] else 'NO'} | {p['source']} |")
    return "\n".join(rows) + "\n", cells


# The table's first line: an HTML comment (invisible where the markdown is shown) by which plan knows
# the files it wrote, with digests of the table below it and of the JSON beside it, so that --force
# replaces them only while unchanged, and never a user's file of the same name.
TABLE_MARK = "<!-- written by lnfm plan --table"
_MARK_LINE = re.compile(re.escape(TABLE_MARK) + r" \(replaced by --force while unchanged\) "
                        r"sha256:([0-9a-f]{16}) json-sha256:([0-9a-f]{16}) -->")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_files(path: str | Path) -> tuple[Path, Path]:
    """The markdown table and the JSON of its cells beside it."""
    return Path(path), Path(f"{path}.json")


def table_text(text: str, cells_json: str) -> str:
    """The markdown file plan writes: its mark line, then the table."""
    return (f"{TABLE_MARK} (replaced by --force while unchanged) sha256:{_digest(text)} "
            f"json-sha256:{_digest(cells_json)} -->\n{text}")


def own_table_json_digest(path: str | Path) -> str | None:
    """The digest the mark records for the JSON beside `path` when `path` is a table plan wrote and
    nobody changed since; None for anything else (a user's file, an edited table, a link, a folder)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with path.open("rb") as f:  # bytes: no newline translation under the digest
            match = _MARK_LINE.fullmatch(f.readline(512).decode("utf-8").removesuffix("\n"))
            rest = f.read().decode("utf-8") if match else ""  # a user's large file is not read past its first line
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(2) if match and match.group(1) == _digest(rest) else None


def check_table_paths(path: str | Path, force: bool) -> None:
    """Refuse, before the table is computed (minutes) and again before it is written, a --table file or
    its .json that plan did not write (or that was changed since), one that plan wrote without --force,
    a folder, or a path below a file."""
    md, js = table_files(path)
    check_apart({"--table": md}, {})  # a broken link on the way: one line now, not a traceback after the table
    owner = model_folder_around(md)
    if owner is not None:  # a file there breaks an export's checksums or mixes into a run
        raise ConfigError(f"--table {md}: {owner}, which plan does not own; choose a file outside it")
    if md.is_dir():
        raise ConfigError(f"--table {md}: is a folder; name the markdown file to write")
    for parent in md.parents:  # the nearest existing ancestor must be a folder (the missing ones are made)
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--table {md}: {parent} is a file, not a folder")
            break
    own_json = None
    if md.exists() or md.is_symlink():
        own_json = own_table_json_digest(md)
        if own_json is None:
            raise ConfigError(f"--table {md}: exists and is not a table lnfm plan wrote (or was changed since); "
                              f"choose another file")
        if not force:
            raise ConfigError(f"--table {md}: exists (a table lnfm plan wrote); pass --force to replace it")
    if js.exists() or js.is_symlink():
        try:
            same = own_json is not None and not js.is_symlink() and js.is_file() and \
                _digest(js.read_bytes().decode("utf-8")) == own_json
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            raise ConfigError(f"--table {md}: {js} exists and is not the JSON lnfm plan wrote beside that table "
                              f"(or was changed since); choose another --table file")


def write_table(path: str | Path, text: str, cells: list[dict]) -> None:
    """The marked table and its cells' JSON. Both are written in full (the JSON to a temporary sibling)
    before either replaces a file, so a full disk leaves the earlier pair as it was: a new table beside
    the old JSON would make that JSON look like the user's at the next --force."""
    md, js = table_files(path)
    cells_json = json.dumps(cells, indent=1)
    md.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(js) as tmp:
        tmp.write_text(cells_json)
        atomic_write_text(md, table_text(text, cells_json))
        os.replace(tmp, js)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _parser()
    args = parse_args_once(ap, argv)
    check_option_use(ap, args)
    return args


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Compile the pretraining step for a device mesh and report "
                                             "per-device memory, FLOPs and expected step time.")
    ap.add_argument("--model", default="vit_b", help="pretraining preset (vit_tiny, vit_b, vit_l, vit_h) or YAML")
    ap.add_argument("--patch", type=int, default=96, help="cubic crop side in voxels")
    ap.add_argument("--global-batch", type=int, default=256, help="volumes per optimizer step")
    ap.add_argument("--mesh", default="fsdp=8", help="mesh axis sizes, e.g. fsdp=256 or data=32,fsdp=8")
    ap.add_argument("--rules", default=None, help="sharding rules: dp, fsdp, fsdp_tp (default: dp without fsdp)")
    ap.add_argument("--device", default="h100", choices=sorted(DEVICES), help="accelerator to plan for")
    ap.add_argument("--remat", default=None, help="rematerialisation: none, full, dots_saveable, ...")
    ap.add_argument("--dtype", default=None, help="compute dtype: float32 or bfloat16")
    ap.add_argument("--accum-steps", type=int, default=None, help="gradient-accumulation microbatches")
    ap.add_argument("--assumed-mfu", type=float, default=DEFAULT_MFU, help="MFU assumed for the step time, in (0, 1]")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of text")
    ap.add_argument("--analytic", action="store_true", help="closed-form estimate only, no compile (any mesh size)")
    ap.add_argument("--table", default=None, help="write the ViT-B/L/H scaling table (markdown) to this file "
                                                  "and its figures to FILE.json")
    ap.add_argument("--force", action="store_true", help="--table: replace a table (and its .json) plan wrote")
    ap.add_argument("--compile-max-devices", type=int, default=8, help="--table: compile cells up to this many devices")
    ap.add_argument("--compile-models", default="vit_b", help="--table: comma list of presets to compile")
    ap.add_argument("--compile-timeout", type=float, default=900, help="--table: seconds per compiled cell")
    ap.add_argument("overrides", nargs="*", help="extra pretraining config overrides key.sub=value")
    return ap


# --table plans its own grid of presets, crops and meshes; these shape a single plan only, and the
# --table ones nothing else: given on the wrong side they would be ignored without a word.
SINGLE_PLAN_OPTIONS = ("model", "patch", "global_batch", "mesh", "rules", "remat", "dtype", "accum_steps",
                       "assumed_mfu", "json", "analytic")
TABLE_OPTIONS = ("force", "compile_max_devices", "compile_models", "compile_timeout")


def check_option_use(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    def given(dest: str) -> bool:
        return getattr(args, dest) != ap.get_default(dest)

    if args.table is not None:
        unread = [f"--{d.replace('_', '-')}" for d in SINGLE_PLAN_OPTIONS if given(d)]
        unread += [f"override {args.overrides[0]}"] if args.overrides else []
        if unread:
            raise ConfigError(f"{unread[0]}: --table plans its own grid of presets, crops and meshes and does not "
                              f"read it; plan one configuration without --table")
    else:
        unread = [f"--{d.replace('_', '-')}" for d in TABLE_OPTIONS if given(d)]
        if unread:
            raise ConfigError(f"{unread[0]}: only --table reads it (a single plan prints and writes no file)")
    unknown = [m for m in filter(None, args.compile_models.split(",")) if m not in TABLE_MODELS]
    if given("compile_models") and unknown:  # a misspelt preset compiled nothing, without a word
        raise ConfigError(f"--compile-models {args.compile_models}: unknown model '{unknown[0]}' (the table's "
                          f"models: {', '.join(TABLE_MODELS)})")


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest(model=args.model, patch=args.patch, global_batch=args.global_batch,
                       mesh=parse_mesh(args.mesh), rules=args.rules, device=args.device, remat=args.remat,
                       dtype=args.dtype, accum_steps=args.accum_steps, assumed_mfu=args.assumed_mfu,
                       overrides=tuple(args.overrides))


def device_env(n: int) -> dict:
    """Environment for a process that must see exactly n virtual CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={n}"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table is not None:
        check_table_paths(args.table, args.force)
        text, cells = table(args.compile_max_devices, tuple(filter(None, args.compile_models.split(","))),
                            args.compile_timeout, args.device)
        check_table_paths(args.table, args.force)  # again: the table took minutes, a file may have appeared
        write_table(args.table, text, cells)
        print(text)
        return 0
    req = request_from_args(args)
    if args.analytic:
        p = analytic_plan(req)
        print(json.dumps(p, indent=1) if args.json else report(p))
        return 0
    checked_config(req, compiles=True)  # a user error is one line here, not in the fresh interpreter's run
    env = device_env(req.num_devices())
    if os.environ.get("XLA_FLAGS") != env["XLA_FLAGS"] or os.environ.get("JAX_PLATFORMS") != "cpu":
        # XLA reads the device count from the environment once, at backend start: run in a fresh
        # interpreter (importing jax does not start the backend, so this process may have imported it).
        return subprocess.call([sys.executable, "-m", "lnfm", "plan", *argv], env=env)
    p = plan(req)
    print(json.dumps(p, indent=1) if args.json else report(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
