"""Decoder convolutions: lnfm's Conv3D / UpConv3D forms vs XLA's native convolutions and PyTorch.

Default table: forward + backward (jitted, gradient w.r.t. input and kernel) of one
layer in both forms on the same input, side by side in one run, checked equal. The
forms are what `lnfm.models.heads.blocks` gives for the light, fine and UNETR decoders.

`--dense`: forward + backward of dense 'SAME' 3x3x3 convolutions at the heads' real
shapes (printed from ViT-tiny segmenters: the light head at 32^3 and the fine head,
the site presets' default, at 32^3 and 64^3 patches, batch 2) and
the issue's reference shapes, in every form: XLA's native convolution (NDHWC/DHWIO and
NCDHW/OIDHW), im2col (27 shifted copies concatenated, one matmul), the sum of 27
shifted matmuls, the plane form (9 in-plane taps, one matmul, 3 shifted sums),
`conv_forms.dense_conv` (what the heads run), and PyTorch's `conv3d` (default and
channels_last_3d) on the same threads. Arms are interleaved, `--repeat` rounds,
median reported. `--xla-flags` repeats the native/lnfm/PyTorch arms in one fresh
process per XLA flag set (XLA reads its flags once, at start-up).

    python bench/conv.py [--size 32] [--channels 32] [--batch 2] [--repeat 5]
    python bench/conv.py --dense [--repeat 3] [--xla-flags]
    python bench/conv.py --onnx [--repeat 5]

`--onnx`: ONNX Runtime through predict's session (`lnfm.eval.backends.onnx_network`, 2 threads)
on the fine head's dense 3x3x3 convolutions at the mediastinum preset's window (2x160x160x96,
NCDHW as the export has them): its 3D `Conv` against the slice form, one 2D `Conv` over the depth
slices with 3*cout outputs (one per depth tap) plus the shifted sum over depth, in one graph. The
slice form is timed with its input and output already in the slice layout (B*D, C, H, W), as a
head exported in that layout would keep them, and with the two transposes from and to NCDHW;
outputs are checked equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lnfm.models import conv_forms, onednn
from lnfm.models.heads import blocks
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


REFERENCE_SHAPES = [(2, 32, 8, 8), (2, 16, 16, 16), (2, 64, 32, 32)]  # (batch, edge, cin, cout)
# XLA:CPU flags of this jaxlib that can change how a convolution runs (listed from the binary's own flag
# table; oneDNN is used only by builds made with it, YNNPACK convolutions only when asked for).
XLA_FLAG_SETS = ["", "--xla_cpu_use_thunk_runtime=false", "--xla_cpu_multi_thread_eigen=false",
                 "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
                 "--xla_cpu_use_xnnpack=true"]


def head_dense_shapes(head: str, edge: int, batch: int = 2) -> list[tuple[int, int, int, int]]:
    """(batch, edge, cin, cout) of every dense 3x3x3 conv in a ViT-tiny segmenter with `head` at edge^3."""
    from lnfm.models import ModelConfig
    from lnfm.models.segmenter import build_segmenter

    seen = []

    def record(x, w):
        if w.shape[:3] != (1, 1, 1):
            seen.append((x.shape[0], x.shape[1], w.shape[3], w.shape[4]))
        return conv_forms.native_conv(x, w) if w.shape[0] > 1 else x @ w[0, 0, 0]

    cfg = ModelConfig(size="tiny", img_size=(edge,) * 3)
    original, blocks.dense_conv = blocks.dense_conv, record
    try:
        model = nnx.eval_shape(lambda: build_segmenter(cfg, head, 2, nnx.Rngs(0)))
        jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((batch, edge, edge, edge, 1), jnp.float32))
    finally:
        blocks.dense_conv = original
    return seen


def shifted_sum_conv(x, w):
    k, n = w.shape[0], x.shape[1:4]
    xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
    return sum(xp[:, i:i + n[0], j:j + n[1], m:m + n[2]] @ w[i, j, m]
               for i in range(k) for j in range(k) for m in range(k))


def dense_arms(x, w, only_main: bool):
    """name -> zero-argument callable running forward + backward once (blocking)."""
    import torch

    xn, wn = jnp.transpose(x, (0, 4, 1, 2, 3)), jnp.transpose(w, (4, 3, 0, 1, 2))
    ncdhw = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME",  # noqa: E731
                                                      dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
    jax_forms = {"XLA native NDHWC": (conv_forms.native_conv, x, w), "XLA native NCDHW": (ncdhw, xn, wn),
                 "im2col (27 taps, 1 matmul)": (conv_forms.im2col_conv, x, w),
                 "27 shifted matmuls": (shifted_sum_conv, x, w),
                 "plane (9 taps, 1 matmul, 3 shifted sums)": (conv_forms.plane_conv, x, w),
                 "lnfm dense_conv": (conv_forms.dense_conv, x, w)}
    if only_main:
        jax_forms = {k: v for k, v in jax_forms.items() if k in ("XLA native NDHWC", "lnfm dense_conv")}
    ref = np.asarray(jax.jit(conv_forms.native_conv)(x, w))
    arms = {}
    for name, (fn, a, b) in jax_forms.items():
        if a is x:
            np.testing.assert_allclose(np.asarray(jax.jit(fn)(a, b)), ref, rtol=1e-4, atol=1e-4, err_msg=name)
        g = grad_fn(fn)
        jax.block_until_ready(g(a, b))  # compile outside the timing
        arms[name] = (lambda g=g, a=a, b=b: jax.block_until_ready(g(a, b)))
    for layout in ("default", "channels_last_3d"):
        fmt = torch.channels_last_3d if layout != "default" else torch.contiguous_format
        xt = torch.from_numpy(np.array(xn)).contiguous(memory_format=fmt).requires_grad_()
        wt = torch.from_numpy(np.array(wn)).contiguous(memory_format=fmt).requires_grad_()

        def step(xt=xt, wt=wt):
            (torch.nn.functional.conv3d(xt, wt, padding=1) ** 2).sum().backward()
            xt.grad = wt.grad = None

        step()
        arms[f"PyTorch conv3d {layout}"] = step
    return arms


def bench_dense(args) -> None:
    import torch

    shapes = list(REFERENCE_SHAPES)
    if not args.only_main:
        for head, edge in (("light", 32), ("fine", 32), ("fine", 64)):
            found = head_dense_shapes(head, edge)
            print(f"# {head} head, ViT-tiny, 2x{edge}^3: dense 3x3x3 convs (batch, edge, cin, cout): {found}")
            shapes += [s for s in dict.fromkeys(found) if s not in shapes]
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__}, "
          f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads), XLA_FLAGS={flags!r}; "
          f"forward + backward, median of {args.repeat} interleaved rounds, seconds")
    for b, e, ci, co in shapes:
        x = jax.random.normal(jax.random.key(1), (b, e, e, e, ci))
        w = jax.random.normal(jax.random.key(2), (3, 3, 3, ci, co)) / np.sqrt(27 * ci)
        arms = dense_arms(x, w, args.only_main)
        times = {name: [] for name in arms}
        for _ in range(args.repeat):
            for name, run in arms.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        torch_best = min(v for k, v in med.items() if k.startswith("PyTorch"))
        cells = ", ".join(f"{k} {v:.4f}" for k, v in med.items())
        print(f"| {b}x{e}^3x{ci}->{co} | {cells} | PyTorch best / lnfm = {torch_best / med['lnfm dense_conv']:.2f}x |",
              flush=True)


# (cin, cout, D, H, W) of the fine head's dense convolutions in one mediastinum window (the profile's largest)
ONNX_SHAPES = ((16, 8, 160, 160, 96), (32, 16, 80, 80, 48), (16, 16, 80, 80, 48), (64, 32, 40, 40, 24))


def onnx_graphs(b: int, cin: int, cout: int, d: int, h: int, w: int, w3: np.ndarray):
    """{name: (model, input layout)}: ORT's 3D Conv, and the slice form without / with the transposes,
    with model.onnx's tensor names (so predict's `onnx_network` runs them)."""
    from onnx import TensorProto, helper, numpy_helper

    from lnfm.models.export_onnx import ONNX_INPUT as X, ONNX_OUTPUT as Y

    def graph(nodes, x_shape, inits, name):
        g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(X, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(Y, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    node = helper.make_node
    native = graph([node("Conv", [X, "w"], [Y], pads=[1] * 6)], [b, cin, d, h, w], {"w": w3}, "conv3d")
    # Slice form: depth tap i is output block i of one 2D conv; y[d] = z[d, 1] + z[d - 1, 0] + z[d + 1, 2].
    ints = {"shape6": [b, d, 3, cout, h, w], "out4": [b * d, cout, h, w], "in4": [b * d, cin, h, w],
            "i0": [0], "i1": [1], "i2": [2], "i3": [3], "d_1": [d - 1], "d": [d],
            "pad_front": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0], "pad_back": [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]}
    inits = {"w2": np.concatenate([w3[:, :, i] for i in range(3)], 0)} | {k: np.asarray(v, np.int64)
                                                                           for k, v in ints.items()}

    def slice_form(src: str, out: str) -> list:
        nodes = [node("Conv", [src, "w2"], ["z"], pads=[1] * 4), node("Reshape", ["z", "shape6"], ["z6"])]
        for i in range(3):  # tap i: (b, d, cout, h, w)
            nodes += [node("Slice", ["z6", f"i{i}", f"i{i + 1}", "i2"], [f"tap{i}_"]),
                      node("Squeeze", [f"tap{i}_", "i2"], [f"tap{i}"])]
        return nodes + [node("Slice", ["tap0", "i0", "d_1", "i1"], ["front"]), node("Pad", ["front", "pad_front"],
                                                                                   ["front_p"]),
                         node("Slice", ["tap2", "i1", "d", "i1"], ["back"]), node("Pad", ["back", "pad_back"],
                                                                                 ["back_p"]),
                         node("Sum", ["tap1", "front_p", "back_p"], [out])]

    slice_layout = graph(slice_form(X, "y5") + [node("Reshape", ["y5", "out4"], [Y])], [b * d, cin, h, w],
                         {k: v for k, v in inits.items() if k != "in4"}, "slices")
    with_transposes = graph([node("Transpose", [X], ["xt"], perm=[0, 2, 1, 3, 4]),
                             node("Reshape", ["xt", "in4"], ["xs"])] + slice_form("xs", "y5")
                            + [node("Transpose", ["y5"], [Y], perm=[0, 2, 1, 3, 4])],
                            [b, cin, d, h, w], {k: v for k, v in inits.items() if k != "out4"}, "slices_transposed")
    return {"ORT Conv 3D": (native, "ncdhw"), "slice form, slice layout": (slice_layout, "slices"),
            "slice form + transposes": (with_transposes, "ncdhw")}


def bench_onnx(args) -> None:
    import onnx
    import onnxruntime as ort

    from lnfm.eval.backends import onnx_network

    rng = np.random.default_rng(0)
    b = 2
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, ONNX Runtime {ort.__version__}, "
          f"2 intra-op threads, batch {b}, median of {args.repeat} interleaved rounds, seconds")
    print("| cin->cout at D x H x W | ORT Conv 3D | slice form, slice layout | slice form + transposes | "
          "3D / slice layout | max abs diff |")
    print("|---|---|---|---|---|---|")
    for cin, cout, d, h, w in ONNX_SHAPES:
        w3 = (rng.standard_normal((cout, cin, 3, 3, 3)) / np.sqrt(27 * cin)).astype(np.float32)
        x = rng.standard_normal((b, cin, d, h, w)).astype(np.float32)
        inputs = {"ncdhw": x, "slices": np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(b * d, cin, h, w))}
        sessions = {}
        with tempfile.TemporaryDirectory() as tmp:  # onnx_network loads a file, as predict does
            for i, (name, (model, layout)) in enumerate(onnx_graphs(b, cin, cout, d, h, w, w3).items()):
                onnx.save(model, f"{tmp}/{i}.onnx")
                sessions[name] = (onnx_network(f"{tmp}/{i}.onnx", threads=2), inputs[layout])
        outputs = {name: run(inp) for name, (run, inp) in sessions.items()}
        ref = outputs["ORT Conv 3D"]
        diff = max(np.abs(outputs["slice form + transposes"] - ref).max(),
                   np.abs(outputs["slice form, slice layout"].reshape(b, d, cout, h, w).transpose(0, 2, 1, 3, 4)
                          - ref).max())
        times = {name: [] for name in sessions}
        for _ in range(args.repeat):
            for name, (run, inp) in sessions.items():
                t0 = time.perf_counter()
                run(inp)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {cin}->{cout} at {d}x{h}x{w} | {med['ORT Conv 3D']:.3f} | {med['slice form, slice layout']:.3f} | "
              f"{med['slice form + transposes']:.3f} | "
              f"{med['ORT Conv 3D'] / med['slice form, slice layout']:.2f}x | {diff:.1e} |", flush=True)


def bench_flags(args) -> None:
    for flags in XLA_FLAG_SETS:
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, __file__, "--dense", "--only-main", "--repeat", str(args.repeat)]
        subprocess.run(cmd, env=env, check=False)


def main() -> None:
    # PyTorch runs in this process: LNFM's oneDNN convolutions (lnfm.models.onednn) would leave OpenMP teams in
    # the shared libgomp that slow PyTorch's arms 2x, so LNFM's JAX arms run XLA's own forms here;
    # bench/train_step.py --same-net times oneDNN's against PyTorch in separate processes
    onednn.keep_off()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dense", action="store_true", help="dense 3x3x3 forms vs PyTorch at the fine head's shapes")
    ap.add_argument("--xla-flags", action="store_true", help="with --dense: one process per XLA flag set")
    ap.add_argument("--onnx", action="store_true", help="ONNX Runtime's 3D Conv vs the 2D slice form")
    ap.add_argument("--only-main", action="store_true", help=argparse.SUPPRESS)  # native, lnfm, PyTorch only
    args = ap.parse_args()
    if args.xla_flags:
        bench_flags(args)
        return
    if args.dense:
        bench_dense(args)
        return
    if args.onnx:
        bench_onnx(args)
        return
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
    cases.append((f"dense 3x3x3, {c} ch", x, dense, native_conv(1)))
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
