"""Sliding-window inference: lnfm (JAX) vs MONAI (PyTorch) with the same 3D conv net.

The network is 3 conv layers (3x3x3, 16 channels, ReLU) with identical weights in
Flax NNX and PyTorch. Both run Gaussian blending with the same ROI, overlap and
window batch size on the same volume; the script checks that the outputs agree
and prints times and their ratio. It uses the GPU when JAX and PyTorch see one.
A second pair of runs uses a per-voxel linear map as the predictor in both, which
isolates the sliding-window machinery (window gathering, blending) from the speed
of each framework's convolutions; the time of one window batch through each
network is printed too.

With `--predict pelvis,mediastinum` it times `lnfm predict` end to end instead
(fresh process per run: start-up, model load, reading, resampling, sliding window,
post-processing, writing) on a CT of `--ct-shape` voxels at `--ct-spacing` mm (the
real TotalSegmentator example CT of ../shared/data resampled up; `--ct-source siemens`: the real
Siemens series with its couch and an arm in the field of view, its slices resampled), for each site
preset's model size (random weights: the time does not depend on them), exported
once as onnx (which holds the weights for the JAX backend too), per `--backends`; `--heads`
exports each preset with other heads as well ("" is the preset's own).

With `--overhead mediastinum,pelvis` it times the same pipeline with a network that costs nothing
(every window batch gets one precomputed output), a fresh process per run, for this checkout or for
each of `--trees` (other checkouts' lnfm: an A/B of pipeline changes without the network's noise).

With `--networks mediastinum` it times one batch of windows through each preset's exported
network per backend; `--same-net` adds the same batch through that network rebuilt in PyTorch
(`bench/torch_segmenter.py`, the same weights; channels-first and channels_last_3d).

With `--pipeline pelvis` it runs the same pipeline in one process, stage by stage
(read, RAS + resampling + body crop, normalisation, sliding window through the
network, argmax + post-processing, labels back to the source grid, writing), per
backend, and then MONAI's `sliding_window_inference` with a MONAI UNet in PyTorch on
the same normalised volume with the same ROI, overlap, Gaussian blending (sigma
0.125 ROI) and window batch. The UNet (channels `--unet-channels`, strides 2, 2
residual units) is chosen for about the same FLOPs per window as the preset's
model; both FLOP counts are printed (XLA cost analysis; torch's FlopCounterMode).
The sliding-window stage is repeated `--rounds` times, arms interleaved, medians
printed. That is a speed comparison of equal-cost networks; `--same-net` adds MONAI's
sliding window over our own network rebuilt in PyTorch (`bench/torch_segmenter.py`,
the export's weights; ViT + fine head exports such as pelvis), softmax per window as
ours, and prints how far its probabilities are from ours.

Usage: .venv/bin/python bench/inference.py [--shape 160,160,96] [--roi 64,64,32] [--batch 4]
       .venv/bin/python bench/inference.py --predict pelvis,mediastinum [--ct-shape 512,512,300] [--heads ,fine]
           [--ct-source example|siemens] [--trees .,../other-checkout] [--predict-rounds 2]
       .venv/bin/python bench/inference.py --networks pelvis [--heads fine,light,unetr,linear] [--batch 2] [--same-net]
       .venv/bin/python bench/inference.py --onnx-files A/model.onnx,B/model.onnx [--rounds 3] [--batch 2]
       .venv/bin/python bench/inference.py --overhead mediastinum,pelvis [--rounds 3] [--trees .,../other-checkout]
       .venv/bin/python bench/inference.py --pipeline pelvis [--rounds 3] [--unet-channels 16,32,64,128] [--same-net]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np


def build_models(in_ch: int, width: int, out_ch: int, seed: int = 0):
    import jax
    import torch
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(in_ch, width, (3, 3, 3), padding="SAME", rngs=rngs)
            self.c2 = nnx.Conv(width, width, (3, 3, 3), padding="SAME", rngs=rngs)
            self.c3 = nnx.Conv(width, out_ch, (3, 3, 3), padding="SAME", rngs=rngs)

        def __call__(self, x):
            return self.c3(jax.nn.relu(self.c2(jax.nn.relu(self.c1(x)))))

    net = Net(nnx.Rngs(seed))
    layers = []
    for conv in (net.c1, net.c2, net.c3):
        t = torch.nn.Conv3d(conv.in_features, conv.out_features, 3, padding=1)
        # Flax kernels are (x, y, z, in, out); torch wants (out, in, x, y, z).
        t.weight.data = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(4, 3, 0, 1, 2).copy())
        t.bias.data = torch.from_numpy(np.asarray(conv.bias[...]).copy())
        layers += [t, torch.nn.ReLU()]
    torch_net = torch.nn.Sequential(*layers[:-1]).eval()
    graphdef, state = nnx.split(net)

    @jax.jit
    def predict(x):
        return nnx.merge(graphdef, state)(x)

    return predict, torch_net


SIEMENS = "shared/data/ct/totalsegmentator/example_ct_dicom"  # under the repository's parent


def write_ct(path, shape, spacing, source: str = "example") -> tuple[tuple, tuple]:
    """A CT as int16 HU NIfTI; returns its (shape, spacing).

    `example`: the real example CT (3 mm, an abdomen cropped to the body: it fills the field of view)
    resampled (linear) to `shape` voxels of `spacing` mm. `siemens`: the real Siemens series (512 x 512
    at 0.977 mm: the body with the couch and an arm beside it in the field of view, as a scanner
    writes it), its 20 slices resampled to `shape[2]` slices of `spacing[2]` mm; the in-plane grid
    stays the scanner's."""
    from pathlib import Path

    import nibabel as nib
    from scipy import ndimage

    root = Path(__file__).resolve().parents[1].parent
    if source == "siemens":
        from lnfm.data.geometry import spacing_of
        from lnfm.io import read_image

        vol = read_image(root / SIEMENS)
        data = np.asarray(vol.data, np.float32)
        data = data[..., 0] if data.ndim == 4 else data
        shape = (*data.shape[:2], shape[2])
        spacing = (*(float(s) for s in spacing_of(vol.affine)[:2]), spacing[2])
    elif source == "example":
        data = np.asarray(nib.load(root / "shared/data/ct/totalsegmentator/example_ct.nii.gz").dataobj, np.float32)
    else:
        raise ValueError(f"unknown CT source {source!r} (example, siemens)")
    up = ndimage.zoom(data, [n / s for n, s in zip(shape, data.shape)], order=1, mode="nearest")
    nib.save(nib.Nifti1Image(np.round(up).astype(np.int16), np.diag([*spacing, 1.0])), path)
    return tuple(shape), tuple(spacing)


def bench_ct(args, kind: str):
    """(folder, CT path, shape, spacing): `write_ct` of `--ct-shape` at `--ct-spacing` in a fresh
    lnfm_bench_KIND_ folder."""
    import tempfile
    from pathlib import Path

    shape = tuple(int(s) for s in args.ct_shape.split(","))
    spacing = tuple(float(s) for s in args.ct_spacing.split(","))
    root = Path(tempfile.mkdtemp(prefix=f"lnfm_bench_{kind}_"))
    shape, spacing = write_ct(root / "ct.nii.gz", shape, spacing, args.ct_source)
    return root, root / "ct.nii.gz", shape, spacing


def head_overrides(head: str) -> list[str]:
    """Finetuning overrides of a `--heads` entry: `unetr`, or `unetr:feature_size=8;num_aux=1` to set
    `head.options` too; "" for the preset's own head."""
    kind, _, options = head.partition(":")
    return [f"head.kind={kind}", *(f"head.options.{o}" for o in options.split(";") if o)] if kind else []


def write_export(site: str, out, overrides=()):
    """An onnx export (model.onnx + model.safetensors) of the site preset's model (with config
    `overrides` such as "head.kind=light"), random weights; returns the model."""
    import dataclasses

    from flax import nnx

    from lnfm.data.contract import CONTRACT_VERSION, CT_STORAGE, ORIENTATION, Normalization, PrepareContract, \
        Preprocessing
    from lnfm.jobs import export as ex
    from lnfm.jobs.export_meta import SiteInfo
    from lnfm.jobs.finetune import load_finetune_config
    from lnfm.models import export_formats as fmt
    from lnfm.models.segmenter import segmenter_from_config

    cfg = load_finetune_config(site, list(overrides))
    model = segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0))
    contract = PrepareContract(version=CONTRACT_VERSION, spacing=tuple(cfg.site.spacing), orientation=ORIENTATION,
                               crop_body=True, body_threshold_hu=-500.0, channels=("CT",), ct_storage=CT_STORAGE,
                               label_map={}, resample_channels=False)
    prep = Preprocessing(contract, Normalization(hu_window=tuple(cfg.site.window), pet_scale=10.0),
                         tuple(cfg.site.patch))
    source = ex._Source("segmenter", fmt.flat_params(model), cfg.model, prep, training_data={},
                        head=cfg.head, labels=list(cfg.site.labels),
                        site=SiteInfo(site, list(cfg.site.stations)),
                        inference=dataclasses.replace(cfg.inference, roi=tuple(cfg.site.patch)),
                        postprocess=cfg.postprocess)
    out.mkdir(parents=True)
    ex._write(source, out, "onnx")  # the job's own writer
    return model


def bench_predict(args) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, ct, shape, spacing = bench_ct(args, "predict")
    print(f"CT {shape} at {spacing} mm ({args.ct_source}); lnfm predict wall time per run (fresh process, "
          f"reading and writing included)")
    here = Path(__file__).resolve()
    trees = [Path(t).resolve() for t in args.trees.split(",")] if args.trees else [here.parents[1]]
    for n, (site, head) in enumerate((s, h) for s in args.predict.split(",") for h in (args.heads or "").split(",")):
        export, name = root / f"export_{n}", f"{site} {head}" if head else site
        t = time.perf_counter()
        write_export(site, export, head_overrides(head))
        print(f"{name}: onnx export written in {time.perf_counter() - t:.0f} s")
        for backend in args.backends.split(","):
            for overlap in args.predict_overlaps.split(","):
                for r, tree in itertools.product(range(args.predict_rounds), trees):  # rounds interleave the trees
                    out = root / f"{n}_{backend}_{overlap}_{r}_{trees.index(tree)}.nii.gz"
                    cmd = [sys.executable, "-m", "lnfm", "predict", "--model", str(export), "--input", str(ct),
                           "--output", str(out), "--backend", backend, "--force"]
                    cmd += [] if overlap == "model" else ["--overlap", overlap]
                    t = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree,
                                          env=dict(os.environ, PYTHONPATH=str(tree)))
                    wall = time.perf_counter() - t
                    status = "ok" if proc.returncode == 0 else f"FAILED: {proc.stderr.strip().splitlines()[-1:]}"
                    where = f" [{tree}]" if args.trees else ""
                    print(f"  {name} {backend} overlap {overlap}{where}: {wall:.1f} s ({status})", flush=True)


def overhead_case(export: str, ct: str) -> float:
    """Seconds of `predict_case` (reading, resampling, body crop, sliding window, post-processing,
    labels back to the source grid, writing) with a network that costs nothing: every window batch
    gets one precomputed output (foreground probability 0.9 in a central ball, 0.1 elsewhere, so
    post-processing has components to handle)."""
    import tempfile
    from pathlib import Path

    from lnfm.jobs import predict as pr
    from lnfm.jobs.export_meta import read_meta

    meta = read_meta(export)
    roi, batch = tuple(meta.preprocessing.patch_size), meta.inference.sw_batch_size
    r = np.sqrt(sum((g - n / 2) ** 2 for g, n in zip(np.indices(roi, np.float32), roi)))
    p1 = np.where(r < 6, 0.9, 0.1).astype(np.float32)
    out = np.broadcast_to(np.stack([1 - p1, p1], -1)[None], (batch, *roi, 2)).copy()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pr.predict_case(lambda x: out, meta, [ct], Path(tmp) / "mask.nii.gz")
        return time.perf_counter() - t


def bench_overhead(args) -> None:
    """`overhead_case` per site preset, in a fresh process per run, for each lnfm tree of `--trees`
    (this checkout by default; another checkout's lnfm gives an A/B), rounds interleaved."""
    import os
    import statistics
    import subprocess
    import sys
    from pathlib import Path

    root, ct, shape, spacing = bench_ct(args, "overhead")
    here = Path(__file__).resolve()
    trees = [Path(t).resolve() for t in args.trees.split(",")] if args.trees else [here.parents[1]]
    print(f"CT {shape} at {spacing} mm; predict_case with a free network, fresh process per run, "
          f"{args.rounds} interleaved rounds (seconds)")
    for site in args.overhead.split(","):
        export = root / f"export_{site}"
        write_export(site, export)
        runs = {t: [] for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                proc = subprocess.run([sys.executable, str(here), "--overhead-case", str(export), str(ct)],
                                      capture_output=True, text=True, check=True,
                                      env=dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{here.parent}"))
                runs[tree].append(float(proc.stdout.split()[-1]))
        for tree, times in runs.items():
            print(f"  {site} {tree}: median {statistics.median(times):.1f} ({', '.join(f'{t:.1f}' for t in times)})")


SAME_NET = "MONAI sliding_window_inference + the same network in PyTorch"


def bench_pipeline(args) -> None:
    """Stage times of `lnfm predict` per backend, and the sliding window against MONAI + a UNet of equal cost."""
    import statistics

    keep_onednn_off()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from monai.inferers import sliding_window_inference as monai_swi
    from monai.networks.nets import UNet
    from torch.utils.flop_counter import FlopCounterMode

    from lnfm.data.loader import LoaderConfig, normalize
    from lnfm.data.prepare import preprocess_case
    from lnfm.eval.inference import sliding_window_inference
    from lnfm.eval.postprocess import postprocess
    from lnfm.jobs import predict as pr
    from lnfm.jobs.export import load_export
    from lnfm.train.mfu import forward_flops

    root, ct, shape, spacing = bench_ct(args, "pipeline")
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    for site in args.pipeline.split(","):
        export = root / f"export_{site}"
        write_export(site, export)
        model = load_export(export).model
        graphdef, state = nnx.split(model)
        fns, meta = {}, None
        for backend in args.backends.split(","):
            t = time.perf_counter()
            fns[backend], meta = pr.load_predictor(export, backend)
            print(f"{site} {backend}: load {time.perf_counter() - t:.1f} s", flush=True)
        roi, inf = tuple(meta.preprocessing.patch_size), meta.inference
        ours_flops = forward_flops(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                   jax.ShapeDtypeStruct((1, *roi, 1), jnp.float32))
        unet = UNet(3, 1, meta.num_classes, channels=channels, strides=(2,) * (len(channels) - 1),
                    num_res_units=2).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(torch.zeros(1, 1, *roi))
        print(f"{site}: {meta.model.arch}-{meta.model.size} + {meta.head.kind} head "
              f"{ours_flops / 1e9:.1f} GFLOP/window; MONAI UNet {channels} "
              f"{counter.get_total_flops() / 1e9:.1f} GFLOP/window; roi {roi}, overlap {inf.overlap}, "
              f"window batch {inf.sw_batch_size}, sigma {inf.sigma_scale}", flush=True)

        stages = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            stages[name] = time.perf_counter() - t0
            return out

        vol = timed("read + check", lambda: pr.read_scan([str(ct)], meta))
        pre = meta.preprocessing
        data, _, geometry = timed("RAS + resample + body crop", lambda: preprocess_case(vol, pre.contract))
        norm = LoaderConfig(hu_window=pre.normalization.hu_window, pet_scale=pre.normalization.pet_scale)
        image = timed("normalise", lambda: normalize(data, norm, list(meta.channels)))
        print(f"{site}: model grid {image.shape[:3]}", flush=True)
        x_torch = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)[None]))

        def ours(fn):
            return sliding_window_inference(fn, image, roi, overlap=inf.overlap, mode=inf.mode,
                                            sigma_scale=inf.sigma_scale, sw_batch_size=inf.sw_batch_size,
                                            num_classes=meta.num_classes)

        def theirs(net=unet):
            with torch.no_grad():
                return monai_swi(x_torch, roi, inf.sw_batch_size, net, overlap=inf.overlap, mode="gaussian",
                                 sigma_scale=inf.sigma_scale)

        arms = {f"lnfm sliding window, {b}": (lambda fn=fn: ours(fn)) for b, fn in fns.items()}
        arms["MONAI sliding_window_inference + UNet"] = theirs
        if args.same_net:  # our network itself in PyTorch (bench/torch_segmenter.py), softmax as our fn has
            from torch_segmenter import from_lnfm

            twin_logits = from_lnfm(model, roi).eval()
            arms[SAME_NET] = lambda: theirs(lambda x: torch.softmax(twin_logits(x), dim=1))
        batch = np.zeros((inf.sw_batch_size, *roi, 1), np.float32)
        for b, fn in fns.items():  # JIT compilation (jax) on one window batch, outside the timing
            t0 = time.perf_counter()
            fn(batch)
            print(f"  {b}: first window batch {time.perf_counter() - t0:.1f} s", flush=True)
        times, outputs = {name: [] for name in arms}, {}
        for _ in range(args.rounds):
            for name, run in arms.items():
                t0 = time.perf_counter()
                outputs[name] = run()
                times[name].append(time.perf_counter() - t0)
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
        ours_out = [v for k, v in outputs.items() if not k.startswith("MONAI")]
        if SAME_NET in outputs:
            twin = outputs[SAME_NET][0].numpy().transpose(1, 2, 3, 0)
            print(f"  same network, MONAI vs lnfm sliding window: max |probability difference| "
                  f"{float(np.abs(twin - ours_out[0]).max()):.1e}", flush=True)
        if len(ours_out) == 2:
            a, b = (np.argmax(o, -1) for o in ours_out)
            dice = 2 * np.sum((a > 0) & (b > 0)) / max(1, np.sum(a > 0) + np.sum(b > 0))
            print(f"  backends: max |probability difference| {float(np.abs(ours_out[0] - ours_out[1]).max()):.1e}, "
                  f"foreground Dice {dice:.4f}")
        probs = ours_out[0]
        labels = np.argmax(probs, axis=-1).astype(np.uint8)
        hu = data[..., 0]
        keep = timed("argmax + post-processing", lambda: postprocess(np.argmax(probs, -1) > 0, geometry["spacing"],
                                                                      meta.postprocess, hu=hu))
        labels = labels * keep
        src = timed("labels back to the source grid", lambda: pr.restore_to_source(labels, geometry, order=0))
        pred = pr.Prediction(src.astype(np.uint8), np.asarray(vol.affine), vol.data[..., 0], probs[..., 1], geometry)
        timed("write mask .nii.gz", lambda: pr.write_outputs(pred, meta, root / f"{site}_mask.nii.gz"))
        for name, t in stages.items():
            print(f"  {name}: {t:.2f} s")
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, t in med.items():
            print(f"  {name}: {t:.2f} s (rounds {', '.join(f'{v:.2f}' for v in times[name])})")
        for peer in ("MONAI sliding_window_inference + UNet", SAME_NET):
            if peer not in med:
                continue
            for name, t in med.items():
                if not name.startswith("MONAI"):
                    print(f"  {peer} / {name} = {med[peer] / t:.2f}x", flush=True)


def bench_networks(args) -> None:
    """One batch of windows through each site preset's network, per backend (same export, same batch)."""
    import tempfile
    from pathlib import Path

    from lnfm.jobs.predict import load_predictor

    root = Path(tempfile.mkdtemp(prefix="lnfm_bench_networks_"))
    variants = [(site, head) for site in args.networks.split(",") for head in (args.heads or "").split(",")]
    for site, head in variants:
        export = root / f"{site}_{head}"
        model = write_export(site, export, head_overrides(head))
        site = f"{site} ({head} head)" if head else site
        outputs = {}
        for backend in args.backends.split(","):
            t = time.perf_counter()
            fn, meta = load_predictor(export, backend)
            x = np.random.default_rng(0).normal(size=(args.batch, *meta.preprocessing.patch_size, 1))
            x = x.astype(np.float32)
            outputs[backend] = fn(x)
            first = time.perf_counter() - t
            best = np.inf
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn(x)
                best = min(best, time.perf_counter() - t)
            print(f"{site} {backend}: load + first batch {first:.1f} s, batch of {args.batch} windows {best:.2f} s",
                  flush=True)
        if len(outputs) == 2:
            a, b = outputs.values()
            print(f"{site}: max |probability difference| between backends {float(np.abs(a - b).max()):.1e}")
        if args.same_net:
            same_net_batch(model, x, outputs, site, args.repeat)


def same_net_batch(model, x: np.ndarray, outputs: dict, site: str, repeat: int) -> None:
    """The same window batch through our network rebuilt in PyTorch (bench/torch_segmenter.py, the
    same weights; 2 threads, inference mode), channels-first and channels_last_3d, softmax included."""
    import torch
    from torch_segmenter import channels_first, from_lnfm

    torch.set_num_threads(2)
    twin = from_lnfm(model, x.shape[1:4]).eval()
    xt = channels_first(x)
    for layout in ("channels-first", "channels_last_3d"):
        if layout == "channels_last_3d":
            twin, xt = twin.to(memory_format=torch.channels_last_3d), xt.to(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            probs = torch.softmax(twin(xt), dim=1).permute(0, 2, 3, 4, 1).numpy()
            best = np.inf
            for _ in range(repeat):
                t = time.perf_counter()
                torch.softmax(twin(xt), dim=1)
                best = min(best, time.perf_counter() - t)
        diff = max(float(np.abs(probs - o).max()) for o in outputs.values())
        print(f"{site} PyTorch, same network ({layout}): batch of {len(x)} windows {best:.2f} s; "
              f"max |probability difference| to the backends above {diff:.1e}", flush=True)


def bench_onnx_files(args) -> None:
    """One window batch through each given model.onnx on ONNX Runtime (2 threads, as predict), the
    files alternated over `--rounds` rounds with one session alive at a time, so exports written by
    two versions of the code compare on the same machine state."""
    import gc
    import statistics

    import onnx

    from lnfm.eval.backends import onnx_network

    paths = args.onnx_files.split(",")
    times = {p: [] for p in paths}
    for _ in range(args.rounds):
        for path in paths:
            fn = onnx_network(path)
            shape = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape
            x = np.random.default_rng(0).random((args.batch, *[d.dim_value for d in shape.dim[1:]]), np.float32)
            fn(x)  # warm-up
            best = np.inf
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn(x)
                best = min(best, time.perf_counter() - t)
            times[path].append(best / args.batch)
            del fn
            gc.collect()
    for path in paths:
        print(f"{path}: {statistics.median(times[path]):.3f} s per window (median of rounds; rounds "
              f"{', '.join(f'{t:.3f}' for t in times[path])})", flush=True)


def keep_onednn_off() -> None:
    """For the modes that run PyTorch in this process: LNFM's oneDNN convolutions (lnfm.models.onednn) would leave
    OpenMP teams in the shared libgomp that slow PyTorch's arms 2x, so LNFM's JAX arms run XLA's own forms there;
    bench/train_step.py --same-net times oneDNN's against PyTorch in separate processes. (Imported here: the
    predict timings' own processes must not pay for JAX.)"""
    from lnfm.models import onednn

    onednn.keep_off()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="160,160,96")
    ap.add_argument("--roi", default="64,64,32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--predict", default=None, help="comma-separated site presets: time `lnfm predict` instead")
    ap.add_argument("--backends", default="onnxruntime,jax", help="with --predict: backends to time")
    ap.add_argument("--predict-overlaps", default="model",
                    help="with --predict: comma-separated window overlaps to time ('model': the export's own)")
    ap.add_argument("--ct-shape", default="512,512,300", help="with --predict: CT size in voxels")
    ap.add_argument("--ct-spacing", default="0.8,0.8,1.5", help="with --predict: CT spacing in mm")
    ap.add_argument("--ct-source", default="example", choices=("example", "siemens"),
                    help="with --predict or --overhead: the real CT resampled to --ct-shape (see write_ct)")
    ap.add_argument("--predict-rounds", type=int, default=1, help="with --predict: runs per tree, interleaved")
    ap.add_argument("--networks", default=None, help="comma-separated site presets: one window batch per backend")
    ap.add_argument("--heads", default=None,
                    help="with --networks or --predict: comma-separated heads in place of each preset's own "
                         "(KIND or KIND:OPTION=VALUE;..., e.g. unetr:feature_size=8)")
    ap.add_argument("--onnx-files", default=None,
                    help="comma-separated model.onnx files: one window batch each on ONNX Runtime, alternated "
                         "(with --rounds, --repeat, --batch)")
    ap.add_argument("--overhead", default=None,
                    help="comma-separated site presets: predict's pipeline with a free network (--rounds runs)")
    ap.add_argument("--trees", default=None,
                    help="with --overhead or --predict: comma-separated checkouts whose lnfm runs (an A/B)")
    ap.add_argument("--overhead-case", nargs=2, default=None, metavar=("EXPORT", "CT"), help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", default=None, help="comma-separated site presets: stages per backend + MONAI")
    ap.add_argument("--unet-channels", default="16,32,64,128", help="with --pipeline: MONAI UNet channels")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --pipeline: interleaved sliding-window rounds; with --overhead: runs per checkout")
    ap.add_argument("--same-net", action="store_true",
                    help="with --pipeline: also MONAI's sliding window over our network rebuilt in PyTorch "
                         "(bench/torch_segmenter.py; ViT + fine head exports); with --networks: one window "
                         "batch through it")
    args = ap.parse_args()
    if args.overhead_case:
        print(f"{overhead_case(*args.overhead_case):.2f}")
        return
    if args.overhead:
        bench_overhead(args)
        return
    if args.pipeline:
        bench_pipeline(args)
        return
    if args.networks:
        bench_networks(args)
        return
    if args.onnx_files:
        bench_onnx_files(args)
        return
    if args.predict:
        bench_predict(args)
        return
    keep_onednn_off()  # the default mode: lnfm's sliding window against MONAI's, in this process
    shape = tuple(int(s) for s in args.shape.split(","))
    roi = tuple(int(s) for s in args.roi.split(","))

    import jax
    import torch
    from monai.inferers import sliding_window_inference as monai_swi

    from lnfm.eval.inference import sliding_window_inference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    predict, torch_net = build_models(1, args.width, 2)
    torch_net = torch_net.to(device)
    volume = np.random.default_rng(0).normal(size=(*shape, 1)).astype(np.float32)
    x_torch = torch.from_numpy(volume.transpose(3, 0, 1, 2)[None].copy()).to(device)
    print(f"volume {shape}, roi {roi}, overlap {args.overlap}, window batch {args.batch}; "
          f"JAX on {jax.devices()[0].platform}, PyTorch on {device}")

    def ours():
        return sliding_window_inference(predict, volume, roi, overlap=args.overlap, sw_batch_size=args.batch)

    def theirs():
        with torch.no_grad():
            y = monai_swi(x_torch, roi, args.batch, torch_net, overlap=args.overlap, mode="gaussian",
                          sigma_scale=0.125)
        if device == "cuda":
            torch.cuda.synchronize()
        return y[0].cpu().numpy().transpose(1, 2, 3, 0)

    def best_time(fn):
        out = fn()  # warm-up: JIT compile / cuDNN autotune
        best = np.inf
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best, out

    def compare(label, ours_fn, theirs_fn):
        t_ours, y_ours = best_time(ours_fn)
        t_theirs, y_theirs = best_time(theirs_fn)
        diff = float(np.abs(y_ours - y_theirs).max())
        print(f"{label}: lnfm {t_ours:.2f} s, MONAI {t_theirs:.2f} s, MONAI / lnfm = {t_theirs / t_ours:.2f}x "
              f"(max |diff| {diff:.1e}, output scale {float(np.abs(y_theirs).max()):.2f})")

    batch = np.zeros((args.batch, *roi, 1), np.float32)
    t_jax, _ = best_time(lambda: predict(batch).block_until_ready())
    with torch.no_grad():
        xb = torch.zeros((args.batch, 1, *roi), device=device)
        t_torch, _ = best_time(lambda: (torch_net(xb), torch.cuda.synchronize() if device == "cuda" else None))
    print(f"one window batch through the network: JAX {t_jax * 1e3:.0f} ms, PyTorch {t_torch * 1e3:.0f} ms")
    compare("conv net", ours, theirs)

    # Per-voxel linear map: the cost left is the sliding-window machinery itself.
    w = np.array([[1.5, -0.5]], np.float32)
    lin_jax = jax.jit(lambda x: x @ w)
    lin_torch = torch.nn.Conv3d(1, 2, 1, bias=False).to(device)
    lin_torch.weight.data = torch.from_numpy(w.T.reshape(2, 1, 1, 1, 1).copy()).to(device)

    def ours_lin():
        return sliding_window_inference(lin_jax, volume, roi, overlap=args.overlap, sw_batch_size=args.batch)

    def theirs_lin():
        with torch.no_grad():
            y = monai_swi(x_torch, roi, args.batch, lin_torch, overlap=args.overlap, mode="gaussian",
                          sigma_scale=0.125)
        return y[0].cpu().numpy().transpose(1, 2, 3, 0)

    compare("per-voxel linear map", ours_lin, theirs_lin)


if __name__ == "__main__":
    main()
