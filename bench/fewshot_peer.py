"""Few-shot LN segmentation: LNFM heads vs a MONAI U-Net on the same patches, side by side.

    python bench/fewshot_peer.py --labelled 4 --test 6 --steps 300 --arms fine,light,unet \
        --out docs/results/fewshot_peer

Pelvic phantoms (`lnfm.data.synth`) at 1.5 mm isotropic: the labelled training
cases come from one dataset seed, the test cases from another that training never
draws from. Every arm trains on the identical stream of patches (drawn once up
front: a node-centred patch for half of them, flips), for the same number of steps
(equal patch budget), and is scored by the same code: `lnfm.eval` sliding-window
inference over each whole test volume, argmax, `lnfm.eval.dice`. Training wall
time per arm is measured in the same process, so the arms share the machine's load.

Arms: `fine`, `light`, `unetr` (ViT-tiny encoder with 8^3 patches + that LNFM head,
from scratch, AdamW with cosine to a 10% floor) and `unet` (MONAI UNet 16-32-64-128,
2 residual units, Dice+CE, AdamW 1e-3; PyTorch on the same CPU threads).
Writes OUT.csv (per case) and OUT.md (means, paired differences, command).
"""

from __future__ import annotations

import argparse
import csv
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from lnfm.models import onednn
from lnfm.data.synth import SynthConfig, case_seed, generate_case
from lnfm.eval import dice, sliding_window_inference

WINDOW = (-160.0, 240.0)  # the pelvis site's HU window


def phantoms(seed: int, n: int, shape) -> list[tuple[np.ndarray, np.ndarray]]:
    cfg = SynthConfig(site="pelvis", shape=tuple(shape), spacing_inplane=(1.5, 1.5), slice_thickness=(1.5, 1.5),
                      gallery=False)
    out = []
    for i in range(n):
        c = generate_case("pelvis", case_seed(seed, i), cfg)
        image = np.clip((c.image.astype(np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)[..., None]
        out.append((image, (c.label > 0).astype(np.int32)))
    return out


def patch_stream(cases, steps: int, batch: int, patch: int, seed: int, fg: float = 0.5):
    """(steps, batch, P, P, P, 1) images and (steps, batch, P, P, P) labels."""
    rng = np.random.default_rng(seed)
    xs = np.zeros((steps, batch, patch, patch, patch, 1), np.float32)
    ys = np.zeros((steps, batch, patch, patch, patch), np.int32)
    fg_idx = [np.argwhere(lab > 0) for _, lab in cases]
    for s in range(steps):
        for b in range(batch):
            k = int(rng.integers(len(cases)))
            img, lab = cases[k]
            shape = np.asarray(lab.shape)
            if rng.random() < fg and len(fg_idx[k]):
                centre = fg_idx[k][int(rng.integers(len(fg_idx[k])))]
            else:
                centre = rng.integers(0, shape)
            start = np.clip(centre - patch // 2, 0, shape - patch)
            box = tuple(slice(a, a + patch) for a in start)
            x, y = img[box], lab[box]
            for ax in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, ax), np.flip(y, ax)
            xs[s, b], ys[s, b] = x, y
    return xs, ys


class LnfmArm:
    """ViT-tiny (8^3 patches) + an LNFM head from scratch; AdamW, cosine to a 10% floor."""

    def __init__(self, head: str, xs, ys, patch: int, lr: float, seed: int):
        import jax
        import optax
        from flax import nnx

        from lnfm.models import ModelConfig
        from lnfm.models.heads import head_param_count
        from lnfm.models.segmenter import build_segmenter
        from lnfm.segmentation.losses import LossConfig, segmentation_loss
        from lnfm.train.optim import OptimConfig, make_optimizer

        cfg = ModelConfig(size="tiny", img_size=(patch,) * 3, patch_size=(8, 8, 8))
        model = build_segmenter(cfg, head, 2, nnx.Rngs(seed), **({"feature_size": 8} if head == "unetr" else {}))
        self.n_params = head_param_count(model.head)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = make_optimizer(OptimConfig(lr=lr, warmup_steps=20, min_lr_ratio=0.1, weight_decay=1e-4,
                                           b2=0.999), params, len(xs), xs.shape[1])

        def step(params, opt, x, y):
            def loss_fn(p):
                return segmentation_loss(LossConfig(), nnx.merge(graphdef, p, rest)(x), y)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        self.params, self.opt = params, tx.init(params)
        t0 = time.time()
        self._step = jax.jit(step).lower(self.params, self.opt, xs[0], ys[0]).compile()
        self.compile_s = time.time() - t0
        self._predict = jax.jit(lambda p, x: jax.nn.softmax(nnx.merge(graphdef, p, rest)(x), axis=-1))
        self._sync = jax.block_until_ready

    def step(self, x, y) -> None:
        self.params, self.opt, loss = self._step(self.params, self.opt, x, y)
        self._sync(loss)

    def predict(self, x):
        return np.asarray(self._predict(self.params, x))


class UNetArm:
    """MONAI UNet 16-32-64-128, 2 residual units, Dice+CE, AdamW 1e-3 (PyTorch)."""

    def __init__(self, seed: int, threads: int):
        import torch
        from monai.losses import DiceCELoss
        from monai.networks.nets import UNet

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.net = UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2)
        self.opt = torch.optim.AdamW(self.net.parameters(), 1e-3)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.n_params = sum(p.numel() for p in self.net.parameters())
        self.compile_s = 0.0

    def step(self, x, y) -> None:
        self.net.train()
        x = self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
        y = self.torch.from_numpy(np.ascontiguousarray(y[:, None])).long()
        self.opt.zero_grad()
        self.loss_fn(self.net(x), y).backward()
        self.opt.step()

    def predict(self, x):
        self.net.eval()
        with self.torch.no_grad():
            out = self.net(self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
            return self.torch.softmax(out, 1).numpy().transpose(0, 2, 3, 4, 1)


def evaluate(arm, test, patch: int) -> tuple[list[float], float]:
    """Per-case Dice over whole test volumes and seconds per volume."""
    t0 = time.time()
    scores = []
    for img, lab in test:
        probs = sliding_window_inference(arm.predict, img, (patch,) * 3, overlap=0.25, sw_batch_size=2,
                                         num_classes=2)
        scores.append(dice(probs.argmax(-1) > 0, lab > 0))
    return scores, (time.time() - t0) / len(test)


def main(argv=None) -> int:
    # LNFM and the PyTorch peers share this process: LNFM's oneDNN convolutions would leave OpenMP teams that slow
    # PyTorch's steps 2x (lnfm.models.onednn), so LNFM runs XLA's own forms here, as before they existed
    onednn.keep_off()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelled", type=int, default=4)
    ap.add_argument("--test", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="LNFM peak LR")
    ap.add_argument("--shape", default="96,96,64", help="phantom grid (voxels of 1.5 mm)")
    ap.add_argument("--arms", default="fine,light,unet", help="the last one is the reference of the paired tests")
    ap.add_argument("--eval-at", default="100,200", help="also score the test set after these steps (curve)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/fewshot_peer")
    args = ap.parse_args(argv)
    shape = [int(v) for v in args.shape.split(",")]
    t0 = time.time()
    train = phantoms(1000 + args.seed, args.labelled, shape)
    test = phantoms(5000, args.test, shape)  # a dataset seed no training set uses
    xs, ys = patch_stream(train, args.steps, args.batch, args.patch, args.seed)
    print(f"data: {args.labelled} train / {args.test} test phantoms, {args.steps}x{args.batch} patches of "
          f"{args.patch}^3 ({time.time() - t0:.0f}s)", flush=True)
    names = args.arms.split(",")
    arms = {n: UNetArm(args.seed, args.threads) if n == "unet" else LnfmArm(n, xs, ys, args.patch, args.lr, args.seed)
            for n in names}
    for n, a in arms.items():
        print(f"{n}: {a.n_params} parameters (LNFM: head), compile {a.compile_s:.0f}s (not in the train time)",
              flush=True)
    evals = sorted({int(v) for v in args.eval_at.split(",") if v} | {args.steps})
    train_s = dict.fromkeys(names, 0.0)
    rows, summary = [], []
    for s in range(args.steps):
        # Arms alternate step by step, so a busy machine slows them alike.
        for n, a in arms.items():
            t1 = time.time()
            a.step(xs[s], ys[s])
            train_s[n] += time.time() - t1
        if s + 1 in evals:
            for n, a in arms.items():
                scores, infer_s = evaluate(a, test, args.patch)
                rows += [{"arm": n, "step": s + 1, "case": i, "dice": round(d, 4)} for i, d in enumerate(scores)]
                if s + 1 == args.steps:
                    summary.append((n, float(np.mean(scores)), float(np.std(scores)), train_s[n], infer_s,
                                    a.n_params, scores))
                print(f"step {s + 1} {n}: test Dice {np.mean(scores):.3f} +- {np.std(scores):.3f}, "
                      f"train {train_s[n]:.0f}s, infer {infer_s:.1f}s/volume", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["arm", "step", "case", "dice"])
        w.writeheader()
        w.writerows(rows)
    lines = ["# Few-shot phantoms: LNFM heads vs MONAI U-Net (equal patch budget)\n",
             f"Command: `python {shlex.join(['bench/fewshot_peer.py', *(argv or sys.argv[1:])])}`  ",
             f"Machine: {platform.machine()}, {args.threads} threads, shared and loaded; date "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
             "| arm | test Dice mean | sd | train s (no compile) | infer s/volume | parameters (LNFM: head) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {a} | {m:.3f} | {s:.3f} | {t:.0f} | {i:.1f} | {n} |" for a, m, s, t, i, n, _ in summary]
    if len(summary) > 1:
        from scipy.stats import wilcoxon

        ref = summary[-1]
        lines.append(f"\nPaired per-case differences vs `{ref[0]}`:\n")
        for a, _, _, _, _, _, sc in summary[:-1]:
            d = np.asarray(sc) - np.asarray(ref[6])
            p = wilcoxon(d).pvalue if np.any(d) else 1.0
            lines.append(f"- {a} - {ref[0]}: {d.mean():+.3f} (Wilcoxon p = {p:.3g}, n = {len(d)})")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"total {time.time() - t0:.0f}s; wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
