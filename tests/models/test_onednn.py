"""oneDNN's 3D convolutions (lnfm/models/onednn.py) against scipy and XLA's own convolution.

Run where the library is built (`make dev-install` with libdnnl-dev installed); skipped elsewhere,
where the convolutions keep XLA's forms (tests/models/test_conv_forms.py)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from lnfm.models import conv_forms, onednn

needs_library = pytest.mark.skipif(not onednn.available(),
                                   reason="oneDNN library not built (apt install libdnnl-dev; make dev-install)")


def _case(b, shape, cin, cout, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, *shape, cin)).astype(np.float32)
    w = rng.normal(size=(k, k, k, cin, cout)).astype(np.float32)
    return x, w


def _scipy_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """'SAME' cross-correlation with zero padding, summed over input channels, in float64."""
    b, cout = x.shape[0], w.shape[-1]
    out = np.zeros(x.shape[:4] + (cout,))
    for n in range(b):
        for o in range(cout):
            for i in range(x.shape[-1]):
                out[n, ..., o] += ndimage.correlate(x[n, ..., i].astype(np.float64), w[..., i, o].astype(np.float64),
                                                    mode="constant", cval=0.0)
    return out


@needs_library
@pytest.mark.parametrize("b, shape, cin, cout, k", [
    (2, (9, 7, 6), 3, 5, 3),  # odd, unequal sides
    (1, (8, 8, 8), 1, 8, 3),  # the image stem's one channel
    (1, (7, 9, 8), 4, 2, 5),  # a 5^3 kernel
])
def test_forward_equals_scipy(b, shape, cin, cout, k):
    x, w = _case(b, shape, cin, cout, k)
    got = np.asarray(jax.jit(onednn.onednn_conv)(x, w))
    np.testing.assert_allclose(got, _scipy_conv(x, w), rtol=1e-4, atol=1e-4)


@needs_library
@pytest.mark.parametrize("b, shape, cin, cout, k", [
    (2, (10, 8, 6), 16, 8, 3),  # the fine head's full-resolution block's channels
    (1, (6, 7, 5), 3, 4, 5),
])
def test_gradients_equal_xla(b, shape, cin, cout, k):
    x, w = _case(b, shape, cin, cout, k, seed=1)
    probe = np.random.default_rng(2).normal(size=x.shape[:4] + (cout,)).astype(np.float32)

    def loss(conv):
        return lambda x_, w_: jnp.sum(jnp.sin(conv(x_, w_)) * probe)

    got = jax.jit(jax.grad(loss(onednn.onednn_conv), (0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(conv_forms.native_conv), (0, 1)))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-3 * float(jnp.abs(r).max()))


@needs_library
def test_dense_conv_takes_onednn_and_export_does_not(monkeypatch):
    """The heads' dense convolutions go to oneDNN on one device; inside `disabled()` (the StableHLO
    export) and `native_convs()` (ONNX), or on several devices, no custom call is traced."""
    x, w = _case(1, (6, 6, 6), 2, 3, 3)
    assert jax.device_count() > 1  # the suite's virtual devices: XLA's forms
    assert "lnfm_conv3d" not in jax.jit(lambda a, b: conv_forms.dense_conv(a, b)).lower(x, w).as_text()
    monkeypatch.setattr(onednn.jax, "device_count", lambda: 1)

    def calls(ctx=None) -> bool:  # a new function each time: jit caches a function's trace
        with ctx or contextlib.nullcontext():
            return "lnfm_conv3d_forward" in jax.jit(lambda a, b: conv_forms.dense_conv(a, b)).lower(x, w).as_text()

    assert calls()
    assert not calls(onednn.disabled())
    assert not calls(conv_forms.native_convs())
    monkeypatch.setattr(onednn, "_KEPT_OFF", [False])  # keep_off() lasts for the process: undone after the test
    onednn.keep_off()
    assert not calls()


@needs_library
def test_vmapped_and_batched_calls_agree():
    x, w = _case(3, (5, 6, 7), 2, 2, 3, seed=3)
    batched = jax.jit(onednn.onednn_conv)(x, w)
    mapped = jax.jit(jax.vmap(lambda xi: onednn.onednn_conv(xi[None], w)[0]))(x)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(batched), rtol=1e-6, atol=1e-5)


_ONE_DEVICE_STEP = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from lnfm.jobs.finetune import load_finetune_config
from lnfm.models import onednn
from lnfm.models.segmenter import segmenter_from_config
from lnfm.segmentation.losses import segmentation_loss

cfg = load_finetune_config("pelvis", quick=True)
model = segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 32, 32, 32, 1)).astype(np.float32)
y = (rng.random((2, 32, 32, 32)) < 0.1).astype(np.int32)

def loss(p):
    out = nnx.merge(graphdef, p, rest)(x)
    return segmentation_loss(cfg.loss, out[0] if isinstance(out, tuple) else out, y)

step = jax.jit(jax.value_and_grad(loss))
calls = step.lower(params).as_text().count("lnfm_conv3d_")
with onednn.disabled():
    ref_step = jax.jit(jax.value_and_grad(loss))
    ref_calls = ref_step.lower(params).as_text().count("lnfm_conv3d_")
    ref = ref_step(params)
got = step(params)
from lnfm.train.mfu import forward_flops
flops = forward_flops(loss, params)  # counted with oneDNN on: must still see the convolutions' FLOPs
with onednn.disabled():
    xla_flops = jax.jit(lambda p: loss(p)).lower(params).cost_analysis()["flops"]
grads = [(float(jnp.abs(a - b).max()), float(jnp.abs(b).max()))
         for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]))]
print(json.dumps({"devices": jax.device_count(), "calls": calls, "ref_calls": ref_calls,
                  "loss": [float(got[0]), float(ref[0])], "grads": grads,
                  "flops": [flops, float(xla_flops)]}))
"""


@needs_library
def test_the_cpu_segmenter_on_one_device_trains_through_onednn():
    """On one CPU device (a finetune job's mesh here) the CPU preset's segmenter runs its dense
    convolutions through oneDNN, and its loss and every gradient equal those of XLA's forms."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="")  # the suite's 8 virtual devices would turn oneDNN off
    out = subprocess.run([sys.executable, "-c", _ONE_DEVICE_STEP], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 1
    assert res["calls"] >= 3 and res["ref_calls"] == 0  # forward, input and kernel gradients at least
    assert abs(res["loss"][0] - res["loss"][1]) <= 1e-5 * abs(res["loss"][1])
    for err, size in res["grads"]:
        assert err <= 2e-3 * size + 1e-7
    assert res["flops"][0] == res["flops"][1] > 1e9  # the planner's FLOPs still count the convolutions


def test_build_if_available_without_onednn_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """`make` runs `build --if-available` on every machine: where no compiler finds oneDNN's header it prints one
    line and succeeds, and no library appears (runs without the library built too)."""
    monkeypatch.setattr(onednn, "SOURCE", tmp_path / "onednn_conv.cc")
    onednn.SOURCE.write_text("// not built here\n")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert onednn.main(["build", "--if-available"]) == 0
    assert capsys.readouterr().out == ("oneDNN not found (Debian/Ubuntu: apt install libdnnl-dev): 3D convolutions "
                                       "keep XLA's forms\n")
    assert list(tmp_path.iterdir()) == [onednn.SOURCE]
    assert onednn.main(["bulid"]) == 2


def test_a_failed_build_says_so_in_one_line_and_leaves_no_library(tmp_path, monkeypatch, capsys):
    """Headers found but the compile fails (here: a source that does not compile): `make`'s `--if-available`
    goes on, a build asked for by hand exits 1; neither leaves a library or a temporary file."""
    monkeypatch.setattr(onednn, "SOURCE", tmp_path / "onednn_conv.cc")
    onednn.SOURCE.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "headers_found", lambda: True)
    assert onednn.main(["build", "--if-available"]) == 0
    assert capsys.readouterr().out.startswith("oneDNN kernels not built (")
    assert onednn.main(["build"]) == 1
    assert list(tmp_path.iterdir()) == [onednn.SOURCE]
