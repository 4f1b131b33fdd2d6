"""Where the CPU preset's finetuning step goes, against the same network in PyTorch (docs/benchmarks.md).

    python bench/step_parts.py [--rounds 3]

The segmenter of `bench/train_step.py --finetune pelvis --same-net` (ViT-tiny with 8^3 patches
+ the fine head at 2x32^3, the site's strategy) and its PyTorch twin (`bench/torch_segmenter.py`,
the same weights): medians over interleaved rounds of the JAX step, forward and forward + backward
(cross-entropy), the encoder's and the head's forward, and the head's conv blocks against PyTorch's
conv + instance norm + LeakyReLU of the same shapes, forward alone and forward + backward.

Both frameworks run in this one process. With LNFM's oneDNN convolutions built (lnfm/models/onednn.py)
they share libgomp, and once XLA's threads have run oneDNN's OpenMP teams PyTorch's figures here run
slow (libgomp stops spinning when it counts more threads than cores); `bench/train_step.py --same-net`
times each arm in its own process. `LNFM_ONEDNN=0` gives the comparison with XLA's own forms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import train_step as TS
from torch_segmenter import channels_first, from_lnfm


def median_ms(fn, calls: int = 5) -> float:
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _torch_fwd_bwd(conv, norm, z, cotangent) -> None:
    z = z.detach().requires_grad_(True)
    out = torch.nn.functional.leaky_relu(norm(conv(z)), 0.01)
    out.backward(cotangent)


def main() -> None:
    from lnfm.models.onednn import available

    if available():
        print("oneDNN convolutions on: PyTorch's figures below share libgomp with them and run slow "
              "(LNFM_ONEDNN=0 for XLA's forms; bench/train_step.py --same-net separates the processes)")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    arm = TS.lnfm_finetune_step("pelvis", 32, 2, quick=True, freeze=None)
    graphdef, state = nnx.split(arm.model)
    state = jax.tree.map(lambda a: jnp.array(np.array(a)), state)  # the step donates the model's buffers
    twin = from_lnfm(arm.model)
    run_torch = TS.torch_same_net_step(arm, "sdpa")[0]
    x, y = jnp.asarray(arm.data["image"]), jnp.asarray(arm.data["label"])
    xt = channels_first(arm.data["image"])

    def ce(state, x, y):
        out = nnx.merge(graphdef, state)(x)
        logp = jax.nn.log_softmax(out[0] if isinstance(out, tuple) else out, -1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    grad = jax.jit(jax.value_and_grad(ce))
    model = nnx.merge(graphdef, state)
    g_enc, s_enc = nnx.split(model.encoder)
    g_head, s_head = nnx.split(model.head)
    enc = jax.jit(lambda s, x: nnx.merge(g_enc, s).features(x))
    head = jax.jit(lambda s, x, f: nnx.merge(g_head, s)(x, f))
    feats = enc(s_enc, x)
    arms = {
        "jax step": lambda: arm.run(1),
        "torch step": lambda: run_torch(1),
        "jax forward": lambda: jax.block_until_ready(fwd(state, x)),
        "torch forward": lambda: twin(xt),
        "jax forward + backward (CE)": lambda: jax.block_until_ready(grad(state, x, y)),
        "jax encoder forward": lambda: jax.block_until_ready(enc(s_enc, x)),
        "jax head forward": lambda: jax.block_until_ready(head(s_head, x, feats)),
    }
    rng = np.random.default_rng(0)
    blocks = [("path[0], 1->8 at 32^3", model.head.path[0], (2, 32, 32, 32, 1)),
              ("blocks[-1], 16->8 at 32^3", model.head.blocks[-1], (2, 32, 32, 32, 16)),
              ("blocks[-2], 32->16 at 16^3", model.head.blocks[-2], (2, 16, 16, 16, 32))]
    for name, block, shape in blocks:
        g, s = nnx.split(block)
        f = jax.jit(lambda s, z, g=g: nnx.merge(g, s)(z))
        z = rng.normal(size=shape).astype(np.float32)
        zj, zt = jnp.asarray(z), channels_first(z)
        cout = block.conv.kernel.shape[-1]
        conv = torch.nn.Conv3d(shape[-1], cout, 3, padding=1, bias=False)
        norm = torch.nn.InstanceNorm3d(cout, affine=True)
        # forward + backward: gradients of the parameters and the input for a fixed random cotangent
        ct = rng.normal(size=shape[:-1] + (cout,)).astype(np.float32)
        ctj, ctt = jnp.asarray(ct), channels_first(ct)
        fb = jax.jit(jax.grad(lambda s, z, c, g=g: jnp.sum(nnx.merge(g, s)(z) * c), argnums=(0, 1)))
        arms[f"jax head {name}"] = lambda f=f, s=s, zj=zj: jax.block_until_ready(f(s, zj))
        arms[f"torch conv + IN + LeakyReLU {name}"] = (
            lambda conv=conv, norm=norm, zt=zt: torch.nn.functional.leaky_relu(norm(conv(zt)), 0.01))
        arms[f"jax head {name}, fwd + bwd"] = lambda fb=fb, s=s, zj=zj, c=ctj: jax.block_until_ready(fb(s, zj, c))
        arms[f"torch {name}, fwd + bwd"] = lambda conv=conv, norm=norm, zt=zt, c=ctt: _torch_fwd_bwd(conv, norm, zt, c)
    results = {k: [] for k in arms}
    with torch.no_grad():  # the twin's step and the blocks' backward enable gradients themselves
        for _ in range(args.rounds):
            for k, fn in arms.items():
                if k == "torch step" or k.endswith("fwd + bwd"):
                    with torch.enable_grad():
                        results[k].append(median_ms(fn))
                else:
                    results[k].append(median_ms(fn))
    for k, v in results.items():
        print(f"{k:48s} {statistics.median(v):8.1f} ms")


if __name__ == "__main__":
    main()
