"""A tiny finetuning workdir (random weights, the finetune job's own checkpoint layout) and
the phantom store it names, shared by the export and predict tests."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest

SPACING = (6.0, 6.0, 6.0)  # coarse, so the real CTs in ../shared/data take a few windows
# A linear-probe head: it compiles in a fraction of the light head's time (tests compile in every process).
OVERRIDES = [f"site.spacing=[{SPACING[0]},{SPACING[1]},{SPACING[2]}]", "site.patch=[32,32,32]",
             "model.arch=vit", "model.size=tiny", "model.width=32", "model.depth=2", "model.heads=2",
             "model.patch_size=[8,8,8]", "model.img_size=[32,32,32]", "head.kind=linear", "strategy.freeze=none",
             "inference.overlap=0.25", "inference.sw_batch_size=2", "train.steps=2"]


def make_store(root: Path) -> tuple[Path, str]:
    """Two pelvis phantoms (raw nnU-Net folder) and their store prepared at SPACING."""
    from lnfm.data.prepare import PrepareConfig, prepare_dataset
    from lnfm.data.synth import SynthConfig, write_dataset

    raw = root / "raw"
    write_dataset(SynthConfig(site="pelvis", num_cases=2, seed=3, shape=(144, 128, 44), gallery=False,
                              use_real_shapes=False, spacing_inplane=(1.5, 1.5), slice_thickness=(3.0, 3.0)), raw)
    store = str(root / "store")
    res = prepare_dataset(str(raw), store, PrepareConfig(workers=0, salt="t", spacing=SPACING), show_progress=False)
    assert res.ok, res.failures
    return raw, store


def make_finetune_workdir(root: Path, store: str, bias: float = 0.0):
    """config.yaml + preprocessing.json + best/<step>/ (with best.json) laid out as the finetuning job writes them,
    holding a segmenter with random (numpy-drawn: nothing compiles) weights. `bias` is added to
    the foreground logits so the untrained head marks a minority of voxels.
    Returns (workdir, model, cfg)."""
    import math

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lnfm.config import dump_yaml, to_dict
    from lnfm.data.contract import Normalization, write_preprocessing
    from lnfm.data.store import read_manifest
    from lnfm.runs import FinetuneRun
    from lnfm.jobs.preprocessing import training_preprocessing
    from lnfm.jobs.finetune import load_finetune_config, save_best
    from lnfm.models.segmenter import build_segmenter
    from lnfm.train.checkpoint import CheckpointConfig, Checkpointer

    cfg = load_finetune_config("pelvis", OVERRIDES, init="scratch", data=[store])
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: build_segmenter(cfg.model, cfg.head.kind, len(cfg.site.labels), nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        name, shape = str(path[-1]), tuple(var.shape)
        if name == "scale":
            value = np.ones(shape)
        elif name == "bias" or len(shape) <= 1:
            value = 0.02 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]) or 1)
        leaves.append((path, var.replace(jnp.asarray(value, var.dtype))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    last = model.head.ups[-1] if len(model.head.ups) else model.head.classify  # the layer that emits the logits
    b = np.asarray(last.bias[...]).copy()
    b[1:] += bias
    last.bias.set_value(jnp.asarray(b, last.bias[...].dtype))
    workdir = root / "finetune"
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(dump_yaml(cfg))
    records = [(store, r) for r in read_manifest(store)]
    write_preprocessing(FinetuneRun(workdir).preprocessing, training_preprocessing(
        [store], records, cfg.site.spacing, Normalization(cfg.loader.hu_window, cfg.loader.pet_scale), cfg.site.patch))
    ckpt = Checkpointer(workdir / "best", CheckpointConfig(keep=1, async_save=False))
    save_best(ckpt, 2, {"model": nnx.to_pure_dict(nnx.state(model))}, to_dict(cfg), {"step": 2, "val_dice": 0.5})
    ckpt.close()
    return workdir, model, cfg


@dataclasses.dataclass
class Tiny:
    raw: Path  # nnU-Net raw folder of the phantoms
    store: str  # their prepared store
    records: list  # manifest records
    workdir: Path  # the finetuning workdir
    model: object  # the segmenter it holds
    cfg: object  # its FinetuneConfig
    orbax: Path  # `lnfm export --format orbax` of the workdir


_BUILT: list[Tiny] = []  # one build per test process, whichever module asks first


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """Imported by several test modules (each then holds its own fixture), so the build is cached here."""
    from lnfm.data.store import read_manifest
    from lnfm.jobs.export import export_model

    if not _BUILT:
        root = tmp_path_factory.mktemp("tiny_model")
        raw, store = make_store(root)
        workdir, model, cfg = make_finetune_workdir(root, store, bias=-0.6)
        orbax = export_model(workdir, root / "export_orbax", "orbax")
        _BUILT.append(Tiny(raw, store, read_manifest(store), workdir, model, cfg, orbax))
    return _BUILT[0]
