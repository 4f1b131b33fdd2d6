"""`lnfm export --format onnx` and `lnfm predict --backend`: parity with JAX on real CT patches
run through the model's own preprocessing, identical masks across backends."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from export_helpers import tiny  # noqa: F401  (session fixture)
from scipy import ndimage

from lnfm.jobs import predict as pr
from lnfm.cli import run_job
from lnfm.eval import backends
from lnfm.jobs.export_meta import read_meta

REPO = Path(__file__).resolve().parents[2]
CT = "ct/totalsegmentator/example_ct.nii.gz"


@pytest.fixture(scope="module")
def onnx_export(tiny, tmp_path_factory):  # noqa: F811
    from lnfm.jobs.export import export_model

    return export_model(tiny.workdir, tmp_path_factory.mktemp("onnx") / "export", "onnx")


def _real_patches(shared_data: Path, meta, n: int = 4) -> np.ndarray:
    """n windows of the real CT after predict's own preprocessing (the model.json contract: resampling,
    body crop, int16 storage, the encoder's window)."""
    from lnfm.data.loader import LoaderConfig, normalize
    from lnfm.data.prepare import preprocess_case

    pre = meta.preprocessing
    vol = pr.read_scan([str(shared_data / CT)], meta)
    data, _, _ = preprocess_case(vol, pre.contract)
    norm = LoaderConfig(hu_window=pre.normalization.hu_window, pet_scale=pre.normalization.pet_scale)
    image = normalize(data, norm, list(meta.channels))
    p = pre.patch_size
    image = np.pad(image, [(0, max(s - n_, 0)) for s, n_ in zip(p, image.shape[:3])] + [(0, 0)], mode="edge")
    rng = np.random.default_rng(0)
    starts = [[int(rng.integers(0, image.shape[a] - p[a] + 1)) for a in range(3)] for _ in range(n)]
    return np.stack([image[x:x + p[0], y:y + p[1], z:z + p[2]] for x, y, z in starts]).astype(np.float32)


def test_onnx_export_is_listed_checksummed_and_has_a_dynamic_batch(onnx_export):
    import onnx

    from lnfm.jobs.export import verify_export
    from lnfm.models.export_onnx import ONNX_OPSET

    meta = json.loads((onnx_export / "model.json").read_text())
    assert meta["format"] == "onnx" and meta["files"] == {"onnx": "model.onnx", "params": "model.safetensors"}
    assert meta["onnx"]["opset"] == ONNX_OPSET and meta["onnx"]["input_shape"] == ["B", 32, 32, 32, 1]
    assert verify_export(onnx_export) == 3  # model.json, model.onnx, model.safetensors
    graph = onnx.load(str(onnx_export / "model.onnx"))
    onnx.checker.check_model(graph)
    assert any(op.domain in ("", "ai.onnx") and op.version == ONNX_OPSET for op in graph.opset_import)
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic


def test_onnxruntime_matches_jax_on_real_ct_patches(tiny, onnx_export, shared_data):  # noqa: F811
    ort_fn, meta = pr.load_predictor(onnx_export, "onnxruntime")
    jax_fn, _ = pr.load_predictor(tiny.orbax, "jax")
    x = _real_patches(shared_data, meta)
    for batch in (x[:1], x):  # two batch sizes through the one graph
        ref = jax_fn(batch)
        got = ort_fn(batch)
        assert got.shape == ref.shape == (len(batch), 32, 32, 32, 2)
        assert np.abs(got - ref).max() <= 1e-4
        assert 0.01 < ref[..., 1].mean() < 0.99  # the patches hold both classes, not a saturated output


def test_a_batch_split_between_two_sessions_equals_one_session_in_order(onnx_export, shared_data):
    """Predict's ONNX Runtime backend runs the halves of a batch on two sessions side by side: the same
    probabilities, window by window in the batch's order, as onnxruntime's own session on the whole batch."""
    import onnxruntime as ort

    from lnfm.models.export_onnx import ONNX_INPUT, ONNX_OUTPUT

    meta = read_meta(onnx_export)
    x = _real_patches(shared_data, meta, n=3)  # odd: halves of 2 and 1
    plain = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = plain.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
    for threads in (1, 2):  # one core: no split; two: one thread per session
        got = backends.onnx_network(onnx_export / "model.onnx", threads=threads)(x)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5, threads
    single = [plain.run([ONNX_OUTPUT], {ONNX_INPUT: w[None]})[0][0] for w in x]
    assert np.abs(np.stack(single) - got).max() <= 1e-5  # each window its own, in order


@pytest.mark.slow  # jax2onnx converts each head in about a minute on 2 free cores
@pytest.mark.parametrize("head", ["light", "unetr", "fine_top1"])
def test_conv_heads_convert_and_match_jax_on_a_real_ct_patch(head, shared_data, onnx_export, tmp_path):
    """The heads' dense, depth-wise, transposed and partial convs, Sobel stem and upsampling in ONNX;
    the fine head with `top_kernel=1` (the `tiny` fixture's export covers its default)."""
    import jax
    from flax import nnx

    from lnfm.models.export_onnx import write_onnx
    from lnfm.models.config import ModelConfig
    from lnfm.models.segmenter import build_segmenter

    patch = (16, 16, 16)
    cfg = ModelConfig(size="tiny", width=32, depth=2, heads=2, patch_size=(8, 8, 8), img_size=patch)
    head, options = {"light": ("light", {"base_channels": 4}), "unetr": ("unetr", {"feature_size": 4}),
                     "fine_top1": ("fine", {"top_kernel": 1})}[head]
    model = build_segmenter(cfg, head, 2, nnx.Rngs(0), **options)
    meta = read_meta(onnx_export)  # a real contract, with this test's window size
    meta = dataclasses.replace(meta, preprocessing=dataclasses.replace(meta.preprocessing, patch_size=patch))
    x = _real_patches(shared_data, meta, n=2)
    write_onnx(tmp_path / "m.onnx", model, patch, 1)
    got = backends.onnx_network(tmp_path / "m.onnx")(x)
    ref = np.asarray(jax.nn.softmax(model(x), axis=-1))
    assert np.abs(got - ref).max() <= 1e-4


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_predict_backends_give_the_same_masks(tiny, onnx_export, shared_data, tmp_path):  # noqa: F811
    """The CLI on a real CT, once per backend, in fresh processes: same mask and node count."""
    out = {}
    for backend in ("jax", "onnxruntime"):
        path = tmp_path / f"{backend}.nii.gz"
        cmd = [sys.executable, "-m", "lnfm", "predict", "--model", str(onnx_export), "--input",
               str(shared_data / CT), "--output", str(path), "--backend", backend]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"on {backend}" in proc.stderr
        import nibabel as nib

        out[backend] = np.asarray(nib.load(path).dataobj) > 0
    a, b = out["jax"], out["onnxruntime"]
    assert a.sum() > 100  # a real prediction, not an empty mask
    assert _dice(a, b) >= 0.999
    structure = np.ones((3, 3, 3), bool)
    assert ndimage.label(a, structure)[1] == ndimage.label(b, structure)[1]


def test_backend_choice(tiny, onnx_export, monkeypatch, capsys, tmp_path):  # noqa: F811
    assert backends.choose_backend("auto", onnx_export, "onnx", True) == "onnxruntime"  # no GPU here
    assert backends.choose_backend("auto", tiny.orbax, "orbax", False) == "jax"
    monkeypatch.setattr(backends, "accelerator_present", lambda: True)
    assert backends.choose_backend("auto", onnx_export, "onnx", True) == "jax"
    scan = tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz"
    rc = run_job("predict", ["--model", str(tiny.orbax), "--input", str(scan), "--output", str(tmp_path / "m.nii.gz"),
                             "--backend", "onnxruntime"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no model.onnx" in err
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_hand_edited_window_that_the_onnx_graph_cannot_take_is_refused(onnx_export, tmp_path):
    """model.json's patch_size edited (checksums rewritten, so verification passes): ONNX Runtime would
    fail on the first window with a shape error; predict refuses the export in one line instead."""
    import shutil

    from lnfm.jobs.export import write_checksums
    from lnfm.jobs.export_meta import ExportError

    edited = Path(shutil.copytree(onnx_export, tmp_path / "export"))
    meta = json.loads((edited / "model.json").read_text())
    meta["preprocessing"]["patch_size"] = [16, 16, 16]
    (edited / "model.json").write_text(json.dumps(meta))
    (edited / "checksums.sha256").unlink()
    write_checksums(edited)
    with pytest.raises(ExportError, match=r"patch_size \[16, 16, 16\] differs from the window the ONNX graph"):
        read_meta(edited)


def _edited_copy(onnx_export, tmp_path, change) -> Path:
    """A copy of the export changed by `change(folder)`, its checksum list rewritten to match."""
    import shutil

    from lnfm.jobs.export import write_checksums

    edited = Path(shutil.copytree(onnx_export, tmp_path / "export"))
    change(edited)
    (edited / "checksums.sha256").unlink()
    write_checksums(edited)
    return edited


@pytest.mark.parametrize("damage", ["truncated", "not-onnx"])
def test_a_damaged_onnx_file_with_matching_checksums_is_one_line(onnx_export, tmp_path, capsys, damage,
                                                                shared_data):
    """ONNX Runtime's parse error was a traceback; now one line naming model.onnx, exit 2, nothing written."""
    def change(folder):
        data = (folder / "model.onnx").read_bytes()
        (folder / "model.onnx").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not onnx" * 64)

    edited = _edited_copy(onnx_export, tmp_path, change)
    rc = run_job("predict", ["--model", str(edited), "--backend", "onnxruntime", "--input", str(shared_data / CT),
                             "--output", str(tmp_path / "out" / "mask.nii.gz")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{edited / 'model.onnx'}: not a readable ONNX model" in err
    assert not (tmp_path / "out").exists()


def test_model_json_naming_an_onnx_file_outside_the_export_is_refused(onnx_export, tmp_path):
    """files.onnx = '../x.onnx' would load a graph that checksums.sha256 does not cover."""
    from lnfm.jobs.export_meta import ExportError

    def change(folder):
        meta = json.loads((folder / "model.json").read_text())
        meta["files"]["onnx"] = "../elsewhere.onnx"
        (folder / "model.json").write_text(json.dumps(meta))

    edited = _edited_copy(onnx_export, tmp_path, change)
    with pytest.raises(ExportError, match=r"files.onnx '../elsewhere.onnx' must name a file inside the export"):
        read_meta(edited)
