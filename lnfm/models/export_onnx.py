"""The ONNX export format: the segmenter's inference function as an ONNX graph.

`model.onnx` maps a normalised patch x (B, *patch, C) float32, B dynamic, to
softmax probabilities (B, *patch, K) float32, the function of the stablehlo
format. It is converted by jax2onnx from the Flax NNX model, traced with
`native_convs()` so every convolution is one ONNX Conv (ONNX Runtime's kernels
are fast; the shifted-sum forms JAX uses on CPU would be 27 nodes each). Opset
`ONNX_OPSET`; the parameters are initializers inside the one file.

jax2onnx 0.17 lowers 1D and 2D `conv_general_dilated` only: its lowering is
dimension-generic apart from its layout tables, which `_allow_3d_convs` extends
with the 3D layouts (NDHWC inputs, DHWIO kernels -> ONNX NCDHW / OIDHW). Parity
with JAX is tested on real CT patches (tests/jobs/test_export_onnx.py). It runs with
`lnfm.eval.backends.onnx_network`.
"""

from __future__ import annotations

from pathlib import Path

ONNX_INPUT, ONNX_OUTPUT = "patch", "probabilities"  # tensor names of model.onnx

ONNX_FILE = "model.onnx"
ONNX_OPSET = 21  # ONNX Runtime >= 1.16 runs it


def _allow_3d_convs() -> None:
    from jax2onnx.plugins.jax.lax import conv

    if "NDHWC" in conv._LAYOUT_MAP:
        return
    for table in (conv._LAYOUT_MAP, conv._OUTPUT_LAYOUT_MAP):
        table.update({(0, 4, 1, 2, 3): "NDHWC", (0, 1, 2, 3, 4): "NCDHW", "NDHWC": "NDHWC", "NCDHW": "NCDHW"})
    conv._FILTER_LAYOUT_MAP.update({(4, 3, 0, 1, 2): "DHWIO", (0, 1, 2, 3, 4): "OIDHW", "DHWIO": "DHWIO",
                                    "OIDHW": "OIDHW"})
    input_2d, kernel_2d = conv._canonical_input_layout, conv._canonical_kernel_layout

    def input_layout(layout: str) -> str:
        return "NCDHW" if len(layout) == 5 else input_2d(layout)

    def kernel_layout(layout: str, *, is_transpose: bool) -> str:
        if len(layout) == 5:
            return "IODHW" if is_transpose else "OIDHW"
        return kernel_2d(layout, is_transpose=is_transpose)

    conv._canonical_input_layout, conv._canonical_kernel_layout = input_layout, kernel_layout


def write_onnx(path: Path, model, patch: tuple[int, int, int], channels: int) -> dict:
    """Convert probabilities = softmax(model(x)) for x (B, *patch, C) to `path`; returns model.json's entry."""
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    from lnfm.models.conv_forms import native_convs  # here: reading this module's names needs no JAX

    _allow_3d_convs()

    def infer(x):
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    with native_convs():
        proto = to_onnx(infer, [("B", *patch, channels)], model_name="lnfm_segmenter", opset=ONNX_OPSET,
                        input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
    path.write_bytes(proto.SerializeToString())
    return {"opset": ONNX_OPSET, "input": ONNX_INPUT, "output": ONNX_OUTPUT,
            "input_shape": ["B", *patch, channels], "input_dtype": "float32",
            "output_description": "softmax probabilities (B, X, Y, Z, num_classes), float32"}
