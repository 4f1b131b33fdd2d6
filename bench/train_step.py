"""Pretraining step benchmark: step time, volumes/s, tokens/s and MFU of the MAE train step.

    python bench/train_step.py                                  # vit_b at 96^3 and 128^3, batch 8
    python bench/train_step.py --size tiny --img 32 --patch 8 --batch 8 --steps 5 --torch   # CPU-sized

Times the jitted LNFM step (AdamW, all devices, synthetic data). With --torch (on by
default when a GPU is present) the same run also times MONAI's MaskedAutoEncoderViT
in PyTorch with the same encoder/decoder sizes, batch and AdamW, under bf16 autocast
(when --dtype bfloat16) and prints LNFM's speed-up. Results go to stdout as a table.

With --finetune SITE it times the finetuning step instead (forward, backward, AdamW)
of the site preset's segmenter (default ViT-tiny with 16^3 patches + the preset's head) at
--ft-patch, every parameter trained, against a MONAI UNet step in PyTorch (Dice + CE, AdamW) of
about the same FLOPs (--unet-channels), same batch, same threads; the arms are
interleaved for --rounds rounds of --steps steps and the medians compared:

    python bench/train_step.py --finetune pelvis --ft-patch 32 --batch 2 --steps 3 --rounds 3

With --same-net the PyTorch arm is the same network instead: the CPU preset's (`--quick`:
ViT-tiny with 8^3 patches + the fine head) segmenter rebuilt in PyTorch by
bench/torch_segmenter.py from LNFM's initial weights, trained with LNFM's step: the
site's freezing strategy (--ft-freeze site, the default: pelvis freezes the embedding and
block 1) or none, the same trainable parameters in both arms, its loss (Dice + CE through
MONAI's DiceCELoss, set up to equal LNFM's), AdamW with its betas, weight-decay mask and
layer-wise LR scales, global-norm clipping; --torch-threads (2) intra-op threads, oneDNN
as PyTorch ships it. Both arms' first-step losses (same weights, same batch) are printed
as a check that they compute the same thing; the JSON's torch_time_over_lnfm > 1 means
LNFM is faster. On a machine that other processes keep busy, PyTorch's OpenMP threads
spin while they wait and its step slows several-fold (2 s instead of 0.1 s at load 4 on
2 cores); the JSON records the load average and OMP_WAIT_POLICY (PASSIVE avoids that):

    python bench/train_step.py --finetune pelvis --same-net --ft-patch 32 --batch 2 --steps 3 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from lnfm.models.mae import decoder_dims
from lnfm.models.onednn import available as onednn_available
from lnfm.models.sharding import MeshConfig, batch_sharding, make_mesh, use_rules
from lnfm.models.vit import vit_dims
from lnfm.jobs.pretrain import build_training, load_pretrain_config, step_flops
from lnfm.train.mfu import mfu


def time_lnfm(cfg, batch: int, steps: int, warmup: int) -> tuple[float, float | None]:
    """(seconds per step, model FLOPs per step)."""
    mesh = make_mesh(cfg.mesh)
    graphdef, state, _, step_fn = build_training(cfg, mesh)
    flops = step_flops(cfg, graphdef, state)
    rng = np.random.default_rng(0)
    images = rng.random((batch, *cfg.model.img_size, cfg.model.in_channels), dtype=np.float32)
    data = {"image": jax.device_put(images, batch_sharding(mesh))}
    with use_rules(mesh, cfg.mesh.rules):
        for _ in range(warmup):
            state, metrics = step_fn(state, data)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, data)
        jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, flops


def time_monai(cfg, batch: int, steps: int, warmup: int, compile: bool = False) -> float:
    """MONAI MaskedAutoEncoderViT with the same sizes; masked-patch MSE; AdamW; bf16 autocast on GPU.

    `compile=True` runs the network under `torch.compile` (compilation happens in the warm-up steps).
    """
    import torch
    from monai.networks.nets import MaskedAutoEncoderViT

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dims = vit_dims(cfg.model)
    dw, dd, dh, dm = decoder_dims(cfg.model)
    net = MaskedAutoEncoderViT(in_channels=cfg.model.in_channels, img_size=cfg.model.img_size,
                               patch_size=cfg.model.patch_size, hidden_size=dims.width, mlp_dim=dims.mlp_dim,
                               num_layers=dims.depth, num_heads=dims.heads, masking_ratio=cfg.model.mask_ratio,
                               decoder_hidden_size=dw, decoder_mlp_dim=dm, decoder_num_layers=dd,
                               decoder_num_heads=dh, qkv_bias=cfg.model.qkv_bias,
                               # MONAI's 3D sin-cos tables need widths divisible by 6 (cost is the same)
                               pos_embed_type="sincos" if dims.width % 6 == 0 else "learnable",
                               decoder_pos_embed_type="sincos" if dw % 6 == 0 else "learnable").to(dev)
    model = torch.compile(net) if compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(cfg.optim.b1, cfg.optim.b2),
                            weight_decay=cfg.optim.weight_decay)
    x = torch.rand(batch, cfg.model.in_channels, *cfg.model.img_size, device=dev)
    p = cfg.model.patch_size
    target = x.unfold(2, p[0], p[0]).unfold(3, p[1], p[1]).unfold(4, p[2], p[2])
    target = target.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(batch, -1, math.prod(p) * cfg.model.in_channels)
    amp = cfg.model.dtype == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp):
            pred, mask = model(x)
        loss = (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.clip_norm)
        opt.step()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


@dataclasses.dataclass
class FinetuneArm:
    """LNFM's finetuning step, ready to time: `run(steps)` runs `steps` steps on one fixed batch
    and returns the last step's metrics (not synchronised beyond the step itself)."""
    run: Callable[[int], dict]
    flops: float | None  # model FLOPs per step (XLA cost analysis of the forward, x3)
    cfg: Any  # the FinetuneConfig
    model: Any  # the nnx segmenter holding the initial weights (read it before the first step)
    data: dict  # {"image": (B, X, Y, Z, 1) float32, "label": (B, X, Y, Z) int32} numpy
    trainable: set  # paths of the parameters the optimizer updates
    trainable_params: int


def lnfm_finetune_step(site: str, patch: int, batch: int, *, quick: bool = False,
                       freeze: str | None = "none", devices: int = 1) -> FinetuneArm:
    """The site preset's finetuning step (`lnfm.jobs.finetune.build_training`: its jitted step,
    AdamW, the configured loss) at a cubic `patch` and `batch`, on random data.

    quick: the CPU preset (`--quick`: ViT-tiny with 8^3 patches, the fine head) instead of the site
    preset's model (16^3 patches). freeze: a strategy.freeze override ('none': every parameter trains,
    with the site's layer-wise LR decay), None for the preset's own strategy."""
    from lnfm.jobs.finetune import build_training, load_finetune_config
    from lnfm.jobs.finetune_cpu import step_flops as finetune_step_flops
    from lnfm.train.state import merge_model

    overrides = [f"site.patch=[{patch},{patch},{patch}]", f"model.img_size=[{patch},{patch},{patch}]",
                 f"train.global_batch={batch}"]
    if freeze is not None:
        overrides.append(f"strategy.freeze={freeze}")
    cfg = load_finetune_config(site, overrides, quick=quick)
    mesh = make_mesh(MeshConfig(data=devices), devices=jax.devices()[:devices])
    training = build_training(cfg, 0, mesh)
    rng = np.random.default_rng(0)
    data = {"image": rng.standard_normal((batch, patch, patch, patch, 1)).astype(np.float32),
            "label": (rng.random((batch, patch, patch, patch)) < 0.1).astype(np.int32)}
    device_data = jax.device_put(data, batch_sharding(mesh))
    state = [training.state]
    model = merge_model(training.graphdef, training.state["params"], training.state["frozen"],
                        training.state["rest"])
    trainable = {tuple(path) for path, _ in nnx.to_flat_state(training.state["params"])}

    def run(steps: int) -> dict:
        for _ in range(steps):
            state[0], metrics = training.step_fn(state[0], device_data)
        return jax.block_until_ready(metrics)

    return FinetuneArm(run, finetune_step_flops(cfg), cfg, model, data, trainable, training.trainable_params)


def monai_unet_step(patch: int, batch: int, channels: tuple[int, ...]):
    """(run `steps` steps, FLOPs per step) of a MONAI UNet (2 residual units per level), Dice + CE, AdamW."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 1, patch, patch, patch)).astype(np.float32))
    y = torch.from_numpy((rng.random((batch, 1, patch, patch, patch)) < 0.1).astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    return (lambda steps: [step() for _ in range(steps)]), float(counter.get_total_flops())


def bench_finetune(args) -> None:
    import statistics

    import torch

    arm = lnfm_finetune_step(args.finetune, args.ft_patch, args.batch, devices=args.cpu_devices)
    run_lnfm, flops_lnfm, head = arm.run, arm.flops, arm.cfg.head.kind
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    run_torch, flops_torch = monai_unet_step(args.ft_patch, args.batch, channels)
    for run in (run_lnfm, run_torch):
        run(args.warmup)  # compilation, allocator warm-up
    times = {"lnfm": [], "monai": []}
    for _ in range(args.rounds):
        for name, run in (("lnfm", run_lnfm), ("monai", run_torch)):
            t0 = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps)
    t_l, t_m = statistics.median(times["lnfm"]), statistics.median(times["monai"])
    print(json.dumps({"site": args.finetune, "lnfm": f"vit_tiny + {head} head", "patch": args.ft_patch,
                      "batch": args.batch, "lnfm_step_s": round(t_l, 4),
                      "lnfm_gflops": round((flops_lnfm or 0) / 1e9, 2),
                      "monai_unet_channels": list(channels), "monai_step_s": round(t_m, 4),
                      "monai_gflops": round(flops_torch / 1e9, 2), "monai_time_over_lnfm": round(t_m / t_l, 2),
                      "rounds": {k: [round(v, 4) for v in t] for k, t in times.items()},
                      "torch_threads": torch.get_num_threads()}))


def torch_same_net_step(arm: FinetuneArm, attention: str = "sdpa"):
    """(run `steps` steps, the loss of a first step already run, FLOPs per step, trainable parameter
    count) of LNFM's segmenter in PyTorch (`bench/torch_segmenter.py`, LNFM's initial weights) with
    LNFM's finetuning step: its loss (MONAI DiceCELoss set up to equal it), the same trainable
    parameters, AdamW with the same betas, eps, weight-decay mask and per-parameter layer-wise LR
    scales, global-norm clipping, and the parameters' moving average when the preset keeps one
    (`optim.ema_decay`, a `lerp_` per parameter). The LR is constant at the peak (LNFM's schedule
    changes the values, not the work)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torch_segmenter import channels_first, dice_ce_loss, from_lnfm, label_tensor

    from lnfm.segmentation.strategies import layer_index_fn
    from lnfm.train.optim import decay_mask, layer_lr_scales, peak_lr
    from lnfm.train.state import path_str

    cfg = arm.cfg
    net = from_lnfm(arm.model, cfg.site.patch, sdpa=attention == "sdpa")
    # The optimizer's own per-leaf rules (lnfm.train.optim), keyed by parameter path 'a/b/c'.
    params = nnx.state(arm.model, nnx.Param)
    layer_of, n_units = layer_index_fn(arm.model)
    llrd = cfg.strategy.llrd if cfg.strategy.freeze in ("none", "first_k") else 1.0  # as build_training

    def by_path(tree) -> dict:
        return {path_str(p).removesuffix("/value"): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}

    scales = by_path(layer_lr_scales(params, layer_of, n_units, llrd))
    decays = by_path(decay_mask(params, tuple(cfg.optim.no_decay)))
    groups: dict[tuple[float, bool], list] = {}
    for name, p in net.named_parameters():
        path = net.lnfm_params[name][0] if name in net.lnfm_params else None
        if path not in arm.trainable:
            p.requires_grad_(False)  # frozen: no gradient, no Adam moments (as LNFM's frozen pytree)
            continue
        key = "/".join(map(str, path))
        groups.setdefault((scales[key], bool(decays[key]) and cfg.optim.weight_decay > 0), []).append(p)
    peak = peak_lr(cfg.optim, cfg.train.global_batch)
    opt = torch.optim.AdamW([{"params": ps, "lr": peak * scale, "weight_decay": cfg.optim.weight_decay if decay
                              else 0.0} for (scale, decay), ps in groups.items()],
                            lr=peak, betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps)
    params = [p for ps in groups.values() for p in ps]
    loss_fn = dice_ce_loss(cfg.loss)
    x, y = channels_first(arm.data["image"]), label_tensor(arm.data["label"])

    ema = [p.detach().clone() for p in params] if cfg.optim.ema_decay > 0 else None

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        if cfg.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p, 1.0 - cfg.optim.ema_decay)
        return loss.detach()

    def run(steps: int) -> torch.Tensor:
        for _ in range(steps):
            loss = step()
        return loss

    with FlopCounterMode(display=False) as counter:
        first = step()
    return run, first, float(counter.get_total_flops()), sum(p.numel() for p in params)


def serve_arm(args) -> None:
    """One arm in its own process (--serve --only ARM): built and warmed up, its facts printed as one
    JSON line; then each line on stdin times --steps steps and prints the seconds per step."""
    import torch

    torch.set_num_threads(args.torch_threads)
    freeze = None if args.ft_freeze == "site" else args.ft_freeze
    arm = lnfm_finetune_step(args.finetune, args.ft_patch, args.batch, quick=True, freeze=freeze,
                             devices=args.cpu_devices)
    run_torch, torch_first, flops_torch, n_torch = torch_same_net_step(arm, args.torch_attention)
    lnfm_first = float(arm.run(1)["loss"])  # both arms start from the same weights and batch
    run = arm.run if args.only == "lnfm" else run_torch
    run(args.warmup)  # compilation, allocator warm-up
    print(json.dumps({"first_step_loss": {"lnfm": round(lnfm_first, 6), "torch": round(float(torch_first), 6)},
                      "trainable_params": {"lnfm": arm.trainable_params, "torch": n_torch},
                      "lnfm_gflops": round((arm.flops or 0) / 1e9, 2), "torch_gflops": round(flops_torch / 1e9, 2),
                      "onednn_convs": onednn_available(), "cfg": {
                          "network": f"vit_{arm.cfg.model.size} patch {arm.cfg.model.patch_size[0]} + "
                                     f"{arm.cfg.head.kind} head",
                          "loss": arm.cfg.loss.name, "strategy": arm.cfg.strategy.freeze
                          + (f" k={arm.cfg.strategy.k}" if arm.cfg.strategy.freeze == "first_k" else "")
                          + f", llrd {arm.cfg.strategy.llrd}"},
                      "torch_threads": torch.get_num_threads(),
                      "mkldnn": bool(torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available())}),
          flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        run(args.steps)
        print((time.perf_counter() - t0) / args.steps, flush=True)


def bench_same_net(args) -> None:
    """LNFM's finetuning step of the CPU preset's network against the same network in PyTorch.

    Each arm runs in its own process, and the parent alternates them round by round. In one
    process the two would share libgomp (oneDNN's OpenMP runtime, in PyTorch and in LNFM's oneDNN
    convolutions alike): once XLA's threads have started OpenMP teams of their own, libgomp counts
    more threads than cores and stops spinning for every team, and PyTorch's step slowed from
    0.07 to 0.10-0.15 s. The PyTorch process never loads LNFM's oneDNN library (LNFM_ONEDNN=0)."""
    import statistics
    import subprocess

    cmd = [sys.executable, __file__, "--serve", "--finetune", args.finetune, "--same-net",
           "--ft-patch", str(args.ft_patch), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--ft-freeze", args.ft_freeze, "--torch-threads", str(args.torch_threads),
           "--torch-attention", args.torch_attention, "--cpu-devices", str(args.cpu_devices)]
    procs, facts = {}, {}
    for name in ("lnfm", "torch"):  # one after the other: each compiles on both cores
        env = dict(os.environ, **({"LNFM_ONEDNN": "0"} if name == "torch" else {}))
        procs[name] = subprocess.Popen([*cmd, "--only", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)
        facts[name] = json.loads(procs[name].stdout.readline())
    times = {"lnfm": [], "torch": []}
    for _ in range(args.rounds):
        for name, proc in procs.items():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            times[name].append(float(proc.stdout.readline()))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    t_l, t_t = statistics.median(times["lnfm"]), statistics.median(times["torch"])
    lf = facts["lnfm"]
    print(json.dumps({
        "site": args.finetune, "preset": "--quick (CPU)", "network": lf["cfg"]["network"],
        "patch": args.ft_patch, "batch": args.batch, "loss": lf["cfg"]["loss"], "strategy": lf["cfg"]["strategy"],
        "trainable_params": lf["trainable_params"],
        "first_step_loss": {"lnfm": lf["first_step_loss"]["lnfm"], "torch": facts["torch"]["first_step_loss"]["torch"]},
        "lnfm_step_s": round(t_l, 4), "torch_step_s": round(t_t, 4), "torch_time_over_lnfm": round(t_t / t_l, 2),
        # XLA's cost analysis does not count custom calls: with oneDNN's convolutions on, lnfm_gflops omits them
        "lnfm_gflops": lf["lnfm_gflops"], "torch_gflops": facts["torch"]["torch_gflops"],
        "onednn_convs": lf["onednn_convs"], "arms": "separate processes, alternated",
        "rounds": {k: [round(v, 4) for v in t] for k, t in times.items()},
        # each round times both arms back to back, within a second: its ratio is the one the VM's slow and fast
        # phases (which move XLA's step by up to 25 % and PyTorch's less) disturb least
        "torch_time_over_lnfm_per_round_median": round(statistics.median(
            t / l for l, t in zip(times["lnfm"], times["torch"])), 2),
        "lnfm_cpu_devices": args.cpu_devices, "xla_flags": os.environ.get("XLA_FLAGS"),
        "torch_threads": facts["torch"]["torch_threads"], "torch_attention": args.torch_attention,
        "mkldnn": facts["torch"]["mkldnn"],
        # OpenMP threads spin while waiting: on a loaded machine PyTorch's step slows several-fold
        # unless OMP_WAIT_POLICY=PASSIVE; the load average says how busy the machine was.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "torch": __import__("torch").__version__, "jax": jax.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="vit_b", help="pretrain preset the model/optimizer settings come from")
    ap.add_argument("--size", default=None, help="ViT size override (tiny, s, b, l, h)")
    ap.add_argument("--img", default="96,128", help="comma list of cubic crop edges to measure")
    ap.add_argument("--patch", type=int, default=16, help="cubic patch edge")
    ap.add_argument("--batch", type=int, default=8, help="global batch (volumes per step)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    ap.add_argument("--dtype", default=None, help="compute dtype override (float32 or bfloat16)")
    ap.add_argument("--torch", action="store_true", help="also time MONAI in PyTorch (default on GPU)")
    ap.add_argument("--finetune", default=None, help="site preset: time its finetuning step against a MONAI UNet")
    ap.add_argument("--ft-patch", type=int, default=32, help="with --finetune: cubic patch edge")
    ap.add_argument("--unet-channels", default="16,32,64,128",
                    help="with --finetune: MONAI UNet channels per level (strides 2)")
    ap.add_argument("--rounds", type=int, default=3, help="with --finetune: interleaved rounds (median reported)")
    ap.add_argument("--same-net", action="store_true",
                    help="with --finetune: time the CPU preset's network against the same network in PyTorch")
    ap.add_argument("--ft-freeze", default="site", choices=("site", "none"),
                    help="with --same-net: the preset's freezing strategy, or none (every parameter trains)")
    ap.add_argument("--torch-threads", type=int, default=2, help="with --same-net: PyTorch intra-op threads")
    ap.add_argument("--torch-attention", default="sdpa", choices=("sdpa", "einsum"),
                    help="with --same-net: MONAI attention through F.scaled_dot_product_attention or its einsum")
    ap.add_argument("--only", default=None, choices=("lnfm", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # one arm's process (serve_arm)
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="with --finetune: CPU devices LNFM's step is split over (data parallel, a slice of the batch "
                         "each; jax_num_cpu_devices), as the finetune command would on that many devices")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = ap.parse_args()
    if args.finetune and args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before any JAX operation
    if args.finetune and args.serve:
        serve_arm(args)
        return
    if args.finetune:
        (bench_same_net if args.same_net else bench_finetune)(args)
        return
    on_gpu = jax.devices()[0].platform == "gpu"
    rows = []
    for edge in (int(v) for v in args.img.split(",")):
        p = args.patch
        overrides = [f"model.img_size=[{edge},{edge},{edge}]", f"model.patch_size=[{p},{p},{p}]",
                     f"train.global_batch={args.batch}", *args.overrides]
        if args.size:
            overrides.append(f"model.size={args.size}")
        if args.dtype:
            overrides.append(f"model.dtype={args.dtype}")
        cfg = load_pretrain_config(args.config, overrides)
        t, flops = time_lnfm(cfg, args.batch, args.steps, args.warmup)
        tokens = args.batch * (edge // args.patch) ** 3
        dev = jax.devices()[0]
        row = {"model": f"vit_{cfg.model.size}", "img": edge, "patch": args.patch, "batch": args.batch,
               "dtype": cfg.model.dtype, "device": f"{jax.device_count()}x {dev.device_kind}",
               "step_s": round(t, 4), "volumes_per_s": round(args.batch / t, 2), "tokens_per_s": round(tokens / t, 1),
               "mfu": mfu(flops, t, dev.device_kind, jax.device_count())}
        if args.torch or on_gpu:
            tt = time_monai(cfg, args.batch, args.steps, args.warmup)
            row.update(monai_step_s=round(tt, 4), speedup_vs_monai=round(tt / t, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
