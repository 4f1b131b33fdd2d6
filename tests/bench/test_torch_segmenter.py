"""bench/torch_segmenter.py: the PyTorch twin of the pelvis CPU-preset (--quick) segmenter computes
LNFM's function: same logits, same finetuning loss, same gradients, from copied weights.

Inputs are two 32^3 windows of the real CT of the shared data folder (pelvic soft-tissue window,
organ-map foreground as labels) when it is present, random volumes otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lnfm.data.shared import shared_data_dir
from lnfm.jobs.finetune import load_finetune_config
from lnfm.models.segmenter import segmenter_from_config
from lnfm.segmentation.losses import segmentation_loss

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import torch_segmenter as ts  # noqa: E402

CT = "ct/totalsegmentator/example_ct.nii.gz"
SEG = "ct/totalsegmentator/example_seg_fast_force_split.nii.gz"
BATCH = 2
# Gradient error / gradient size. Float32 rounding gives up to ~7e-4 for the encoder's gradients on the real CT,
# which reach it through five instance norms whose backward subtracts nearly equal terms; a wrong
# layout or a missing layer gives errors of order 1.
GRAD_RTOL = 2e-3


def _random_params(graphdef, params, rest, seed: int = 0):
    """The segmenter with every parameter random (biases and norm scales too, unlike its init),
    filled from numpy: no JAX random op to compile."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def _inputs(cfg, patch: int):
    """(images (B, X, Y, Z, 1) float32, labels (B, X, Y, Z) int32, source)."""
    root = shared_data_dir()
    if root is not None and (root / CT).is_file() and (root / SEG).is_file():
        import nibabel as nib

        hu = np.asarray(nib.load(str(root / CT)).dataobj, np.float32)
        seg = np.asarray(nib.load(str(root / SEG)).dataobj)
        lo, hi = cfg.site.window
        image = np.clip((hu - lo) / (hi - lo), 0.0, 1.0)
        starts = [tuple((n - patch) // 2 for n in hu.shape), (10, 20, 40)]
        crop = lambda a, s: a[s[0]:s[0] + patch, s[1]:s[1] + patch, s[2]:s[2] + patch]
        images = np.stack([crop(image, s) for s in starts])[..., None]
        labels = np.stack([crop(seg, s) > 0 for s in starts]).astype(np.int32)
        return images.astype(np.float32), labels, "real CT"
    rng = np.random.default_rng(1)
    images = rng.standard_normal((BATCH, patch, patch, patch, 1)).astype(np.float32)
    labels = (rng.random((BATCH, patch, patch, patch)) < 0.1).astype(np.int32)
    return images, labels, "random"


@pytest.mark.shared
@pytest.mark.parametrize("top_kernel,convs_per_level", [(3, 1), (1, 1), (3, 2)])
def test_torch_twin_matches_the_pelvis_cpu_preset_segmenter_logits_loss_and_gradients(top_kernel, convs_per_level):
    cfg = load_finetune_config("pelvis", [f"head.options.top_kernel={top_kernel}",
                                          f"head.options.convs_per_level={convs_per_level}"], quick=True)
    assert cfg.model.size == "tiny" and cfg.head.kind == "fine" and cfg.loss.name == "dice_ce"
    patch = cfg.site.patch[0]
    abstract = nnx.eval_shape(lambda: segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels),
                                                            nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    model = _random_params(graphdef, params, rest)
    images, labels, source = _inputs(cfg, patch)
    assert images.shape == (BATCH, patch, patch, patch, 1) and 0 < labels.mean() < 1, source

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return segmentation_loss(cfg.loss, logits, y), logits

    (loss_j, logits_j), grads_j = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, images, labels)
    grads_j = {tuple(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads_j)}

    net = ts.from_lnfm(model)
    jax_paths = {tuple(path) for path, _ in nnx.to_flat_state(params)}
    assert {path for path, _ in net.lnfm_params.values()} == jax_paths  # every parameter, once
    logits_t = net(ts.channels_first(images))
    loss_t = ts.dice_ce_loss(cfg.loss)(logits_t, ts.label_tensor(labels))
    loss_t.backward()

    logits_t = logits_t.detach().permute(0, 2, 3, 4, 1).numpy()
    err = float(np.abs(np.asarray(logits_j) - logits_t).max())
    assert err <= 1e-4, f"{source}: logits differ by {err:.2e} (scale {np.abs(logits_t).max():.2f})"
    assert float(loss_t.detach()) == pytest.approx(float(loss_j), rel=1e-5, abs=1e-6)

    # Each gradient's error relative to its own size; gradients that are zero in exact arithmetic
    # (biases whose shift an instance norm removes: head.fuse.bias, and vit.norm.bias that only
    # reaches the fuse conv) are rounding noise in both and are compared to the largest gradient.
    torch_params = dict(net.named_parameters())
    grads_t = {name: torch_params[name].grad.numpy() for name in net.lnfm_params
               if torch_params[name].grad is not None}
    scale = max(float(np.abs(g).max()) for g in grads_t.values())
    worst = {}
    for name, g_t in grads_t.items():
        path, kind = net.lnfm_params[name]
        g_j = ts.torch_layout(grads_j[path], kind)
        size = float(np.abs(g_t).max())
        worst[name] = float(np.abs(g_j - g_t).max()) / (size if size > 1e-5 * scale else scale)
    for name in ("vit.patch_embedding.patch_embeddings.weight", "vit.blocks.0.attn.qkv.weight",
                 "vit.blocks.3.mlp.linear2.weight", "vit.norm.weight", "head.path.0.conv.weight",
                 "head.path.1.0.weight", "head.fuse.weight", "head.ups.2.weight", "head.blocks.2.norm.weight",
                 "head.blocks.2.skip.weight" if top_kernel == 1 else "head.blocks.2.conv.weight",
                 *(("head.path.2.2.conv.weight", "head.more.1.0.conv.weight", "head.more.0.0.norm.weight")
                   if convs_per_level == 2 else ())):
        assert name in worst, name
    bad = {k: v for k, v in worst.items() if v > GRAD_RTOL}
    assert not bad, f"{source}: gradients differ (max error / max |grad|): {bad}"


def test_torch_twin_pads_and_crops_like_the_segmenter():
    """A 30^3 input is zero-padded to 32^3 at the far end and the logits cropped back."""
    cfg = load_finetune_config("pelvis", quick=True)
    abstract = nnx.eval_shape(lambda: segmenter_from_config(cfg.model, cfg.head, 2, nnx.Rngs(0)))
    model = _random_params(*nnx.split(abstract, nnx.Param, ...), seed=2)
    x = np.random.default_rng(3).random((1, 30, 30, 30, 1), dtype=np.float32)
    net = ts.from_lnfm(model, (30, 30, 30), sdpa=False)
    assert net.spatial == (32, 32, 32)
    out_t = net(ts.channels_first(x)).detach().permute(0, 2, 3, 4, 1).numpy()
    out_j = np.asarray(jax.jit(lambda m, v: m(v))(model, x))
    assert out_t.shape == out_j.shape == (1, 30, 30, 30, 2)
    assert float(np.abs(out_j - out_t).max()) <= 1e-4
