"""Lymph-node segmentation finetuning of a pretrained encoder at one anatomical site.

    python finetune/finetune.py --site pelvis --data STORE --init PRETRAIN_DIR_OR_EXPORT --workdir DIR
        [--unlabelled STORE | --paste-into STORE] [--num-labeled N] [--repeats R] [--quick] [key=value ...]

The site preset (lnfm/configs/sites/<site>.yaml) sets spacing, patch, HU window,
labels, head and strategy. The architecture comes from the pretraining run's
config when `--init` names one. Each repeat draws its few-shot subset and its
head initialisation from seed train.seed + repeat, trains with Orbax
checkpoints (resumable), validates by sliding-window inference and keeps the
best model by validation Dice in DIR/best, then evaluates it on the test split
into DIR/summary.json. With R > 1 repeats, repeat r lives in DIR/repeat_<r>.
`load_finetuned(DIR)` rebuilds the best model from the workdir alone.

Self-training (`--unlabelled STORE[,STORE...]`): each repeat first trains a teacher
exactly as above (in teacher/), which pseudo-labels the unlabelled stores' training
scans with its best model and tuned post-processing (pseudo_labels/, a store); then
the repeat's own model, the student, trains from the same initialisation on the
labelled subset plus the pseudo-labelled scans, patches drawn in proportion to the
cases. The repeat keeps whichever of the two validates better (selected.json). Every
stage resumes; summary.json's train_time_s counts all of them.

Node paste (`--paste-into STORE[,STORE...]`): loader.paste_p of the training patches come
from those stores' scans, with one of the labelled subset's nodes pasted into their fat
and only a shell around it scored (lnfm/data/paste.py); the rest are drawn as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lnfm.config import (ConfigError, apply_overrides, config_data, dump_yaml, from_dict, given_keys,
                         load_yaml_with_base, override_keys, parse_args_once, parse_override, preset_path, read_yaml,
                         refuse_batch_in_file, refuse_derived, refuse_derived_in_files, refuse_unread, to_dict)
from lnfm.data import pseudo_labels
from lnfm.data.contract import Normalization, hu_window_problem, normalize
from lnfm.data.loader import LoaderConfig, check_loader, make_loader
from lnfm.data.scan_checks import check_target_spacing
from lnfm.data.paste import IGNORE_LABEL
from lnfm.data.store import check_stores, content_fingerprint, read_case, read_manifest
from lnfm.errors import DataError, LnfmError
from lnfm.eval.metrics import check_metrics, evaluate_case, summarize
from lnfm.eval.inference import window_problem
from lnfm.eval.postprocess import PostprocessConfig, postprocess_problem, tune_size_prior, without_size_prior
from lnfm.eval.predictor import Predictor, softmax_fn
from lnfm.eval.surface import dice as dice_score
from lnfm.jobs.finetune_config import FinetuneConfig, FinetuneTrainConfig, HeadConfig, unread_keys
from lnfm.jobs.finetune_cpu import QUICK, check_memory, cpu_notice
from lnfm.jobs.export_meta import read_meta
from lnfm.io import write_nifti
from lnfm.jobs.export import ExportError, check_weights_export, load_export
from lnfm.models import ModelConfig
from lnfm.models.build import build_encoder
from lnfm.models.lora import apply_lora
from lnfm.models.heads.registry import head_flops, head_options, head_param_count
from lnfm.models.segmenter import load_encoder_state, segmenter_from_config
from lnfm.models.sharding import (MeshConfig, batch_sharding, create_sharded_model, make_mesh, state_sharding,
                                  use_rules)
from lnfm.segmentation.fewshot import check_disjoint, select_subset
from lnfm.segmentation.losses import check_loss, model_output_loss
from lnfm.runs import (BEST_JSON, SPLITS, SUMMARY, ExportFolder, FinetuneRun, PretrainRun, RepeatRun, read_json,
                       write_json)
from lnfm.segmentation.strategies import (check_strategy, check_units, count_params, layer_index_fn,
                                          trainable_filter)
from lnfm.safety import check_apart
from lnfm.train.checkpoint import (CheckpointConfig, Checkpointer, check_latest_step, has_checkpoints,
                                   restore_params)
from lnfm.train.distributed import initialize
from lnfm.train.distributed import add_arguments as add_distributed_arguments
from lnfm.train.loop import Hook, Throughput
from lnfm.train.optim import ema_params, layer_lr_scales, make_optimizer
from lnfm.jobs.preprocessing import encoder_normalization, training_preprocessing
from lnfm.train.state import create_train_state, merge_model, split_model
from lnfm.train.job import (Checked, check_channels, check_run_config, content_keys, device_batch, fit,
                            run_training_job)
from lnfm.train.step import make_train_step
from lnfm.workdir import MetricsWriter, lock_folder, open_workdir

log = logging.getLogger("lnfm.finetune")

RESUME_KEYS = ("model", "head", "strategy", "site")  # a resumed run keeps these (checkpoint shapes follow them)
METRICS = ("dice", "hd95", "assd", "nsd", "node_sensitivity", "fp_per_volume", "sens_lt5", "sens_5to10", "sens_ge10")


# Finetuning defaults that differ from the shared dataclass defaults (presets and overrides go on top).
DEFAULTS: dict = {
    # Cosine to a 10% floor, not to zero: few-shot validation Dice was still rising when
    # the LR reached zero (0.13 / 0.31 / 0.39 at steps 100 / 200 / 300 of a 300-step run).
    "optim": {"lr": 1e-3, "warmup_steps": 50, "weight_decay": 1e-4, "b2": 0.999, "min_lr_ratio": 0.1},
    "loader": {"fg_fraction": 0.5, "workers": 0},
    "inference": {"overlap": 0.5, "sw_batch_size": 2},
    # A 3 mm node is about 14 mm^3: smaller predicted components are noise.
    "postprocess": {"min_volume_mm3": 10.0},
    "checkpoint": {"every": 500, "keep": 2},
}


# ----------------------------------------------------------------------------- config


# loader keys finetuning derives from other sections (load_finetune_config, make_loaders)
DERIVED_LOADER_KEYS = {
    "loader.patch_size": "site.patch", "loader.batch_size": "train.global_batch",
    "loader.hu_window": "site.window (or, with normalization=encoder, the encoder's pretraining window)",
}


def resolve_init(init: str) -> tuple[str, Path | None, dict | None]:
    """--init -> (kind, path, model config dict); kind is scratch | pretrain | export.

    pretrain: a pretraining workdir (config.yaml + checkpoints/) or its checkpoints dir.
    export: a folder holding model.json (read with lnfm.jobs.export.load_export)."""
    if init == "scratch":
        return "scratch", None, None
    path = Path(init)
    if not path.is_dir():
        raise ConfigError(f"{init}: --init must be a pretraining workdir, its checkpoints dir, an export dir or "
                          f"'scratch'")
    export = ExportFolder.detect(path)
    if export is not None:
        return "export", path, to_dict(read_meta(path).model)
    run = PretrainRun.detect(path)
    if run is not None:
        model = read_yaml(run.config).get("model")
        if not isinstance(model, dict):
            raise ConfigError(f"{run.config}: no model section to rebuild the encoder from")
        return "pretrain", run.root, model
    raise ConfigError(f"{init}: neither a pretraining workdir (config.yaml + checkpoints/) nor an export "
                      f"(model.json)")


def load_finetune_config(site: str, overrides: list[str] = (), *, init: str = "scratch", data: list[str] = (),
                         num_labeled: int | None = None, repeats: int | None = None,
                         quick: bool = False, unlabelled: list[str] = (), paste_into: list[str] = ()
                         ) -> FinetuneConfig:
    """Dataclass defaults <- DEFAULTS <- site preset <- QUICK (with quick) <- overrides; with a checkpoint --init
    the model section is the checkpoint's, plus the model keys of the user's own --site file and the model
    overrides (model.KEY=... or "model={KEY: ...}"). The sliding window `inference.roi` is `site.patch` (what
    validation, test and the export use) unless set, and `check_config` refuses a set one that differs."""
    extra = [f"init={json.dumps(init)}", f"data={json.dumps(list(data))}"]
    if unlabelled:
        extra.append(f"unlabelled={json.dumps(list(unlabelled))}")
    if paste_into:
        extra.append(f"paste_into={json.dumps(list(paste_into))}")
    if num_labeled is not None:
        extra.append(f"train.num_labeled={num_labeled}")
    if repeats is not None:
        extra.append(f"train.repeats={repeats}")
    refuse_derived(overrides, DERIVED_LOADER_KEYS, "finetuning")
    keys = override_keys(overrides, FinetuneConfig)
    # The options set these keys after the overrides: an override of one would be ignored without a word.
    options = {"init": "--init", "data": "--data", "unlabelled": "--unlabelled", "paste_into": "--paste-into",
               "train.num_labeled": "--num-labeled", "train.repeats": "--repeats"}
    by_option = {"init", "data"} | {k for k, v in (("unlabelled", unlabelled), ("paste_into", paste_into),
                                                   ("train.num_labeled", num_labeled), ("train.repeats", repeats))
                                    if v not in (None, [], ())}
    for key in sorted(keys & by_option):
        raise ConfigError(f"{key}: set by {options[key]}; give it there, not as an override as well")
    for key in sorted(keys):
        if key.startswith("data."):  # pretraining's data section; here `data` is the list of stores (--data)
            raise ConfigError(f"{key}: finetuning has no data section (--data lists its stores); the loader's "
                              f"settings are loader.{key.split('.', 1)[1]}")
    if {"optim.lr", "optim.base_lr"} <= keys:  # optim.lr replaces the base_lr scaling: one would be ignored
        raise ConfigError("optim.base_lr: optim.lr is given as well and replaces it; give one of them")
    user = (QUICK if quick else []) + list(overrides)
    data = config_data(FinetuneConfig, site, user + extra, kind="sites", defaults=DEFAULTS)
    if "optim.base_lr" in keys:  # DEFAULTS, a preset or --quick set optim.lr, which would replace the user's base_lr
        data["optim"] = {**(data.get("optim") or {}), "lr": None}
    cfg = from_dict(FinetuneConfig, data)
    encoder = resolve_init(cfg.init)[2]
    encoder = None if encoder is None else to_dict(from_dict(ModelConfig, encoder, "model"))
    # The keys the user set, on the command line or in their own --site file; a preset's, DEFAULTS', QUICK's or
    # --init's are not theirs (the refusals below and refuse_unread read this one notion).
    given = given_keys(FinetuneConfig, site, overrides, kind="sites", defaults=DEFAULTS, preset_key="site.name",
                       replaced=encoder and {"model": encoder})
    prior = sorted(k for k in ("postprocess.max_elongation", "postprocess.min_short_axis_mm") if k in given)
    if prior and cfg.tune_postprocess:  # the tuned prior would replace the user's in postprocess.json and the export
        default = "" if "tune_postprocess" in given else " (the default)"
        raise ConfigError(f"{_where(given, prior)}: tune_postprocess=true{default} replaces the size prior with the "
                          f"one tuned on the validation cases; set tune_postprocess=false to keep yours")
    if "roi" not in (data.get("inference") or {}):  # config.yaml records the window the run uses
        cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, roi=tuple(cfg.site.patch)))
    elif not keys & {"inference", "inference.roi"} and tuple(cfg.inference.roi) != tuple(cfg.site.patch):
        # the --site file set it (a run's config.yaml records its window): check_config's words blame the user
        by = " (an override)" if keys & {"site", "site.patch"} else " (--quick's)" if quick else ""
        raise ConfigError(f"{site}: inference.roi {list(cfg.inference.roi)} differs from site.patch "
                          f"{list(cfg.site.patch)}{by}; this --site file sets inference.roi, and finetuning windows "
                          f"are site.patch: remove inference.roi from the file")
    if encoder is not None:  # only the model section changes: the others were read above
        cfg = dataclasses.replace(cfg, model=_init_model(cfg, site, encoder, given, overrides))
    refuse_unread(given, unread_keys(cfg))  # a key the user set that the chosen modes never read
    # The loader and every evaluation normalise with the resolved values; config.yaml records them.
    norm = encoder_normalization(cfg.init) if cfg.normalization == "encoder" else None
    # The preset's window and PET scale give way to the encoder's silently; different ones the user set may not (a
    # run's config.yaml, given back as --site, records the encoder's pet_scale).
    if norm is not None and "loader.pet_scale" in given and cfg.loader.pet_scale != norm.pet_scale:
        raise ConfigError(f"{_where(given, ['loader.pet_scale'])}: with normalization=encoder finetuning uses the "
                          f"encoder's pretraining value {float(norm.pet_scale):g}; set normalization=site to choose it")
    if norm is not None and "site.window" in given and tuple(cfg.site.window) != tuple(norm.hu_window):
        raise ConfigError(f"{_where(given, ['site.window'])}: with normalization=encoder finetuning uses the encoder's "
                          f"pretraining window {[float(v) for v in norm.hu_window]}; set normalization=site to "
                          f"choose it")
    window, pet_scale = (norm.hu_window, norm.pet_scale) if norm else (cfg.site.window, cfg.loader.pet_scale)
    refuse_derived_in_files(given, {"loader.patch_size": ("site.patch", cfg.loader.patch_size, cfg.site.patch),
                                    "loader.hu_window": (DERIVED_LOADER_KEYS["loader.hu_window"], cfg.loader.hu_window,
                                                         window)}, "finetuning")
    refuse_batch_in_file(given, "loader.batch_size", cfg.loader.batch_size, cfg.train.global_batch, "finetuning")
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, hu_window=tuple(window),
                                                              pet_scale=float(pet_scale)))
    check_config(cfg)
    return cfg


def _init_model(cfg: FinetuneConfig, site: str, encoder: dict, given: dict[str, Path | None], overrides: list[str]
                ) -> ModelConfig:
    """The model under --init: the encoder's, then the model keys of the user's --site file (`given_keys`: those
    that differ from the encoder's), then the model overrides. A file key that changes the encoder's weight shapes
    is refused here, naming the file (an override's is, by `check_encoder_fits`)."""
    keys = [k.split(".", 1)[1] for k, file in given.items() if file and k.startswith("model.")]
    chain = load_yaml_with_base(preset_path("sites", site), "sites", cls=FinetuneConfig) if keys else {}
    from_file = {k: chain["model"][k] for k in keys}  # the value the files give (the nearest one's)
    # model.depth=3 and model={depth: 3} alike: the latter merges into the encoder's section
    overrides = [o for o in overrides if parse_override(o)[0][0] == "model"]
    model = apply_overrides({"model": {**encoder, **from_file}}, overrides, FinetuneConfig)["model"]
    if model["arch"] != encoder["arch"]:  # check_model would blame the encoder's own keys
        raise ConfigError(f"{_where(given, ['model.arch'])}={model['arch']}: the --init encoder {cfg.init} is a "
                          f"{encoder['arch']} encoder and finetuning keeps its architecture; drop model.arch")
    layout = from_file and _encoder_layout(from_dict(ModelConfig, encoder, "model"))
    if from_file and _encoder_layout(from_dict(ModelConfig, {**encoder, **from_file}, "model")) != layout:
        shaped = [f"model.{k}" for k, v in from_file.items()  # name only those that change shapes (not remat)
                  if _encoder_layout(from_dict(ModelConfig, {**encoder, k: v}, "model")) != layout]
        shaped = shaped or [f"model.{k}" for k in from_file]  # only together
        raise ConfigError(f"{_where(given, shaped)}: the --init encoder {cfg.init} has other weight shapes; "
                          f"finetuning keeps the encoder as it was pretrained: remove "
                          f"{'it' if len(shaped) == 1 else 'them'} from the file")
    return from_dict(ModelConfig, model, "model")


def _where(given: dict[str, Path | None], keys: list[str]) -> str:
    """`keys` as a refusal names them: those set where the first was (`given_keys`), after its file if a file
    set it."""
    file = given[keys[0]]
    same = ", ".join(k for k in keys if given[k] == file)
    return f"{file}: {same}" if file else same


def check_site(cfg: FinetuneConfig) -> None:
    """The site section: a voxel size, a patch of at least one voxel per axis, an increasing HU window,
    class names with background (label value 0) first."""
    check_target_spacing(cfg.site.spacing, "site.spacing")
    if min(cfg.site.patch) < 1:
        raise ConfigError(f"site.patch {list(cfg.site.patch)} must be three sizes of at least 1 voxel")
    problem = hu_window_problem(cfg.site.window, "site.window")
    if problem:
        raise ConfigError(problem)
    labels = list(cfg.site.labels)  # index = label value; metrics and reports take 0 as background
    if not labels or labels[0] != "background":
        raise ConfigError(f"site.labels {labels}: the first name must be 'background' (label value 0)")
    if any(not isinstance(n, str) or not n.strip() for n in labels) or len(set(labels)) != len(labels):
        raise ConfigError(f"site.labels {labels}: each class needs its own non-empty name")


def check_head(head: HeadConfig) -> None:
    """head.options: only keywords the chosen head's constructor takes (an unknown one is a TypeError at build)."""
    accepted = head_options(head.kind)
    unknown = sorted(set(head.options) - set(accepted))
    if unknown:
        raise ConfigError(f"head.options: the {head.kind} head takes no option {', '.join(map(repr, unknown))} "
                          f"(its options: {', '.join(accepted) or 'none'})")


def check_config(cfg: FinetuneConfig) -> None:
    """The finetuning sections' own ranges, before anything is read or written (the sections every training
    job shares, train / optim / checkpoint, are `lnfm.train.job.check_run_config`'s). Each refusal names the
    key and its valid range."""
    check_site(cfg)
    tc = cfg.train
    if tc.repeats < 1:
        raise ConfigError(f"train.repeats must be at least 1, got {tc.repeats}")
    top = 2**32 - 2 - tc.repeats  # seed + repeat (+1 for LoRA) seeds the loader's sampler: a 32-bit seed
    if not 0 <= tc.seed <= top:
        raise ConfigError(f"train.seed must be in [0, {top}] (train.seed + repeat seeds 32-bit samplers), "
                          f"got {tc.seed}")
    if not 0 < tc.val_fraction < 1:
        raise ConfigError(f"train.val_fraction must be in (0, 1) (the share of training cases held out for "
                          f"validation when the store has no val split), got {tc.val_fraction:g}")
    check_run_config(cfg)
    check_loader(cfg.loader)
    if cfg.loader.seed != 0:  # the loader samples with train.seed + repeat
        raise ConfigError(f"loader.seed={cfg.loader.seed} is not used by finetuning; set train.seed (repeat r "
                          f"samples with train.seed + r)")
    check_head(cfg.head)
    check_strategy(cfg.strategy)
    check_loss(cfg.loss)
    check_metrics(cfg.metrics)
    inf = cfg.inference
    if tuple(inf.roi) != tuple(cfg.site.patch):
        raise ConfigError(f"inference.roi {list(inf.roi)} differs from site.patch {list(cfg.site.patch)}: "
                          f"finetuning windows are site.patch (validation, test and the export); leave "
                          f"inference.roi unset")
    problem = (window_problem(inf.overlap, inf.sw_batch_size, "inference.overlap", "inference.sw_batch_size",
                              inf.sigma_scale, "inference.sigma_scale") or postprocess_problem(cfg.postprocess))
    if problem:
        raise ConfigError(problem)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Splits:
    pool: list[str]  # training cases the few-shot subsets are drawn from
    val: list[str]
    test: list[str]


@dataclasses.dataclass
class Case:
    case_id: str
    image: np.ndarray  # normalised (X, Y, Z, C)
    label: np.ndarray  # (X, Y, Z) int
    spacing: tuple[float, float, float]
    hu: np.ndarray | None  # the CT channel in HU as stored (post-processing's body mask), None without CT
    affine: np.ndarray  # of the stored grid


def make_splits(records: list[dict], val_fraction: float) -> Splits:
    """Train pool, validation and test case ids from the manifest `split` field. Without a
    val split, a fixed share of the training cases (seed-independent) becomes validation."""
    by = {s: sorted(r["case_id"] for r in records if r.get("split") == s and r.get("label_path"))
          for s in ("train", "val", "test")}
    if not by["train"]:
        raise DataError("no labelled cases in the train split of the store")
    if not by["test"]:
        raise DataError("no labelled cases in the test split of the store (prepare with split fractions that "
                        "leave test cases)")
    pool, val = by["train"], by["val"]
    if not val:
        if len(pool) < 2:
            raise DataError("the store has no val split and a single training case: nothing to validate on")
        n_val = max(1, round(val_fraction * len(pool)))
        order = np.random.default_rng(np.random.SeedSequence([0, 0x56414C])).permutation(len(pool))
        val = sorted(pool[i] for i in order[:n_val])
        pool = sorted(set(pool) - set(val))
        if not pool:
            raise DataError(f"train.val_fraction={val_fraction:g} holds out all {len(val)} training case(s) for "
                            f"validation (the store has no val split): none is left to train on")
    check_disjoint(pool, val=val, test=by["test"])
    check_disjoint(val, test=by["test"])
    # The same scan under two ids (a copy listed twice) would evaluate on a training case.
    scan = {r["case_id"]: pseudo_labels.scan_fingerprint(r) for r in records if r.get("intensity")}
    training = {scan[i]: i for i in pool if i in scan}
    for kind, ids in (("validation", val), ("test", by["test"])):
        for i in ids:
            twin = training.get(scan.get(i))
            if twin is not None:
                raise DataError(f"the {kind} case {i} is the same scan as the training case {twin} (a scan "
                                f"listed twice): it would evaluate on training data; prepare each scan once")
    return Splits(pool, val, by["test"])


def model_input(image: np.ndarray, rec: dict, loader_cfg: LoaderConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """A stored image (raw units, as `read_case` gives it) as the model sees it, and its CT channel
    in HU (post-processing's body mask; None without CT)."""
    names = [c.upper() for c in rec.get("channels") or ["CT"]]
    hu = image[..., names.index("CT")] if "CT" in names else None
    return normalize(image, loader_cfg, rec.get("channels")), hu


def load_cases(stores: list[str], records: dict[str, tuple[str, dict]], ids: list[str],
               loader_cfg: LoaderConfig) -> list[Case]:
    out = []
    for cid in ids:
        store, rec = records[cid]
        image, label = read_case(store, rec)
        norm, hu = model_input(image, rec, loader_cfg)
        out.append(Case(cid, norm, label.astype(np.int32), tuple(float(s) for s in rec["spacing"]), hu,
                        np.asarray(rec["affine"], float)))
    return out


# ----------------------------------------------------------------------------- model


def _encoder_layout(model: ModelConfig) -> list[tuple]:
    """(path, shape) of every parameter of the encoder `model` describes (abstract: nothing is allocated or
    compiled; the encoder alone, a third of the segmenter's time)."""
    encoder = nnx.eval_shape(lambda: build_encoder(model, nnx.Rngs(0)))
    return sorted((tuple(map(str, path)), tuple(v.shape)) for path, v in nnx.to_flat_state(nnx.state(encoder,
                                                                                                   nnx.Param)))


def check_encoder_fits(cfg: FinetuneConfig) -> None:
    """The encoder `cfg.model` describes (the --init encoder's model plus any model.* overrides) must hold
    the --init encoder's weights: an override that changes a parameter's shape (patch size, width,
    depth, ...) is a config error, before anything is written."""
    kind, _, init_model = resolve_init(cfg.init)
    if kind == "scratch" or init_model is None:
        return
    try:
        original = from_dict(ModelConfig, init_model)
    except ConfigError:
        return  # read as the run's config was: the build itself reports it
    if _encoder_layout(original) != _encoder_layout(cfg.model):
        changed = [k for k, v in to_dict(cfg.model).items() if to_dict(original).get(k) != v]
        raise ConfigError(f"{cfg.init}: model overrides ({', '.join(f'model.{k}' for k in changed)}) change the "
                          f"shapes of the --init encoder's weights; finetune it as it was pretrained (drop them)")


def build_model(cfg: FinetuneConfig, seed: int, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Sharded segmenter (+ LoRA adapters with strategy.freeze=lora), pretrained encoder loaded."""
    num_classes = len(cfg.site.labels)

    model = create_sharded_model(lambda: segmenter_from_config(cfg.model, cfg.head, num_classes, nnx.Rngs(seed)),
                                 mesh, cfg.mesh.rules)
    kind, path, _ = resolve_init(cfg.init)
    if kind == "pretrain":
        # Pretraining saved nnx.State trees; restore only params["encoder"] into our shardings.
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              nnx.state(model.encoder, nnx.Param))
        checkpoints = PretrainRun(path).checkpoints
        # a pretraining run still training rotates its checkpoints: read it once it has finished
        with lock_folder(path, shared=True, enabled=jax.process_index() == 0,
                         then="finetune from it when it has finished"):
            encoder = restore_params(checkpoints, nnx.State({"encoder": target}))["encoder"]
        load_encoder_state(model, encoder if isinstance(encoder, nnx.State) else nnx.State(encoder))
        log.info("encoder initialised from the pretraining run (--init)")  # no paths in logs
    elif kind == "export":
        try:
            exported = load_export(path)
        except ExportError as e:
            raise ConfigError(str(e)) from None
        load_encoder_state(model, exported.encoder)
        log.info("encoder initialised from the export (--init)")
    if cfg.strategy.freeze == "lora":
        apply_lora(model.encoder, cfg.strategy.lora_rank, cfg.strategy.lora_alpha, rngs=nnx.Rngs(seed + 1))
    if kind == "export" or cfg.strategy.freeze == "lora":
        # Exported weights and new adapters are created off-mesh: lay every array out on the mesh again.
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_sharding(state, mesh, cfg.mesh.rules)))
    return model


def make_predictor(cfg: FinetuneConfig, softmax, states: tuple, postprocess: PostprocessConfig | None = None
                   ) -> Predictor:
    """The inference `lnfm predict` runs, over the current weights (`softmax` from `softmax_fn`)."""
    return Predictor(lambda x: np.asarray(softmax(states, x)), tuple(cfg.site.patch), len(cfg.site.labels),
                     cfg.inference, postprocess or cfg.postprocess)


def tuned_postprocess(cfg: FinetuneConfig, predictor: Predictor, val_cases: list[Case]) -> PostprocessConfig:
    """cfg.postprocess with the node size prior that maximises the validation cases' mean Dice
    (`lnfm.eval.postprocess.tune_size_prior`); unchanged without validation cases or tuning."""
    if not cfg.tune_postprocess or not val_cases:
        return cfg.postprocess
    bare = dataclasses.replace(predictor, postprocess=without_size_prior(predictor.postprocess))
    masks = [bare(c.image, c.spacing, c.hu).labels > 0 for c in val_cases]
    short, elong, val_dice = tune_size_prior(masks, [c.label > 0 for c in val_cases], [c.spacing for c in val_cases])
    log.info("size prior tuned on %d validation case(s): min short axis %.1f mm, max elongation %s "
             "(validation Dice %.4f)", len(val_cases), short, elong or "off", val_dice)
    return dataclasses.replace(cfg.postprocess, min_short_axis_mm=short, max_elongation=elong)


def _full_state(graphdef, params, frozen, rest) -> dict:
    return nnx.to_pure_dict(nnx.state(merge_model(graphdef, params, frozen, rest)))


def load_finetuned(workdir: str | Path, mesh: jax.sharding.Mesh | None = None) -> tuple[nnx.Module, FinetuneConfig]:
    """The best model of a finetuning workdir (repeat 0's for a multi-repeat run, or that of the repeat
    DIR/repeat_<r> names) and its config."""
    run = FinetuneRun.detect(workdir)
    if run is None:
        raise FileNotFoundError(f"{workdir}: not a finetuning workdir (config.yaml and best/ expected)")
    first = run.first()
    cfg = from_dict(FinetuneConfig, read_yaml(first.config))
    cfg = dataclasses.replace(cfg, init="scratch")
    mesh = mesh or make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    model = build_model(cfg, 0, mesh)
    state = nnx.state(model)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.to_pure_dict(state))
    ckpt = Checkpointer(first.best, CheckpointConfig(keep=1, async_save=False))
    restored = ckpt.restore_latest({"model": target})
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{first.best}: no saved model")
    nnx.replace_by_pure_dict(state, restored[0]["model"])
    nnx.update(model, state)
    return model, cfg


# ----------------------------------------------------------------------------- one repeat


@dataclasses.dataclass
class Training:
    """What one repeat trains with (see `build_training`)."""
    graphdef: nnx.GraphDef
    state: dict  # lnfm.train.state train state (params = trainable leaves only)
    shardings: Any
    step_fn: Any  # jitted step(state, batch) -> (state, metrics)
    filt: Any  # the strategy's trainable filter
    full_target: Any  # abstract full model state (pure dict, with shardings): the best-model restore target
    head_params: int
    head_flops: float
    trainable_params: int
    total_params: int


def build_training(cfg: FinetuneConfig, seed: int, mesh: jax.sharding.Mesh) -> Training:
    """Sharded segmenter + strategy split + optimizer (LLRD scales) -> train state and jitted step."""
    model = build_model(cfg, seed, mesh)
    hp = head_param_count(model.head)
    hf = head_flops(model.head, (1, *cfg.site.patch, cfg.model.in_channels))
    log.info("head %s: %.4fM parameters, %.4f GFLOPs per %s patch", cfg.head.kind, hp / 1e6, hf / 1e9,
             "x".join(map(str, cfg.site.patch)))
    filt = trainable_filter(model, cfg.strategy)
    trainable = nnx.state(model, nnx.All(nnx.Param, filt))
    total_params = count_params(nnx.state(model, nnx.Param))
    n_train = count_params(trainable)
    scales = None
    if cfg.strategy.llrd != 1.0 and cfg.strategy.freeze in ("none", "first_k"):
        layer_of, n_units = layer_index_fn(model)
        scales = layer_lr_scales(trainable, layer_of, n_units, cfg.strategy.llrd)
    tx, schedule = make_optimizer(cfg.optim, trainable, cfg.train.steps, cfg.train.global_batch, scales)
    full_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                               nnx.to_pure_dict(nnx.state(model)))
    replicated = NamedSharding(mesh, PartitionSpec())
    graphdef, state, shardings = create_train_state(model, tx, seed, replicated, trainable=filt)
    del model  # its arrays now belong to the train state (donated every step)
    log.info("strategy %s: %.3fM of %.3fM parameters train", cfg.strategy.freeze, n_train / 1e6, total_params / 1e6)
    loss_cfg = cfg.loss
    masked = bool(cfg.paste_into)  # pasted patches label the voxels the loss must not see IGNORE_LABEL

    def loss_fn(params, frozen, rest, batch, key):
        out = merge_model(graphdef, params, frozen, rest)(batch["image"])
        labels = batch["label"]
        if masked:
            return model_output_loss(loss_cfg, out, jnp.maximum(labels, 0), labels != IGNORE_LABEL), {}
        return model_output_loss(loss_cfg, out, labels), {}

    step_fn = make_train_step(loss_fn, tx, schedule, shardings, batch_sharding(mesh),
                              accum_steps=cfg.train.accum_steps)
    return Training(graphdef, state, shardings, step_fn, filt, full_target, hp, hf, n_train, total_params)


def save_best(ckpt: Checkpointer, step: int, tree: dict, config: dict, record: dict) -> None:
    """Commit the new best model, with its best.json `record` inside the step, before the previous
    one goes: the keep=1 manager removes older steps only after the new step is committed, so a
    kill or a full disk during the save leaves the previous best and its record intact. Steps at
    or after `step` come from a future that a resume from an earlier checkpoint discarded; they
    are dropped first (the manager keeps the highest step)."""
    for old in ckpt.all_steps():
        if old >= step:
            ckpt.manager.delete(old)
    ckpt.save(step, tree, config=config, files={BEST_JSON: json.dumps(record)})
    ckpt.wait()


def run_repeat(cfg: FinetuneConfig, repeat: int, rdir: Path, mesh: jax.sharding.Mesh, splits: Splits,
               val_cases: list[Case], test_cases: list[Case], records: dict,
               pseudo: tuple[str, list[dict]] | None = None,
               on_best: Callable[[Predictor], None] | None = None,
               paste_into: list[tuple[str, dict]] = (), on_start: Callable[[], None] = lambda: None) -> dict | None:
    """Train, validate, keep the best and test one repeat; returns its summary (None if preempted).
    `pseudo` = (store, records) of pseudo-labelled scans trained on beside the labelled subset;
    `on_best` receives the best model's predictor (tuned post-processing) after the test; `paste_into`
    are the scans labelled nodes are pasted into (store, record); `on_start` runs once the repeat's
    checkpoint restored (the run's root config.yaml is written then)."""
    tc, pid = cfg.train, jax.process_index()
    seed = tc.seed + repeat
    train_ids = select_subset(splits.pool, tc.num_labeled, seed)
    check_disjoint(train_ids, val=splits.val, test=splits.test)
    stores, loader_ids = list(cfg.data), list(train_ids)
    # each store's records as `_check` read them: the loader reads no manifest again
    manifests = [[rec for s, rec in records.values() if s == store] for store in stores]
    pseudo_ids = [r["case_id"] for r in pseudo[1]] if pseudo is not None else []
    if pseudo is not None:
        check_disjoint(pseudo_ids, val=splits.val, test=splits.test)
        stores, loader_ids, manifests = stores + [pseudo[0]], loader_ids + pseudo_ids, manifests + [pseudo[1]]
    rrun = RepeatRun(rdir)
    # closed on every path, an exception included; a resumed repeat's config.yaml waits for its restore (`fit`)
    with open_workdir(rdir, cfg, is_main=pid == 0, write_config=not has_checkpoints(rrun.checkpoints)) as writer:
        log.info("repeat %d (seed %d): %d labelled training case(s), %d val, %d test", repeat, seed, len(train_ids),
                 len(splits.val), len(splits.test))

        t_build = time.time()
        tr = build_training(cfg, seed, mesh)
        graphdef, state, shardings, step_fn, filt = tr.graphdef, tr.state, tr.shardings, tr.step_fn, tr.filt
        best_target = tr.full_target
        hp, hf, n_train, total_params = tr.head_params, tr.head_flops, tr.trainable_params, tr.total_params
        writer.write(0, head_params=hp, head_gflops=hf / 1e9, trainable_params=n_train, total_params=total_params)
        bsh = batch_sharding(mesh)
        nproc = jax.process_count()
        loader_cfg = dataclasses.replace(cfg.loader, seed=seed)  # its patch and batch: `_check` resolved them
        loader = make_loader(stores, loader_cfg, split="train", labels=True, case_ids=loader_ids,
                             shard_index=pid, shard_count=nproc, paste_into=paste_into, manifests=manifests)
        data_iter = iter(loader)
        best_ckpt = Checkpointer(rrun.best, CheckpointConfig(keep=1, async_save=False))
        best = rrun.best_record() or {"step": -1, "val_dice": -1.0}

        def started(start: int) -> None:  # the checkpoint restored (or there was none)
            on_start()
            if best["step"] > start:  # a best model saved after the restored step is from the lost future
                best.update(step=-1, val_dice=-1.0)

        softmax = softmax_fn(graphdef)

        def validate(step: int, st: dict) -> None:
            ema = ema_params(st["opt_state"])  # with optim.ema_decay, the average is what is validated and kept
            states = (st["params"] if ema is None else ema, st["frozen"], st["rest"])
            predictor = make_predictor(cfg, softmax, states)
            scores = [dice_score(predictor(c_.image, c_.spacing, c_.hu).labels > 0, c_.label > 0) for c_ in val_cases]
            val_dice = float(np.mean(scores))
            writer.write(step, val_dice=val_dice)
            log.info("step %d: validation Dice %.4f (previous best %.4f)", step, val_dice, max(best["val_dice"], 0.0))
            if val_dice >= best["val_dice"]:  # ties go to the later, longer-trained model
                best.update(step=step, val_dice=val_dice)
                save_best(best_ckpt, step, {"model": _full_state(graphdef, *states)}, to_dict(cfg), best)

        def next_batch() -> dict:
            return device_batch(next(data_iter), bsh, {"image": np.float32, "label": np.int32})

        hooks = (Hook(tc.eval_every, validate),) if tc.eval_every else ()
        tokens = tc.global_batch * math.prod(cfg.site.patch)
        result = fit(step_fn, state, shardings, next_batch, data_iter, workdir=rdir, checkpoint=cfg.checkpoint,
                     mesh=mesh, rules=cfg.mesh.rules, total_steps=tc.steps, writer=writer,
                     throughput=Throughput(tc.global_batch, tokens, None), config=to_dict(cfg), log_every=tc.log_every,
                     hooks=hooks, desc=f"finetune[{repeat}]", on_resume=started)
        if result.preempted:
            best_ckpt.close()
            return None
        with use_rules(mesh, cfg.mesh.rules):
            if best["step"] != result.step and (not tc.eval_every or result.step % tc.eval_every):
                validate(result.step, result.state)
            repeat_time = time.time() - t_build  # build, compile, train, validate
            restored_best = best_ckpt.restore_latest({"model": best_target})
            best_ckpt.close()
            if restored_best is None:
                raise RuntimeError(f"{rrun.best}: the best model was not saved")
            # Put the best weights into the train-state layout, so the validation predictor is reused.
            best_model = merge_model(graphdef, result.state["params"], result.state["frozen"], result.state["rest"])
            full = nnx.state(best_model)
            nnx.replace_by_pure_dict(full, restored_best[0]["model"])
            nnx.update(best_model, full)
            _, *best_states = split_model(best_model, filt)
            post = tuned_postprocess(cfg, make_predictor(cfg, softmax, tuple(best_states)), val_cases)
            if pid == 0:
                write_json(rrun.postprocess, to_dict(post))
            predictor = make_predictor(cfg, softmax, tuple(best_states), post)
            cases = []
            for case in test_cases:
                pred = predictor(case.image, case.spacing, case.hu).labels
                if pid == 0:  # the masks the metrics score, on the stored grid (what predict maps to the scan)
                    write_nifti(rrun.test_mask(case.case_id), pred, case.affine)
                metrics = evaluate_case(pred > 0, case.label > 0, case.spacing, **cfg.metrics.kwargs())
                cases.append({"case_id": case.case_id, **metrics})
            if on_best is not None:
                on_best(predictor)
        agg = summarize([{k: v for k, v in c.items() if k != "case_id"} for c in cases])
        summary = {**{k: agg.get(k) for k in METRICS}, "cases": cases, "aggregate": agg,
                   "repeat": repeat, "seed": seed, "num_labeled": len(train_ids), "train_ids": train_ids,
                   "pseudo_labelled": len(pseudo_ids),
                   "best_step": best["step"], "best_val_dice": best["val_dice"],
                   "trainable_params": n_train, "total_params": total_params, "head_params": hp,
                   "head_gflops": hf / 1e9,
                   # the optimizer steps' own seconds (the first one compiles), without validation and saves:
                   # what an equal-time comparison gives a peer
                   "train_time_s": result.train_s, "repeat_time_s": repeat_time}
        writer.write(result.step, **{f"test_{k}": v for k, v in summary.items() if k in METRICS and v is not None})
        log.info("repeat %d test: %s", repeat, ", ".join(f"{k}={summary[k]:.4f}" for k in METRICS[:6]
                                                            if isinstance(summary.get(k), float)))
        return summary


def self_train(cfg: FinetuneConfig, repeat: int, rdir: Path, mesh: jax.sharding.Mesh, splits: Splits,
               val_cases: list[Case], test_cases: list[Case], records: dict,
               unlabelled: list[tuple[str, dict]], on_start: Callable[[], None] = lambda: None) -> dict | None:
    """One self-training repeat: the teacher (rdir/teacher), its pseudo-labels of the `unlabelled`
    (store, record) scans (rdir/pseudo_labels), then the student in rdir; the repeat keeps the one
    with the better validation Dice (rdir/selected.json). Returns the kept model's summary with
    both models' figures, train_time_s covering all three stages (None if preempted)."""
    run = RepeatRun(rdir)
    store, pid = str(run.pseudo_labels), jax.process_index()
    teacher = read_json(run.teacher.root / SUMMARY) if pseudo_labels.is_complete(store) else None
    if teacher is None:
        if pid == 0 and run.pseudo_labels.exists():
            shutil.rmtree(run.pseudo_labels)  # interrupted before it was complete: this job made it, and redoes it
        timing: dict[str, float] = {}

        def label(predictor: Predictor) -> None:
            t0 = time.time()

            def predict(rec: dict, image: np.ndarray) -> np.ndarray:
                norm, hu = model_input(image, rec, cfg.loader)
                return predictor(norm, tuple(float(x) for x in rec["spacing"]), hu).labels

            pseudo_labels.write_pseudo_store(store, unlabelled, predict, write=pid == 0)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("lnfm_pseudo_labels")
            timing["pseudo_label_s"] = time.time() - t0

        teacher = run_repeat(cfg, repeat, run.teacher.root, mesh, splits, val_cases, test_cases, records,
                             on_best=label, on_start=on_start)
        if teacher is None:
            return None
        teacher["pseudo_label_s"] = timing["pseudo_label_s"]
        if pid == 0:
            write_json(run.teacher.root / SUMMARY, teacher)
    scans = read_manifest(store)
    ids = [r["case_id"] for r in scans]
    log.info("repeat %d: the teacher (test Dice %.4f) pseudo-labelled %d of %d unlabelled scan(s) (%d predicted "
             "empty, left out); training the student", repeat, teacher["dice"] or 0.0, len(ids), len(unlabelled),
             len(unlabelled) - len(ids))
    if not ids:
        raise DataError("the teacher predicted no lymph node in any unlabelled scan: nothing to self-train on "
                        "(train without --unlabelled)")
    student = run_repeat(cfg, repeat, rdir, mesh, splits, val_cases, test_cases, records, pseudo=(store, scans),
                         on_start=on_start)
    if student is None:
        return None
    # Pseudo-labels can also mislead: the repeat keeps whichever model validates better (ties: the student).
    kept = "teacher" if teacher["best_val_dice"] > student["best_val_dice"] else "student"
    if pid == 0:
        write_json(run.selected, {"model": kept, "teacher_val_dice": teacher["best_val_dice"],
                                  "student_val_dice": student["best_val_dice"]})
    log.info("repeat %d: validation Dice teacher %.4f, student %.4f: the %s is kept", repeat,
             teacher["best_val_dice"], student["best_val_dice"], kept)
    out = dict(teacher if kept == "teacher" else student)
    out.pop("pseudo_label_s", None)
    out["self_training"] = {"kept": kept, "unlabelled": len(unlabelled), "pseudo_labelled": len(ids),
                            "teacher_dice": teacher["dice"], "teacher_best_val_dice": teacher["best_val_dice"],
                            "student_dice": student["dice"], "student_best_val_dice": student["best_val_dice"],
                            "teacher_train_time_s": teacher["train_time_s"],
                            "pseudo_label_s": teacher["pseudo_label_s"],
                            "student_train_time_s": student["train_time_s"]}
    # what an equal-time comparison gives a peer: every stage that made this model
    out["train_time_s"] = teacher["train_time_s"] + teacher["pseudo_label_s"] + student["train_time_s"]
    return out


def unlabelled_records(stores: list[str], records: dict[str, tuple[str, dict]], splits: Splits,
                       use: str = "self-training on it") -> list[tuple[str, dict]]:
    """The training-split scans of the --unlabelled (or --paste-into) stores, as (store, record), each
    scan once. Scans are matched by content (`scan_fingerprint`), not by case id: one that is a
    labelled training case keeps its real label (left out here); one that is a validation or test
    case of --data is refused, since training on it (`use`) would train on the evaluation."""
    if not stores:
        return []
    manifests = check_stores(stores, split="train")
    fingerprint = pseudo_labels.scan_fingerprint
    held_out = {fingerprint(records[i][1]): (kind, i) for kind, ids in (("validation", splits.val),
                                                                         ("test", splits.test)) for i in ids}
    out, seen = [], {fingerprint(records[i][1]) for i in splits.pool}
    for store, manifest in zip(stores, manifests):
        for rec in manifest:
            key = fingerprint(rec)
            if rec.get("split") != "train" or key in seen:
                continue
            if key in held_out:
                kind, cid = held_out[key]
                raise DataError(f"{store}: training scan {rec['case_id']} is the {kind} case {cid} of --data; "
                                f"{use} would train on the evaluation (prepare the unlabelled scans "
                                f"without it)")
            seen.add(key)
            out.append((store, rec))
    if not out:
        raise DataError(f"{','.join(stores)}: no training-split scan that is not already a labelled training case "
                        f"of --data: nothing to {'pseudo-label' if use.startswith('self') else 'paste into'}")
    return out


# ----------------------------------------------------------------------------- the job


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def combine(cfg: FinetuneConfig, runs: list[dict]) -> dict:
    """summary.json: test metrics (means over repeats when R > 1) with per-case rows and per-repeat summaries."""
    head = {"site": cfg.site.name, "init": resolve_init(cfg.init)[0],  # scratch|pretrain|export, no path
            "head": cfg.head.kind, "strategy": cfg.strategy.freeze,
            "labels": cfg.site.labels}
    if len(runs) == 1:
        return {**head, **runs[0]}
    keys = list(METRICS) + ["best_val_dice", "train_time_s"]
    mean, std = {}, {}
    for k in keys:
        mean[k], std[k] = _mean_std([r.get(k) for r in runs])
    cases = [{"repeat": r["repeat"], **c} for r in runs for c in r["cases"]]
    first = runs[0]
    return {**head, **{k: mean[k] for k in METRICS}, "mean": mean, "std": std, "cases": cases,
            "repeats": runs, "num_labeled": first["num_labeled"], "trainable_params": first["trainable_params"],
            "total_params": first["total_params"], "head_params": first["head_params"],
            "head_gflops": first["head_gflops"], "train_time_s": float(sum(r["train_time_s"] for r in runs))}


@dataclasses.dataclass
class _Data:
    """What finetuning's checks resolved (see `_check`)."""
    records: dict[str, tuple[str, dict]]  # case id -> (store, manifest record)
    splits: Splits
    unlabelled: list[tuple[str, dict]]  # self-training's scans to pseudo-label (store, record)
    paste_into: list[tuple[str, dict]]  # scans labelled nodes are pasted into (store, record)


def run(cfg: FinetuneConfig, workdir: str | Path) -> int:
    """Finetune (or resume) into `workdir` and write summary.json. Returns the exit code."""
    init = resolve_init(cfg.init)[1]
    return run_training_job(cfg, FinetuneRun(Path(workdir)),
                            inputs={"--init": init, "--data": cfg.data, "--unlabelled": cfg.unlabelled,
                                    "--paste-into": cfg.paste_into},
                            resume_keys=RESUME_KEYS, check=_check, train=_train, tensorboard=False,
                            check_memory=lambda checked, mesh: check_memory(checked.cfg),
                            derived_keys=tuple(DERIVED_LOADER_KEYS))


# The cases of each split, recorded at the first start: a resume over a store that gained or lost cases since
# would train on a former validation case and compare Dice over other validation sets.
SPLITS_RECORD = SPLITS


def check_patch_grid(patch, multiple) -> None:
    """site.patch holds whole encoder tokens at the deepest feature stride (`Segmenter.multiple`), which the
    head's down-sampling steps divide: otherwise the first step fails with a traceback after the workdir is written."""
    if any(p % m for p, m in zip(patch, multiple)):
        fit = [-(-p // m) * m for p, m in zip(patch, multiple)]
        raise ConfigError(f"site.patch {list(patch)} is not a whole number of the encoder's deepest stride "
                          f"{list(multiple)} on every axis (model.patch_size for ViT, its last stage for Swin); "
                          f"use a multiple, e.g. {fit}")


def _check(cfg: FinetuneConfig) -> Checked:
    """Every check of the data, the init and the labels, before anything is written or compiled."""
    records: dict[str, tuple[str, dict]] = {}
    for store, manifest in zip(cfg.data, check_stores(cfg.data)):
        for rec in manifest:
            if rec["case_id"] in records:
                raise DataError(f"{store}: case id {rec['case_id']} also occurs in {records[rec['case_id']][0]}")
            records[rec["case_id"]] = (store, rec)
    all_records = [r for _, r in records.values()]
    splits = make_splits(all_records, cfg.train.val_fraction)
    kind, init_path, _ = resolve_init(cfg.init)
    if kind == "pretrain" and not has_checkpoints(PretrainRun(init_path).checkpoints):
        raise ConfigError(f"{cfg.init}: the pretraining run has no saved checkpoint in its checkpoints/ (it stopped "
                          f"before its first save); give a run that has saved one, or --init scratch")
    if kind == "pretrain":  # a damaged step failed the restore in build_model, after the workdir was written
        with lock_folder(init_path, shared=True, enabled=jax.process_index() == 0,  # as build_model reads it
                         then="finetune from it when it has finished"):
            check_latest_step(PretrainRun(init_path).checkpoints)
    if kind == "export":  # a damaged export fails before the workdir is written
        try:
            check_weights_export(init_path)
        except (ExportError, LnfmError) as e:
            raise ConfigError(str(e)) from None
    n = cfg.train.num_labeled
    if n is not None and n < 1:  # fails before the workdir is written (select_subset would, after)
        raise ConfigError(f"train.num_labeled: {n} must be at least 1")
    if n is not None and n > len(splits.pool):  # documented: the whole split is used (studies rely on it)
        log.warning("train.num_labeled=%d but the data has %d labelled training case(s): all of them are used",
                    n, len(splits.pool))
    unlabelled = unlabelled_records(cfg.unlabelled, records, splits)
    paste_into = unlabelled_records(cfg.paste_into, records, splits, "pasting labelled nodes into it")
    if paste_into and unlabelled:  # a student's donors would include the teacher's pseudo-labelled nodes
        raise ConfigError("paste_into and unlabelled (self-training) cannot be combined: choose one")
    if paste_into and not 0.0 < cfg.loader.paste_p <= 1.0:
        raise ConfigError(f"loader.paste_p: {cfg.loader.paste_p} must be in (0, 1] with paste_into")
    channels = {len(r["channels"]) for r in all_records + [r for _, r in unlabelled + paste_into]}
    if len(channels) != 1:
        raise DataError(f"the stores mix cases with {sorted(channels)} channels")
    n_ch = channels.pop()
    if kind == "scratch":  # a new encoder takes the data's channels unless model.in_channels names others
        if cfg.model.in_channels not in (n_ch, ModelConfig.in_channels):
            check_channels(n_ch, cfg.model.in_channels, "model.in_channels (leave it unset to take the data's)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_channels=n_ch))
    check_channels(n_ch, cfg.model.in_channels, "the pretrained encoder")
    check_encoder_fits(cfg)
    seg = nnx.eval_shape(lambda: segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0)))
    check_patch_grid(cfg.site.patch, seg.multiple)
    if cfg.strategy.freeze == "first_k":  # strategy.k's upper bound: the encoder's units (abstract: nothing allocated)
        check_units(cfg.strategy, len(seg.encoder.units()))  # the rest of the section: check_config
    # A node's highest label value (stores prepared before it was recorded: its majority class).
    labelled = [records[i] for i in splits.pool + splits.val + splits.test]
    max_class, store, rec = max(((int(n.get("max_class", n.get("class", 1))), s, r) for s, r in labelled
                                 for n in r.get("nodes", [])), key=lambda t: t[0], default=(1, None, None))
    if max_class >= len(cfg.site.labels):
        raise DataError(f"{store}: the labels reach class {max_class} (case {rec['case_id']}) but site.labels names "
                        f"only {len(cfg.site.labels)} classes ({cfg.site.labels})")
    # No resampling on the fly: the model is exported with the spacing it really trained at.
    # The pseudo-labelled scans train beside the labelled ones: one contract and one spacing for all stores.
    extra_stores = list(dict.fromkeys(s for s in cfg.unlabelled + cfg.paste_into if s not in cfg.data))
    prep = training_preprocessing(cfg.data + extra_stores,
                                  [records[i] for i in splits.pool + splits.val + splits.test] + unlabelled
                                  + paste_into,
                                  cfg.site.spacing, Normalization(cfg.loader.hu_window, cfg.loader.pet_scale),
                                  cfg.site.patch)
    # config.yaml records the patch and the per-process batch the loader reads (DERIVED_LOADER_KEYS)
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(
        cfg.loader, patch_size=tuple(cfg.site.patch), batch_size=cfg.train.global_batch // jax.process_count()))
    used = splits.pool + splits.val + splits.test
    content = [(key, s, {i: content_fingerprint(records[i][1]) for i in used if records[i][0] == s})
               for key, s in content_keys("store", cfg.data)]
    # the scans read from --unlabelled / --paste-into (pseudo-labelled, pasted into) on every resume too
    for flag, extra in (("unlabelled", unlabelled), ("paste_into", paste_into)):
        content += [(key, s, {r["case_id"]: content_fingerprint(r) for st, r in extra if st == s})
                    for key, s in content_keys(flag, getattr(cfg, flag))]
    return Checked(cfg, prep, _Data(records, splits, unlabelled, paste_into),
                   records={SPLITS_RECORD: {"train": splits.pool, "val": splits.val, "test": splits.test}},
                   content=content)


def _train(checked: Checked, run_dirs: FinetuneRun, mesh: jax.sharding.Mesh, writer: MetricsWriter) -> dict | None:
    """Every repeat, then their combined summary (None when a signal stopped a repeat)."""
    cfg, prep, records, splits = checked.cfg, checked.preprocessing, checked.context.records, checked.context.splits
    unlabelled = checked.context.unlabelled
    if not any(records[i][1].get("split") == "val" for i in splits.val):  # logged once every check has passed
        log.info("the store has no val split: %d training case(s) held out for validation", len(splits.val))
    if jax.process_index() == 0:
        notice = cpu_notice(cfg)
        if notice:
            print(notice, file=sys.stderr)
    log.info("spacing %s mm (the stores'); CT window %s HU, PET / %g (%s)", list(prep.contract.spacing),
             list(cfg.loader.hu_window), cfg.loader.pet_scale,
             "as the encoder was pretrained" if cfg.normalization == "encoder" and cfg.init != "scratch"
             else "site preset")
    log.info("site %s, init %s, head %s, strategy %s; mesh %s over %d devices", cfg.site.name,
             resolve_init(cfg.init)[0], cfg.head.kind, cfg.strategy.freeze, dict(mesh.shape), jax.device_count())
    val_cases = load_cases(cfg.data, records, splits.val, cfg.loader)
    test_cases = load_cases(cfg.data, records, splits.test, cfg.loader)
    runs = []
    for r in range(cfg.train.repeats):
        rdir = run_dirs.repeat(r, cfg.train.repeats).root
        # the run's config.yaml (held back on a resume) once a repeat's checkpoint restored
        if unlabelled:
            out = self_train(cfg, r, rdir, mesh, splits, val_cases, test_cases, records, unlabelled,
                             on_start=writer.record_config)
        else:
            out = run_repeat(cfg, r, rdir, mesh, splits, val_cases, test_cases, records,
                             paste_into=checked.context.paste_into, on_start=writer.record_config)
        if out is None:
            return None
        runs.append(out)
    summary = combine(cfg, runs)
    log.info("summary: %s", ", ".join(f"{k}={summary[k]:.4f}" if isinstance(summary.get(k), float)
                                      else f"{k}={summary.get(k)}" for k in METRICS[:6]))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lnfm finetune",
                                 description="Finetune a pretrained encoder for lymph-node segmentation.")
    ap.add_argument("--site", required=True, help="site preset (head_neck, axilla, mediastinum, abdomen, pelvis) "
                                                  "or a YAML file")
    ap.add_argument("--data", required=True, help="comma-separated prepared stores with labelled cases")
    ap.add_argument("--init", required=True, help="pretraining workdir, its checkpoints dir, export dir, or scratch")
    ap.add_argument("--workdir", required=True, help="output folder; an existing run there is resumed")
    ap.add_argument("--unlabelled", default="", help="comma-separated prepared stores of unlabelled scans: "
                                                      "self-training (a teacher pseudo-labels them for the model)")
    ap.add_argument("--paste-into", default="", help="comma-separated prepared stores of unlabelled scans: "
                                                      "labelled nodes are pasted into their fat for loader.paste_p "
                                                      "of the training patches")
    ap.add_argument("--num-labeled", type=int, default=None, help="labelled training cases per repeat")
    ap.add_argument("--repeats", type=int, default=None, help="runs with seeds seed..seed+R-1 (mean +- std)")
    ap.add_argument("--quick", action="store_true",
                    help="the CPU recipe (lnfm.jobs.finetune_cpu.QUICK: 32^3 patches, 2800 steps, the fine head)")
    add_distributed_arguments(ap)
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.steps=500")
    return parse_args_once(ap, argv, FinetuneConfig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    initialize(args.coordinator, args.num_processes, args.process_id)  # before any other JAX call
    data = [s for s in args.data.split(",") if s]
    unlabelled = [s for s in args.unlabelled.split(",") if s]
    paste_into = [s for s in args.paste_into.split(",") if s]
    # The path rule first: reading --init's records must not be what reports a workdir that is --init.
    check_apart({"--workdir": args.workdir}, {"--init": None if args.init == "scratch" else args.init, "--data": data,
                                              "--unlabelled": unlabelled, "--paste-into": paste_into})
    cfg = load_finetune_config(args.site, args.overrides, init=args.init,
                               data=data, num_labeled=args.num_labeled,
                               repeats=args.repeats, quick=args.quick, unlabelled=unlabelled,
                               paste_into=paste_into)
    return run(cfg, args.workdir)


__all__ = ["FinetuneConfig", "HeadConfig", "FinetuneTrainConfig", "QUICK", "load_finetune_config", "run", "main",
           "save_best", "load_finetuned", "resolve_init", "make_splits", "dump_yaml"]
