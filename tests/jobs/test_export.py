"""`lnfm export`: formats, determinism, checksums, atomic replacement, loading without lnfm."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from export_helpers import tiny  # noqa: F401  (session fixture)

from lnfm.jobs import export as ex
from lnfm.models.heads import HeadConfig
from lnfm.models import export_formats as fmt
from lnfm.workdir import list_files

REPO = Path(__file__).resolve().parents[2]


def _digests(folder: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in list_files(folder)}


def _params(model) -> dict[str, np.ndarray]:
    return fmt.flat_params(model)


@pytest.fixture(scope="session")
def exports(tiny, tmp_path_factory):  # noqa: F811
    """One export per format (orbax comes from the shared fixture)."""
    root = tmp_path_factory.mktemp("exports")
    out = {"orbax": tiny.orbax}
    for f in ("safetensors", "stablehlo", "onnx", "monai"):
        out[f] = ex.export_model(tiny.workdir, root / f, f)
    return out


def test_orbax_export_rebuilds_the_model_and_describes_it(tiny):  # noqa: F811
    loaded = ex.load_export(tiny.orbax)
    ref = _params(tiny.model)
    got = _params(loaded.model)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    meta = json.loads((tiny.orbax / "model.json").read_text())
    assert meta["format"] == "orbax" and meta["kind"] == "segmenter"
    # What the store and the run recorded, not defaults: the store was prepared at 6 mm without a preset.
    contract = json.loads((Path(tiny.store) / "contract.json").read_text())
    assert meta["preprocessing"]["contract"] == {**contract, "spacing": [6.0, 6.0, 6.0]}
    assert meta["preprocessing"]["normalization"] == {"hu_window": [-160.0, 240.0], "pet_scale": 10.0}
    assert meta["preprocessing"]["patch_size"] == [32, 32, 32]
    assert meta["preprocessing"]["contract"]["channels"] == ["CT"]
    assert meta["postprocess"] == {"min_volume_mm3": 10.0, "body_threshold_hu": -500.0, "min_short_axis_mm": 0.0,
                                   "max_elongation": 0.0}
    assert meta["inference"]["roi"] == [32, 32, 32] and meta["schema_version"] == 2
    assert meta["labels"] == ["background", "lymph_node"] and meta["site"]["name"] == "pelvis"
    assert meta["model"]["width"] == 32 and meta["model"]["depth"] == 2
    assert meta["training_data"]["cases"] == 2 and meta["training_data"]["sites"] == ["pelvis"]
    assert meta["lnfm_version"] == "0.1.0"
    assert meta["git_revision"] is None or len(meta["git_revision"]) == 40
    text = (tiny.orbax / "model.json").read_text()
    for rec in tiny.records:  # no case identifier leaks into the artefact
        assert rec["case_id"] not in text
    # Params only: no optimizer state, one zarr array per parameter.
    assert sorted(p.name for p in (tiny.orbax / "params").iterdir() if p.is_dir()) == sorted(ref)


def test_every_format_is_byte_identical_when_repeated(tiny, exports, tmp_path):  # noqa: F811
    for f, first in exports.items():
        again = ex.export_model(tiny.workdir, tmp_path / f, f)
        assert _digests(again) == _digests(first), f
        listed = [line.split("  ", 1)[1] for line in (first / "checksums.sha256").read_text().splitlines()]
        assert listed == [rel for rel in list_files(first) if rel != "checksums.sha256"]
        assert "model.json" in listed


def test_verify_catches_a_changed_missing_or_extra_file(tiny, tmp_path):  # noqa: F811
    import shutil

    from lnfm.__main__ import main

    copy = tmp_path / "copy"
    shutil.copytree(tiny.orbax, copy)
    assert ex.verify_export(copy) > 3
    assert main(["export", "--verify", str(copy)]) == 0
    victim = copy / "params" / "head.classify.kernel" / "0.0.0.0.0"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ex.ExportError, match="head.classify.kernel.*checksum mismatch"):
        ex.verify_export(copy)
    with pytest.raises(ex.ExportError, match="checksum mismatch"):
        ex.load_export(copy)
    assert main(["export", "--verify", str(copy)]) == 2
    victim.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
    ex.verify_export(copy)
    (copy / "notes.txt").write_text("x")
    with pytest.raises(ex.ExportError, match="notes.txt: file not listed"):
        ex.verify_export(copy)
    (copy / "notes.txt").unlink()
    (copy / "model.json").unlink()
    with pytest.raises(ex.ExportError, match="not an export"):
        ex.verify_export(copy)


def test_overwrite_needs_force_and_a_failed_replace_keeps_the_old_export(tiny, tmp_path, monkeypatch):  # noqa: F811
    out = ex.export_model(tiny.workdir, tmp_path / "exp", "safetensors")
    before = _digests(out)
    with pytest.raises(ex.ExportError, match="already exists.*--force"):
        ex.export_model(tiny.workdir, out, "orbax")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write_orbax", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.export_model(tiny.workdir, out, "orbax", force=True)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary folder left behind
    monkeypatch.undo()
    ex.export_model(tiny.workdir, out, "orbax", force=True)
    assert json.loads((out / "model.json").read_text())["format"] == "orbax"
    assert not (out / fmt.SAFETENSORS_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_safetensors_loads_with_numpy_and_safetensors_alone(tiny, exports):  # noqa: F811
    path = exports["safetensors"] / "model.safetensors"
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from safetensors.numpy import load_file
        tensors = load_file({str(path)!r})
        assert "jax" not in sys.modules and "flax" not in sys.modules and "lnfm" not in sys.modules
        print(json.dumps({{k: [list(v.shape), float(np.asarray(v, np.float64).sum())] for k, v in tensors.items()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    ref = _params(tiny.model)
    assert set(got) == set(ref)
    assert "encoder.blocks.0.attn.qkv.kernel" in got and "head.classify.kernel" in got
    for k, v in ref.items():
        assert got[k][0] == list(v.shape)
        assert got[k][1] == pytest.approx(float(v.astype(np.float64).sum()), rel=1e-9, abs=1e-9)
    assert ex.load_export(exports["safetensors"]).model is not None


def test_stablehlo_runs_in_a_fresh_process_without_lnfm_models(tiny, exports, tmp_path):  # noqa: F811
    import jax

    x = np.random.default_rng(1).random((2, 32, 32, 32, 1), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        import jax
        import numpy as np
        fn = jax.export.deserialize(bytearray(open({str(exports["stablehlo"] / "inference.stablehlo")!r}, "rb").read()))
        y = np.asarray(fn.call(np.load({str(tmp_path / "x.npy")!r})))
        np.save({str(tmp_path / "y.npy")!r}, y)
        assert not any(m == "lnfm" or m.startswith("lnfm.") for m in sys.modules), "lnfm was imported"
        assert "flax" not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/",
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    y = np.load(tmp_path / "y.npy")
    from flax import nnx

    graphdef, state = nnx.split(tiny.model)
    # Optimisation level 0 compiles the in-process reference a few times faster on CPU; results stay float32-close.
    forward = jax.jit(lambda s, v: jax.nn.softmax(nnx.merge(graphdef, s)(v), axis=-1),
                      compiler_options={"xla_backend_optimization_level": 0})
    ref = np.asarray(forward(state, x))
    assert y.shape == (2, 32, 32, 32, 2)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    meta = ex.read_meta(exports["stablehlo"])
    assert meta.stablehlo["input_shape"] == ["B", 32, 32, 32, 1]
    with pytest.raises(ex.ExportError, match="compiled function"):
        ex.load_export(exports["stablehlo"])


def test_monai_export_loads_into_a_monai_vit(tiny, exports):  # noqa: F811
    import torch
    from monai.networks.nets import ViT as MonaiViT
    from safetensors.numpy import load_file

    pt = torch.load(exports["monai"] / "encoder_monai.pt", weights_only=True)
    st = load_file(exports["monai"] / "encoder_monai.safetensors")
    assert set(pt) == set(st)
    for k in st:
        np.testing.assert_array_equal(pt[k].numpy(), st[k])
    # MONAI's own sin-cos table needs a width divisible by 6; the export carries the table, so load it as learnable.
    net = MonaiViT(in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=128, num_layers=2, num_heads=2,
                   pos_embed_type="learnable", qkv_bias=True)
    net.load_state_dict(pt, strict=True)
    ours = _params(tiny.model)["encoder.blocks.1.mlp.fc1.kernel"]
    np.testing.assert_array_equal(net.blocks[1].mlp.linear1.weight.detach().numpy(), ours.T)
    enc = ex.load_export(exports["monai"]).encoder  # back through the interop
    np.testing.assert_allclose(fmt.flat_params(enc)["blocks.1.mlp.fc1.kernel"], ours, atol=0)


def test_monai_needs_a_vit_and_stablehlo_needs_a_head(tiny, tmp_path):  # noqa: F811
    import dataclasses

    from lnfm.models import ModelConfig

    prep = ex.read_meta(tiny.orbax).preprocessing
    swin = ex._Source("segmenter", {}, ModelConfig(arch="swin"), prep, {})
    with pytest.raises(ex.ExportError, match="MONAI ViT.*'swin'"):
        ex._write(swin, tmp_path, "monai")
    enc = dataclasses.replace(swin, kind="encoder", model=ModelConfig(arch="vit"))
    with pytest.raises(ex.ExportError, match="stablehlo.*encoder"):
        ex._write(enc, tmp_path, "stablehlo")


def test_model_json_is_validated_and_a_run_without_preprocessing_is_refused(tiny, tmp_path):  # noqa: F811
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny.orbax, bad)
    meta = json.loads((bad / "model.json").read_text())
    del meta["preprocessing"]["normalization"]
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ex.ExportError, match=r"model.json: missing config key 'preprocessing.normalization'"):
        ex.read_meta(bad)
    meta["schema_version"] = 1
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ex.ExportError, match="schema_version 1 is not 2"):
        ex.read_meta(bad)
    # The head is the finetuning config's HeadConfig, validated by the same loader.
    good = json.loads((tiny.orbax / "model.json").read_text())
    head = ex.read_meta(tiny.orbax).head
    assert isinstance(head, HeadConfig) and head == HeadConfig(**good["head"])
    for key, value, message in [("deep_supervision", "maybe", "head.deep_supervision: expected true/false"),
                                ("kind", "big", "head.kind: 'big' is not one of"),
                                ("options", [8], "head.options: expected a mapping"),
                                ("colour", 1, "unknown config key 'head.colour'"),
                                ("deep_supervision", None, "missing config key 'head.deep_supervision'")]:
        broken = json.loads(json.dumps(good))
        if value is None:
            del broken["head"][key]
        else:
            broken["head"][key] = value
        (bad / "model.json").write_text(json.dumps(broken))
        with pytest.raises(ex.ExportError) as err:
            ex.read_meta(bad)
        assert str(err.value).startswith(f"{bad / 'model.json'}: ") and message in str(err.value)
        assert "\n" not in str(err.value)
    # A finetuning run from before the contract: its spacing and window are unknown, so no export.
    old = tmp_path / "old_run"
    shutil.copytree(tiny.workdir, old)
    (old / "preprocessing.json").unlink()
    with pytest.raises(ex.ExportError, match="records no preprocessing"):
        ex.export_model(old, tmp_path / "out", "orbax")
    assert not (tmp_path / "out").exists()


def test_pretraining_workdir_gives_an_encoder_export_finetuning_accepts(tiny, tmp_path):  # noqa: F811
    from flax import nnx

    from lnfm.config import dump_yaml
    from lnfm.jobs.finetune import resolve_init
    from lnfm.models.segmenter import load_encoder_state
    from lnfm.data.contract import write_preprocessing
    from lnfm.jobs.pretrain import PretrainConfig, pretrain_preprocessing
    from lnfm.train.checkpoint import CheckpointConfig, Checkpointer

    # The pretraining job saves the nnx.State of the SSL model: the encoder lives at params/encoder.
    # A checkpoint of plain nested dicts is read as well.
    enc_state = nnx.state(tiny.model.encoder, nnx.Param)
    for name, tree in (("plain", nnx.to_pure_dict(enc_state)), ("pretrain", nnx.State({"encoder": enc_state}))):
        pre = tmp_path / name
        pre.mkdir()
        pcfg = PretrainConfig(model=tiny.cfg.model)
        (pre / "config.yaml").write_text(dump_yaml(pcfg))
        write_preprocessing(pre / "preprocessing.json", pretrain_preprocessing(pcfg, [tiny.store]))
        ckpt = Checkpointer(pre / "checkpoints", CheckpointConfig(keep=1, async_save=False))
        ckpt.save(5, {"params": {"encoder": tree} if name == "plain" else tree})
        ckpt.close()
        out = ex.export_model(pre / "checkpoints", tmp_path / f"enc_{name}", "orbax")
        got = fmt.flat_params(ex.load_export(out).encoder)
        assert all(np.array_equal(got[k], v) for k, v in fmt.flat_params(tiny.model.encoder).items()), name
    meta = ex.read_meta(out)
    assert meta.kind == "encoder" and meta.labels is None
    loaded = ex.load_export(out)
    assert loaded.model is None
    ref = fmt.flat_params(tiny.model.encoder)
    got = fmt.flat_params(loaded.encoder)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    kind, path, model_cfg = resolve_init(str(out))
    assert kind == "export" and model_cfg["width"] == 32
    # What `finetune --init EXPORT` does with it: copy the encoder into a segmenter.
    target = ex.build_from_meta(ex.read_meta(tiny.orbax), fmt.flat_params(tiny.model))[0]
    for v in nnx.state(target.encoder, nnx.Param).flat_state():
        v[1].set_value(v[1][...] * 0)
    load_encoder_state(target, loaded.encoder)
    assert np.array_equal(fmt.flat_params(target.encoder)["blocks.0.attn.qkv.kernel"], ref["blocks.0.attn.qkv.kernel"])
    for format in ("stablehlo", "onnx"):  # both hold the segmenter's inference function
        with pytest.raises(ex.ExportError, match=f"the {format} format exports a segmentation model; a pretraining "
                                                 f"workdir holds only an encoder"):
            ex.export_model(pre, tmp_path / "hlo", format)
        assert not (tmp_path / "hlo").exists()


def test_bad_checkpoint_folders_fail_with_one_line(tmp_path):
    from lnfm.__main__ import main

    with pytest.raises(ex.ExportError, match="neither a finetuning workdir"):
        ex.export_model(tmp_path, tmp_path / "out", "orbax")
    with pytest.raises(ex.ExportError, match="not found"):
        ex.export_model(tmp_path / "missing", tmp_path / "out", "orbax")
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- --force and the path rule


def test_force_replaces_only_an_intact_export_and_never_the_source(tiny, tmp_path, capsys):  # noqa: F811
    import shutil

    from lnfm.cli import run_job

    from tree_helpers import tree_digest

    work = tmp_path / "runs" / "ft"
    shutil.copytree(tiny.workdir, work)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "paper.txt").write_text("unsaved work")
    edited = ex.export_model(work, tmp_path / "edited", "safetensors")
    meta = json.loads((edited / "model.json").read_text())
    (edited / "model.json").write_text(json.dumps({**meta, "site": {**meta["site"], "name": "other"}}))
    cases = {
        "source": (work, "--out is --checkpoint"),
        "parent": (work.parent, "--out contains --checkpoint"),
        "inside": (work / "export", "--out lies inside --checkpoint"),
        "best_of_source": (work / "best", "--out lies inside --checkpoint"),
        "not_an_export": (notes, "replaces only an intact lnfm export"),
        "edited_export": (edited, "checksum mismatch"),
    }
    before = tree_digest(tmp_path)
    for name, (out, reason) in cases.items():
        capsys.readouterr()
        rc = run_job("export", ["--checkpoint", str(work), "--out", str(out), "--format", "orbax", "--force"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and reason in err[0], (name, err)
        assert tree_digest(tmp_path) == before, name
    out = ex.export_model(work, tmp_path / "exp", "safetensors")
    assert run_job("export", ["--checkpoint", str(work), "--out", str(out), "--format", "orbax", "--force"]) == 0
    assert json.loads((out / "model.json").read_text())["format"] == "orbax"


def test_a_full_disk_during_force_keeps_the_old_export_and_a_rerun_completes(tiny, tmp_path):  # noqa: F811
    """`ulimit -f` in a real process: writing the new export fails with EFBIG; the previous export
    is intact, no temporary folder is left, and the same command then succeeds."""
    import os
    import resource

    out = ex.export_model(tiny.workdir, tmp_path / "exp", "orbax")
    before = _digests(out)
    cmd = [sys.executable, "-m", "lnfm", "export", "--checkpoint", str(tiny.workdir), "--out", str(out),
           "--format", "safetensors", "--force"]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, preexec_fn=small_files)
    assert proc.returncode != 0
    assert _digests(out) == before and ex.verify_export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "model.json").read_text())["format"] == "safetensors" and ex.verify_export(out)


def test_the_size_prior_the_run_tuned_travels_in_model_json(tiny, tmp_path):  # noqa: F811
    """finetune writes the post-processing its test masks were made with (postprocess.json, the size
    prior tuned on validation); the export records exactly that, not the config's untuned values."""
    import shutil

    from lnfm.runs import FinetuneRun

    run = tmp_path / "ft"
    shutil.copytree(tiny.workdir, run)
    tuned = {"min_volume_mm3": 10.0, "body_threshold_hu": -500.0, "min_short_axis_mm": 4.0, "max_elongation": 3.0}
    FinetuneRun(run).first().postprocess.write_text(json.dumps(tuned))
    out = ex.export_model(run, tmp_path / "export", "orbax")
    assert json.loads((out / "model.json").read_text())["postprocess"] == tuned


# ----------------------------------------------------------------------------- repeats


def _two_repeats(tiny, root: Path) -> Path:  # noqa: F811
    """A run with --repeats 2 as the finetuning job lays it out: repeat_0 holds the tiny model, repeat_1
    the same weights * 1.5 + 0.01, each with its own best.json; summary.json from the job's `combine`."""
    import shutil

    import jax
    from flax import nnx

    from lnfm.config import to_dict
    from lnfm.jobs.finetune import METRICS, combine, save_best
    from lnfm.train.checkpoint import CheckpointConfig, Checkpointer

    run = root / "ft"
    run.mkdir()
    for name in ("config.yaml", "preprocessing.json"):
        shutil.copy(tiny.workdir / name, run / name)
    shutil.copytree(tiny.workdir / "best", run / "repeat_0" / "best")
    shutil.copy(tiny.workdir / "config.yaml", run / "repeat_0" / "config.yaml")
    tree = jax.tree.map(lambda x: np.asarray(x) * 1.5 + 0.01 if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else np.asarray(x), nnx.to_pure_dict(nnx.state(tiny.model)))
    ckpt = Checkpointer(run / "repeat_1" / "best", CheckpointConfig(keep=1, async_save=False))
    save_best(ckpt, 7, {"model": tree}, to_dict(tiny.cfg), {"step": 7, "val_dice": 0.25})
    ckpt.close()
    shutil.copy(tiny.workdir / "config.yaml", run / "repeat_1" / "config.yaml")
    runs = [{**dict.fromkeys(METRICS), "dice": dice, "cases": [], "repeat": r, "num_labeled": 2, "pseudo_labelled": 0,
             "trainable_params": 1, "total_params": 1, "head_params": 1, "head_gflops": 0.0, "train_time_s": 1.0,
             "best_val_dice": val} for r, dice, val in ((0, 0.125, 0.5), (1, 0.375, 0.25))]
    (run / "summary.json").write_text(json.dumps(combine(tiny.cfg, runs)))
    return run


def test_a_named_repeat_exports_that_repeat(tiny, tmp_path, caplog):  # noqa: F811
    from safetensors.numpy import load_file

    run = _two_repeats(tiny, tmp_path)
    r1 = ex.export_model(run / "repeat_1", tmp_path / "r1", "safetensors")
    got = load_file(r1 / "model.safetensors")
    ref0 = _params(tiny.model)
    assert got.keys() == ref0.keys()
    for k, v in ref0.items():
        np.testing.assert_array_equal(got[k], v * 1.5 + 0.01, err_msg=k)  # what repeat_1's checkpoint holds
        assert not np.array_equal(got[k], v), k  # and not repeat 0's weights
    best = json.loads((run / "repeat_1" / "best" / "7" / "best.json").read_text())  # the record the job committed
    summary = json.loads((run / "summary.json").read_text())
    data = json.loads((r1 / "model.json").read_text())["training_data"]
    assert (data["best_val_dice"], data["best_step"], data["repeat"]) == (best["val_dice"], best["step"], 1)
    assert data["test_dice"] == summary["repeats"][1]["dice"] != summary["dice"]  # the repeat's, not the mean
    # Its best/, or the committed best step in it, name the same repeat: byte-identical exports.
    for i, named in enumerate((run / "repeat_1" / "best", run / "repeat_1" / "best" / "7")):
        assert _digests(ex.export_model(named, tmp_path / f"same{i}", "safetensors")) == _digests(r1), named
    # The workdir itself: repeat 0 (docs/export_predict.md), said in the log.
    with caplog.at_level("INFO", logger="lnfm.export"):
        root = ex.export_model(run, tmp_path / "root", "safetensors")
    assert "holds 2 repeats: exporting repeat_0" in caplog.text
    assert _digests(root) == _digests(ex.export_model(run / "repeat_0", tmp_path / "r0", "safetensors"))
    for k, v in load_file(root / "model.safetensors").items():
        np.testing.assert_array_equal(v, ref0[k], err_msg=k)
    data = json.loads((root / "model.json").read_text())["training_data"]
    best0 = json.loads(next((run / "repeat_0" / "best").glob("*/best.json")).read_text())
    assert (data["best_val_dice"], data["test_dice"], data["repeat"]) == (best0["val_dice"], 0.125, 0)


def test_a_step_folder_other_than_the_best_model_is_refused(tiny, tmp_path, capsys):  # noqa: F811
    import shutil

    from lnfm.cli import run_job

    run = _two_repeats(tiny, tmp_path)
    stale = run / "repeat_1" / "best" / "3"  # an older best step beside the committed one (7)
    shutil.copytree(run / "repeat_1" / "best" / "7", stale)
    shutil.copytree(run / "repeat_1" / "best" / "7", run / "repeat_1" / "checkpoints" / "7")
    empty = run / "repeat_2"
    (empty / "best").mkdir(parents=True)  # a repeat killed before its first validation
    cases = {stale: f"{stale}: a checkpoint step, not the model an export takes (a finetuning repeat's best model, a "
                    f"pretraining run's newest checkpoint); pass {run / 'repeat_1'}",
             run / "repeat_1" / "checkpoints" / "7": "pass " + str(run / "repeat_1"),
             empty: f"{empty / 'best'}: no best model saved"}
    for named, says in cases.items():
        capsys.readouterr()
        assert run_job("export", ["--checkpoint", str(named), "--out", str(tmp_path / "e")]) == 2, named
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lnfm export: error: ") and says in err[0], (named, err)
    assert not (tmp_path / "e").exists()


def test_verify_refuses_the_options_it_would_ignore(tiny, tmp_path, capsys):  # noqa: F811
    from lnfm.cli import run_job

    for extra, named in ((["--checkpoint", str(tiny.workdir), "--out", str(tmp_path / "e")], "--checkpoint, --out"),
                         (["--format", "orbax"], "--format"), (["--force"], "--force")):
        capsys.readouterr()
        assert run_job("export", ["--verify", str(tiny.orbax), *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--verify checks an existing export and writes none: it cannot be combined with " \
                                  f"{named} (" in err[0], err
    assert not (tmp_path / "e").exists()
    assert run_job("export", ["--verify", str(tiny.orbax)]) == 0


def test_a_file_of_an_export_or_a_training_workdir_is_named_for_what_it_is(tiny, tmp_path, capsys):  # noqa: F811
    from lnfm.cli import run_job

    pre = tmp_path / "pre"
    (pre / "checkpoints").mkdir(parents=True)
    (pre / "config.yaml").write_text("model: {arch: vit}\n")  # no site section: a pretraining run
    scan = next((tiny.raw / "imagesTr").glob("*.nii.gz"))
    cases = {
        tiny.orbax / "model.json": f"not an export folder but a file inside the export {tiny.orbax}; pass {tiny.orbax}",
        tiny.orbax / "params": f"not an export folder but a path inside the export {tiny.orbax}; pass {tiny.orbax}",
        tiny.workdir: f"a finetuning workdir, not an export; run `lnfm export --checkpoint {tiny.workdir} --out "
                      f"EXPORT` first and pass EXPORT",
        tiny.workdir / "best": "a finetuning workdir, not an export; run `lnfm export --checkpoint",
        pre: f"a pretraining workdir, not an export; run `lnfm export --checkpoint {pre} --out EXPORT` first",
        tmp_path / "none": "not an export (no model.json)",
    }
    for model, says in cases.items():
        for job, argv in (("predict", ["--model", str(model), "--input", str(scan), "--output",
                                       str(tmp_path / "out" / "m.nii.gz")]), ("export", ["--verify", str(model)])):
            capsys.readouterr()
            assert run_job(job, argv) == 2, (job, model)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"lnfm {job}: error: {model}: ") and says in err[0], \
                (job, model, err)
    assert not (tmp_path / "out").exists()


def test_export_logs_and_prints_no_path_of_the_workdir_it_reads(tiny, tmp_path, capsys, caplog):  # noqa: F811
    """Orbax warned, through absl, that the read-only checkpoint manager was read-only, naming the workdir's
    best/ folder on stderr (a cluster's job log): a folder name often holds a patient's name."""
    import logging

    from lnfm.cli import run_job

    caplog.set_level(logging.WARNING)  # what a console shows (orbax's INFO records stay below it)
    capsys.readouterr()
    assert run_job("export", ["--checkpoint", str(tiny.workdir), "--out", str(tmp_path / "e"), "--format",
                              "safetensors"]) == 0
    said = capsys.readouterr()
    for text in (said.out, said.err, caplog.text):
        assert str(tiny.workdir) not in text
    assert not any(r.name == "absl" for r in caplog.records)


def test_a_training_store_not_found_from_here_gives_no_counts_rather_than_zeros(tiny, tmp_path, caplog):  # noqa: F811
    """config.yaml's data as finetune recorded it, relative to the folder it ran in (or a store moved since): from
    another folder the store is not found. model.json said 0 cases, 0 labelled and no site; now it gives no
    counts and the export warns, without the store's path."""
    import yaml
    from export_helpers import make_finetune_workdir

    workdir, _, _ = make_finetune_workdir(tmp_path / "run", tiny.store)
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    assert cfg["data"] == [str(tiny.store)]
    cfg["data"] = ["runs_store"]  # not a folder here
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level("WARNING", logger="lnfm"):
        out = ex.export_model(workdir, tmp_path / "export", "safetensors")
    data = json.loads((out / "model.json").read_text())["training_data"]
    assert data["stores"] == 1 and not {"cases", "labelled_cases", "sites", "channels"} & set(data)
    assert "training data summary without case counts" in caplog.text and "runs_store" not in caplog.text
    found, _, _ = make_finetune_workdir(tmp_path / "found", tiny.store)  # the same run with its store in reach
    counted = json.loads((ex.export_model(found, tmp_path / "e2", "safetensors") / "model.json").read_text())
    assert counted["training_data"]["cases"] == 2


def test_training_data_counts_the_cases_the_run_used_not_the_store_grown_since(tiny, tmp_path):  # noqa: F811
    """model.json's training_data counted the store as it was at export time: after 2 cases were added since the
    run trained on 3, it said 5 cases and the store's split counts. The counts now come from the run's
    splits.json, and sites, spacings and channels from those cases."""
    import shutil

    from export_helpers import SPACING, make_finetune_workdir

    from lnfm.data.prepare import PrepareConfig, prepare_dataset
    from lnfm.data.synth import SynthConfig, write_dataset

    store = str(shutil.copytree(tiny.store, tmp_path / "store"))
    write_dataset(SynthConfig(site="pelvis", num_cases=3, seed=9, shape=(144, 128, 44), gallery=False,
                              use_real_shapes=False, spacing_inplane=(1.5, 1.5), slice_thickness=(3.0, 3.0)),
                  tmp_path / "raw")
    images = sorted((tmp_path / "raw" / "imagesTr").glob("*_0000.nii.gz"))

    def add(name: str, rows: list[tuple[str, Path, str]]) -> None:
        (tmp_path / name).write_text("case_id,image,label,site,split\n" + "".join(
            f"{cid},{p},{str(p).replace('imagesTr', 'labelsTr').replace('_0000', '')},other_site,{split}\n"
            for cid, p, split in rows))
        cfg = PrepareConfig(workers=0, salt="t", spacing=SPACING)
        assert prepare_dataset(str(tmp_path / name), store, cfg, show_progress=False).ok

    add("test.csv", [("x0", images[0], "test")])
    a, b = sorted(r["case_id"] for r in tiny.records)
    workdir, _, _ = make_finetune_workdir(tmp_path / "run", store)
    (workdir / "splits.json").write_text(json.dumps({"train": [a], "val": [b], "test": ["x0"]}))
    add("more.csv", [("x1", images[1], "train"), ("x2", images[2], "train")])  # the store grew since
    out = ex.export_model(workdir, tmp_path / "export", "safetensors")
    data = json.loads((out / "model.json").read_text())["training_data"]
    assert (data["cases"], data["labelled_cases"], data["splits"]) == (3, 3, {"test": 1, "train": 1, "val": 1})
    assert data["sites"] == ["other_site", "pelvis"] and data["spacing_mm"] == [list(SPACING)]
    (workdir / "splits.json").unlink()  # a run from before splits.json: the store as it is now
    data = json.loads((ex.export_model(workdir, tmp_path / "e2", "safetensors") / "model.json").read_text())
    assert data["training_data"]["cases"] == 5


def test_an_export_into_a_store_the_run_recorded_relative_to_another_folder_is_refused(tiny, tmp_path):  # noqa: F811
    """The path rule reads the training stores from config.yaml; a store recorded relative to the folder finetune ran
    in is not found from here, so `--out` inside it passed that rule and wrote into the dataset. A store is now also
    recognised by its own files, on the way up from `--out`."""
    import yaml
    from export_helpers import make_finetune_workdir

    workdir, _, _ = make_finetune_workdir(tmp_path / "run", tiny.store)
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["data"] = ["runs_store"]  # as finetune recorded it in another folder
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in Path(tiny.store).iterdir())
    with pytest.raises(ex.ExportError, match="lies inside the prepared store"):
        ex.export_model(workdir, Path(tiny.store) / "cases" / "export", "safetensors")
    assert sorted(p.name for p in Path(tiny.store).iterdir()) == before
    assert not (Path(tiny.store) / "cases" / "export").exists()


def test_a_run_still_training_is_refused_in_one_line_and_exported_once_it_has_finished(tiny, tmp_path, capsys):  # noqa: F811
    import os
    import shutil
    import signal

    from lnfm.cli import run_job

    work = tmp_path / "ft"
    shutil.copytree(tiny.workdir, work)
    hold = ("import sys, time; from lnfm.workdir import lock_folder\n"
            "with lock_folder(sys.argv[1]):\n"
            "    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(work)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert proc.stdout.readline().strip() == "locked"  # the training job's own workdir lock
        capsys.readouterr()
        rc = run_job("export", ["--checkpoint", str(work), "--out", str(tmp_path / "exp")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"in use by another lnfm job (pid {proc.pid} on " in err[0]
        assert err[0].endswith("export it when it has finished")
        assert not (tmp_path / "exp").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_job("export", ["--checkpoint", str(work), "--out", str(tmp_path / "exp")]) == 0
    assert not (work / ".lnfm.lock").exists()  # the reader leaves no lock file in the run


def test_an_export_whose_out_another_export_is_writing_is_refused_naming_out(tiny, tmp_path, capsys):  # noqa: F811
    """The one-line refusal named --out's parent folder (where the lock file lies), not the --out given."""
    import os

    from lnfm.cli import run_job
    from lnfm.workdir import lock_folder

    out = tmp_path / "exp"
    with lock_folder(tmp_path, ".exp.lock"):  # another export of this --out
        capsys.readouterr()
        rc = run_job("export", ["--checkpoint", str(tiny.workdir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"error: {out}: in use by another lnfm job (pid {os.getpid()} on " in err[0], err
    assert not out.exists()


def test_a_preprocessing_record_that_contradicts_the_run_is_refused(tiny, tmp_path):  # noqa: F811
    """A workdir whose preprocessing.json was edited, or copied from another run, said 3 mm where config.yaml and
    the stores said 6: the export ran the 6 mm model at 3 mm in predict. preprocessing.json is written from
    config.yaml (its cases checked at site.spacing); the export refuses any disagreement, naming both values."""
    import shutil

    import yaml

    def edited(name: str, change) -> Path:
        run = tmp_path / name
        shutil.copytree(tiny.workdir, run)
        prep = json.loads((run / "preprocessing.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        change(prep, cfg)
        (run / "preprocessing.json").write_text(json.dumps(prep))
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        return run

    def window(prep, cfg):
        prep["normalization"]["hu_window"] = [-100.0, 240.0]

    def spacing(prep, cfg):
        prep["contract"]["spacing"] = [3.0, 3.0, 3.0]

    def both(prep, cfg):  # config.yaml and preprocessing.json agree; the stores' cases are at 6 mm
        prep["contract"]["spacing"] = cfg["site"]["spacing"] = [3.0, 3.0, 3.0]

    for change, says in [
            (spacing, "preprocessing.json: contract.spacing [3.0, 3.0, 3.0] disagrees with site.spacing "
                      "[6.0, 6.0, 6.0] in {run}/config.yaml, which the run trained with"),
            (window, "preprocessing.json: normalization.hu_window [-100.0, 240.0] disagrees with loader.hu_window "
                     "[-160.0, 240.0] in {run}/config.yaml"),
            (both, "preprocessing.json: contract.spacing [3.0, 3.0, 3.0] mm disagrees with the training stores' "
                   "cases at [[6.0, 6.0, 6.0]] mm")]:
        run = edited(change.__name__, change)
        with pytest.raises(ex.ExportError) as err:
            ex.export_model(run, tmp_path / "out", "safetensors")
        assert str(err.value).startswith(f"{run}/{says.format(run=run)}") and "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()
    meta = json.loads((ex.export_model(tiny.workdir, tmp_path / "out", "safetensors") / "model.json").read_text())
    assert meta["preprocessing"]["contract"]["spacing"] == [6.0, 6.0, 6.0]
    assert meta["training_data"]["spacing_mm"] == [[6.0, 6.0, 6.0]]


def test_a_truncated_best_step_without_a_checksum_list_is_one_line_naming_the_run_and_the_step(tiny, tmp_path,  # noqa: F811
                                                                                           capsys):
    """A run an older lnfm saved has no checksum list: a file of its best step cut short (a copy that stopped) was
    Orbax's traceback from export (and finetune --init); it is one line naming the folder and the step, exit 2."""
    import shutil

    from lnfm.cli import run_job
    from lnfm.runs import RepeatRun
    from lnfm.train.checkpoint import CHECKSUMS

    run = Path(shutil.copytree(tiny.workdir, tmp_path / "run"))
    best = RepeatRun(run).best  # a single repeat: in the run's root
    step = next(p for p in best.iterdir() if p.name.isdigit())
    (step / CHECKSUMS).unlink()
    for data in (f for f in step.rglob("*") if f.is_file() and f.parent.name == "d"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert run_job("export", ["--checkpoint", str(run), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lnfm export: error: {best}: checkpoint step {step.name} cannot be "
                                               f"read (a file of it is damaged, truncated or missing)"), err
    assert not (tmp_path / "e").exists()
