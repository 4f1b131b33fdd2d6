"""bench/conv.py --onnx: the slice form's ONNX graphs, run as predict runs model.onnx, compute the 3D convolution."""

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_slice_form_graphs_equal_scipy_correlation(tmp_path):
    import onnx
    from conv import onnx_graphs

    from lnfm.eval.backends import onnx_network

    b, cin, cout, d, h, w = 2, 3, 4, 5, 6, 7
    rng = np.random.default_rng(0)
    w3 = rng.standard_normal((cout, cin, 3, 3, 3)).astype(np.float32)
    x = rng.standard_normal((b, cin, d, h, w)).astype(np.float32)
    # 'SAME' zero-padded cross-correlation, summed over input channels: the reference, independent of ONNX.
    ref = np.stack([np.stack([sum(ndimage.correlate(x[n, c].astype(np.float64), w3[o, c].astype(np.float64),
                                                    mode="constant") for c in range(cin))
                              for o in range(cout)]) for n in range(b)])
    inputs = {"ncdhw": x, "slices": np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(b * d, cin, h, w))}
    graphs = onnx_graphs(b, cin, cout, d, h, w, w3)
    assert set(graphs) == {"ORT Conv 3D", "slice form, slice layout", "slice form + transposes"}
    for i, (name, (model, layout)) in enumerate(graphs.items()):
        onnx.save(model, tmp_path / f"{i}.onnx")
        y = onnx_network(tmp_path / f"{i}.onnx")(inputs[layout])
        if layout == "slices":
            y = y.reshape(b, d, cout, h, w).transpose(0, 2, 1, 3, 4)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4, err_msg=name)
