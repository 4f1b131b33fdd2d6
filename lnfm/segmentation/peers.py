"""The peers of the accuracy benchmark: MONAI networks a user would train instead of LNFM.

- `unet`: MONAI `UNet` (16-32-64-128 channels, 2 residual units), Dice + CE, AdamW;
- `dynunet`: MONAI `DynUNet` with nnU-Net's 3d_fullres topology for the benchmark's
  spacing and patch (`nnunet_plan`), deep supervision, and nnU-Net's optimiser
  (SGD, Nesterov momentum 0.99, lr 0.01, poly decay, weight decay 3e-5);
- `swinunetr`: MONAI `SwinUNETR` from scratch (feature size 24), Dice + CE, AdamW. Its
  bottleneck is 1/32 of the patch: below 64^3 patches that is 1 voxel, where instance
  norm is undefined, so smaller patches use group norm (12 groups) instead.

Each trains on the patches of LNFM's own loader (same store, labelled cases,
patch size, batch, foreground share and seed) for a budget of steps or of seconds.
With node paste (the loader given host scans) the labels carry IGNORE_LABEL where the loss
must not look, and the peers' Dice + CE leaves those voxels out as LNFM's loss does.
The poly / cosine-free schedules follow the elapsed share of the budget, so a
time budget decays the learning rate like a step budget does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, MaskedDiceLoss
from monai.networks.nets import DynUNet, SwinUNETR, UNet

from lnfm.data.paste import IGNORE_LABEL
from lnfm.segmentation.nnunet_plan import plan_3d_fullres

PEERS = ("unet", "dynunet", "swinunetr")


@dataclasses.dataclass
class Budget:
    steps: int | None = None  # stop after this many optimizer steps
    seconds: float | None = None  # or after this much training wall time

    def fraction(self, step: int, elapsed: float) -> float:
        if self.steps is not None:
            return min(step / self.steps, 1.0)
        return min(elapsed / float(self.seconds), 1.0)

    def done(self, step: int, elapsed: float) -> bool:
        return self.fraction(step, elapsed) >= 1.0


@dataclasses.dataclass
class Peer:
    name: str
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    poly: bool  # poly decay (nnU-Net); else constant after a short warm-up
    ds_weights: list[float] | None  # deep-supervision weights (outputs stacked on dim 1)


def build_peer(name: str, in_channels: int, num_classes: int, spacing, patch, seed: int) -> Peer:
    torch.manual_seed(seed)
    if name == "unet":
        net = UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=(16, 32, 64, 128),
                   strides=(2, 2, 2), num_res_units=2)
        return Peer(name, net, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4), 1e-3, False, None)
    if name == "dynunet":
        plan = plan_3d_fullres(spacing, patch)
        net = DynUNet(3, in_channels, num_classes, **plan.dynunet_kwargs())
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        return Peer(name, net, opt, 1e-2, True, plan.ds_weights if plan.deep_supr_num else None)
    if name == "swinunetr":
        norm = "instance" if min(patch) >= 64 else ("group", {"num_groups": 12})
        net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=24, spatial_dims=3,
                        norm_name=norm)
        return Peer(name, net, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5), 1e-3, False, None)
    raise ValueError(f"unknown peer '{name}' (choices: {', '.join(PEERS)})")


def _to_torch(image: np.ndarray) -> torch.Tensor:
    """(B, X, Y, Z, C) channels-last -> (B, C, X, Y, Z)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), -1, 1)))


class DiceCE:
    """MONAI's DiceCELoss (softmax, one-hot labels, Dice per sample plus mean CE), leaving out the voxels
    labelled IGNORE_LABEL when a batch has any: Dice on the remaining voxels, CE averaged over them."""

    def __init__(self) -> None:
        self.plain = DiceCELoss(to_onehot_y=True, softmax=True)
        self.masked_dice = MaskedDiceLoss(softmax=True)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """logits (B, K, X, Y, Z); y (B, 1, X, Y, Z) int64 class indices or IGNORE_LABEL."""
        valid = y != IGNORE_LABEL
        if bool(valid.all()):
            return self.plain(logits, y)
        # One-hot first, then mask: a masked voxel then counts for no class (MONAI's own to_onehot_y
        # would one-hot the masked index 0 into the background channel).
        onehot = F.one_hot(torch.where(valid, y, 0)[:, 0], logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        ce = F.cross_entropy(logits, y[:, 0], ignore_index=IGNORE_LABEL)
        return self.masked_dice(logits, onehot, mask=valid.to(logits.dtype)) + ce


def train_peer(peer: Peer, batches: Iterator[dict], budget: Budget, warmup_steps: int = 20) -> dict:
    """Train until the budget is spent; returns steps, seconds and the last loss."""
    loss_fn = DiceCE()
    peer.net.train()
    t0, step, loss_value = time.perf_counter(), 0, float("nan")
    while not budget.done(step, time.perf_counter() - t0):
        frac = budget.fraction(step, time.perf_counter() - t0)
        lr = peer.lr * (1 - frac) ** 0.9 if peer.poly else peer.lr * min(1.0, (step + 1) / warmup_steps)
        for group in peer.optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        x = _to_torch(batch["image"])
        y = torch.from_numpy(np.asarray(batch["label"], np.int64))[:, None]
        out = peer.net(x)
        if peer.ds_weights is not None and out.dim() == 6:  # DynUNet: (B, 1 + extra, K, X, Y, Z), all at full size
            loss = sum(w * loss_fn(out[:, i], y) for i, w in enumerate(peer.ds_weights))
        else:
            loss = loss_fn(out, y)
        peer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if peer.poly:  # nnU-Net clips the gradient norm at 12
            torch.nn.utils.clip_grad_norm_(peer.net.parameters(), 12.0)
        peer.optimizer.step()
        loss_value = float(loss.detach())
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"{peer.name}: non-finite loss at step {step}")
        step += 1
    return {"steps": step, "train_time_s": time.perf_counter() - t0, "final_loss": loss_value}


def probability_fn(peer: Peer) -> Callable[[np.ndarray], np.ndarray]:
    """fn(patches (B, X, Y, Z, C)) -> softmax (B, X, Y, Z, K), what lnfm's sliding window calls."""
    peer.net.eval()

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = peer.net(_to_torch(x))
            return np.moveaxis(torch.softmax(logits.float(), dim=1).numpy(), 1, -1)

    return fn
