"""Pretraining step benchmark: step time, volumes/s, tokens/s and MFU of the MAE train step.

    python bench/train_step.py                                  # vit_b at 96^3 and 128^3, batch 8
    python bench/train_step.py --size tiny --img 32 --patch 8 --batch 8 --steps 5 --torch   # CPU-sized

Times the jitted LNFM step (AdamW, all devices, synthetic data). With --torch (on by
default when a GPU is present) the same run also times MONAI's MaskedAutoEncoderViT
in PyTorch with the same encoder/decoder sizes, batch and AdamW, under bf16 autocast
(when --dtype bfloat16) and prints LNFM's speed-up. Results go to stdout as a table.

With --finetune SITE it times the finetuning step instead (forward, backward, AdamW)
of the site preset's segmenter (default ViT-tiny + the preset's head) at --ft-patch,
every parameter trained, against a MONAI UNet step in PyTorch (Dice + CE, AdamW) of
about the same FLOPs (--unet-channels), same batch, same threads; the arms are
interleaved for --rounds rounds of --steps steps and the medians compared:

    python bench/train_step.py --finetune pelvis --ft-patch 32 --batch 2 --steps 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import numpy as np

from lnfm.models.mae import decoder_dims
from lnfm.models.sharding import batch_sharding, make_mesh, use_rules
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


def lnfm_finetune_step(site: str, patch: int, batch: int):
    """(run `steps` steps, model FLOPs per step, head kind) of the site preset's finetuning step."""
    from lnfm.jobs.finetune import build_training, load_finetune_config
    from lnfm.jobs.finetune_cpu import step_flops as finetune_step_flops
    from lnfm.models.sharding import MeshConfig

    cfg = load_finetune_config(site, [f"site.patch=[{patch},{patch},{patch}]",
                                      f"model.img_size=[{patch},{patch},{patch}]",
                                      f"train.global_batch={batch}", "strategy.freeze=none"])
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    training = build_training(cfg, 0, mesh)
    rng = np.random.default_rng(0)
    data = {"image": rng.standard_normal((batch, patch, patch, patch, 1)).astype(np.float32),
            "label": (rng.random((batch, patch, patch, patch)) < 0.1).astype(np.int32)}
    data = jax.device_put(data, batch_sharding(mesh))
    state = [training.state]

    def run(steps: int) -> None:
        for _ in range(steps):
            state[0], metrics = training.step_fn(state[0], data)
        jax.block_until_ready(metrics)

    return run, finetune_step_flops(cfg), cfg.head.kind


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

    run_lnfm, flops_lnfm, head = lnfm_finetune_step(args.finetune, args.ft_patch, args.batch)
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
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = ap.parse_args()
    if args.finetune:
        bench_finetune(args)
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
