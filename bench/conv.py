"""Decoder convolutions: lnfm's Conv3D / UpConv3D forms vs XLA's native convolutions.

Each row times forward + backward (jitted, gradient w.r.t. input and kernel) of one
layer in both forms on the same input, side by side in one run, and checks that the
two agree. The forms are what `lnfm.models.heads.blocks` gives for the light and UNETR decoders.

    python bench/conv.py [--size 32] [--channels 32] [--batch 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lnfm.models.heads.blocks import Conv3D, UpConv3D

DN = ("NDHWC", "DHWIO", "NDHWC")


def timed(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def grad_fn(apply):
    """Jitted d(sum(apply(x, w)^2))/d(x, w)."""
    return jax.jit(jax.grad(lambda x, w: jnp.sum(apply(x, w) ** 2), argnums=(0, 1)))


def native_conv(groups: int):
    return lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DN,
                                                     feature_group_count=groups)


def native_upconv(factor: int):
    # Transposed conv with kernel = stride = factor, as nnx.ConvTranspose computes it; the
    # taps are mirrored so it equals UpConv3D's (PyTorch's) tap order.
    return lambda x, w: jax.lax.conv_transpose(x, w[::-1, ::-1, ::-1], (factor,) * 3, "VALID",
                                               dimension_numbers=DN)


def module_apply(module: nnx.Module):
    graphdef, state = nnx.split(module)

    def apply(x, w):
        st = jax.tree.map(lambda a: a, state)  # fresh leaves inside the trace
        st["kernel"] = w
        m = nnx.merge(graphdef, st)
        y = m(x)
        return y if getattr(m, "bias", None) is None else y - m.bias[...]  # compare kernels only

    return apply, module.kernel[...]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    s, c, b = args.size, args.channels, args.batch
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (b, s, s, s, c))
    x_half = jax.random.normal(jax.random.key(2), (b, s // 2, s // 2, s // 2, 2 * c))

    cases = []
    dw = Conv3D(c, c, 3, groups=c, bias=False, rngs=rngs)
    cases.append((f"depth-wise 3x3x3, {c} ch", x, dw, native_conv(c)))
    pw = Conv3D(c, 2 * c, 1, bias=False, rngs=rngs)
    cases.append((f"point-wise 1x1x1, {c}->{2 * c} ch", x, pw, native_conv(1)))
    dense = Conv3D(c, c, 3, bias=False, rngs=rngs)
    cases.append((f"dense 3x3x3, {c} ch (native in both)", x, dense, native_conv(1)))
    up = UpConv3D(2 * c, c, 2, rngs=rngs)
    cases.append((f"transposed 2x2x2 stride 2, {2 * c}->{c} ch", x_half, up, native_upconv(2)))

    print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"input {b}x{s}^3, best of {args.repeat}")
    print("| layer (forward + backward) | XLA native (s) | lnfm form (s) | native / lnfm |")
    print("|---|---|---|---|")
    for name, inp, module, native in cases:
        ours, w = module_apply(module)
        np.testing.assert_allclose(np.asarray(jax.jit(ours)(inp, w)), np.asarray(jax.jit(native)(inp, w)),
                                   rtol=1e-4, atol=1e-4, err_msg=name)
        t_native = timed(grad_fn(native), inp, w, repeat=args.repeat)
        t_ours = timed(grad_fn(ours), inp, w, repeat=args.repeat)
        print(f"| {name} | {t_native:.4f} | {t_ours:.4f} | {t_native / t_ours:.1f}x |")


if __name__ == "__main__":
    main()
