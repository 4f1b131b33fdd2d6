"""Backends that apply an exported network to a batch of windows.

A backend is a callable `fn(x) -> probabilities`: x is a batch of normalised
windows (B, *patch, C) float32, the result (B, *patch, K) float32 softmax
probabilities. Sliding-window inference takes any such callable.

- "jax": the Flax model jitted (`jax_network`), or a stablehlo export's serialized
  function (`stablehlo_network`); on a GPU when JAX has one.
- "onnxruntime": an onnx export's `model.onnx` on ONNX Runtime's CPU kernels.
- "auto": JAX on an accelerator. On a CPU-only machine, ONNX Runtime when the export
  holds `model.onnx`: it ran every head's window batch as fast as XLA:CPU or faster
  (1.1x the light head, 1.5x the linear probe, 3.2x UNETR, 3.7x the fine head;
  docs/benchmarks.md), so timing both per run, which costs JAX's compilation
  (7-20 s), buys nothing. Without `model.onnx`: JAX.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lnfm.errors import LnfmError
from lnfm.eval.predictor import softmax_fn
from lnfm.models.export_onnx import ONNX_INPUT, ONNX_OUTPUT

BACKENDS = ("auto", "jax", "onnxruntime")
Network = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger(__name__)


class BackendError(LnfmError, ValueError):
    """A backend the export or the machine cannot provide; one line naming the export."""


def accelerator_runtime_installed() -> bool:
    """Whether JAX could find any backend but its CPU one: a PJRT plugin (the `jax_plugins`
    namespace package or entry points, PJRT_NAMES_AND_LIBRARY_PATHS) or libtpu, the places
    jax._src.xla_bridge looks. Answered without importing JAX, which would add 2-3 s to every
    CPU prediction."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") or os.environ.get("TPU_LIBRARY_PATH"):
        return True
    if importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def accelerator_present() -> bool:
    if not accelerator_runtime_installed():
        return False
    import jax

    return jax.default_backend() != "cpu"


def choose_backend(requested: str, export_dir: str | Path, export_format: str, has_onnx: bool) -> str:
    """The backend `requested` resolves to for an export (its format, whether it holds model.onnx)
    on this machine."""
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend '{requested}' (choices: {', '.join(BACKENDS)})")
    if requested == "onnxruntime" and not has_onnx:
        raise BackendError(f"{export_dir}: a {export_format} export has no model.onnx for the onnxruntime "
                           f"backend (export with --format onnx, or use --backend jax)")
    if requested == "auto":
        return "onnxruntime" if has_onnx and not accelerator_present() else "jax"
    return requested


def _onnx_session(path: str | Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # shape-merge notices about the symbolic batch are not errors
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (InvalidProtobuf, InvalidGraph) as e:  # a damaged file (its checksum rewritten to match): the user's
        reason = str(e).rsplit(":", 1)[-1].strip() or type(e).__name__
        raise BackendError(f"{path}: not a readable ONNX model ({reason})") from None


def onnx_network(path: str | Path, threads: int | None = None) -> Network:
    """`model.onnx` on onnxruntime's CPU kernels (all graph optimisations; `threads` intra-op threads in all,
    default: the cores this process may use).

    A batch of two or more windows is split between two sessions of half the threads each, run side by
    side: on 2 cores a window took 0.515 s that way against 0.575 s as a batch of 2 on one 2-thread session
    (mediastinum preset's 160x160x96), 0.185 against 0.209 s (pelvis, 96^3) (docs/benchmarks.md): an
    operator's threads wait for each other, two sessions' do not. A single window, or any batch of a graph
    whose batch size is fixed, runs on one session with all the threads."""
    from concurrent.futures import ThreadPoolExecutor

    cores = int(threads) if threads else len(os.sched_getaffinity(0))
    whole = _onnx_session(path, cores)  # also checks the file before anything runs
    halves: list = []
    symbolic = not isinstance(whole.get_inputs()[0].shape[0], int)  # a graph of fixed batch takes only that batch
    pool = ThreadPoolExecutor(2) if cores >= 2 and symbolic else None

    def run(session, x):
        return session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(x, np.float32)})[0]

    def network(x):
        x = np.asarray(x, np.float32)
        if pool is None or len(x) < 2:
            return run(whole, x)
        if not halves:  # made on the first batch that uses them
            halves.extend(_onnx_session(path, cores // 2) for _ in range(2))
        mid = (len(x) + 1) // 2
        return np.concatenate(list(pool.map(run, halves, (x[:mid], x[mid:]))))

    return network


def jax_network(model) -> Network:
    """A Flax NNX segmenter through the one jitted softmax (`lnfm.eval.predictor.softmax_fn`),
    on JAX's default device."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.device_put(state)
    probabilities = softmax_fn(graphdef)
    return lambda x: np.asarray(probabilities((state,), x))


def stablehlo_network(exported) -> Network:
    """A deserialized `jax.export.Exported` inference function."""
    return lambda x: np.asarray(exported.call(np.asarray(x, np.float32)))
