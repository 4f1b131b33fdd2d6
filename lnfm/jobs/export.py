"""Portable exports of a finetuned segmenter (or a pretrained encoder) and their loading.

    lnfm export --checkpoint DIR --out EXPORT_DIR --format {orbax,safetensors,stablehlo,onnx,monai} [--force]
    lnfm export --verify EXPORT_DIR   (alone: it writes nothing)

DIR is a finetuning workdir (or its best/ or checkpoints/ folder): the export holds
the best model (with several repeats, repeat 0's; DIR/repeat_<r>, or a folder in it,
names repeat r); or a pretraining workdir (or its checkpoints/): the export holds the
encoder only. Every export folder has `model.json` (architecture, preprocessing,
labels, site, a training-data summary without case ids, lnfm version, git revision)
and `checksums.sha256` (sha256 of every other file). Formats:

- orbax: `params/`, the parameter tree (no optimizer state). The standard artefact:
  `load_export(dir)` rebuilds the model; finetuning `--init` and `lnfm predict` take it.
- safetensors: `model.safetensors`, every parameter under its dotted name
  (`encoder.blocks.0.attn.qkv.kernel`, `head....`); the `encoder.` names are the encoder.
  Reading it needs only numpy and the safetensors package.
- onnx: `model.onnx`, the inference function of the stablehlo format as an ONNX
  graph (opset `lnfm.models.export_onnx.ONNX_OPSET`, dynamic batch) that `lnfm predict
  --backend onnxruntime` runs, plus `model.safetensors` so the JAX backend and
  finetuning `--init` can rebuild the model (`lnfm.models.export_onnx`).
- stablehlo: `inference.stablehlo`, a serialized `jax.export` function mapping a
  normalised patch (B, *patch, C) to softmax probabilities (B, *patch, K); runs with
  jax alone (`jax.export.deserialize(bytes).call(x)`).
- monai: `encoder_monai.pt` (torch.save of tensors) and `encoder_monai.safetensors`,
  the ViT encoder as a MONAI `ViT` state dict.

The same checkpoint gives byte-identical files. An existing export is replaced only
with `force` and only when it is an intact export (model.json and every file matching
checksums.sha256; anything else is refused, nothing deleted), by writing a temporary
folder and swapping it in, so a failed export leaves the old one intact. `out` may not
equal, contain or lie inside the source workdir (`lnfm.safety`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lnfm import __version__
from lnfm.config import from_dict, parse_args_once, read_yaml
from lnfm.data.contract import ContractError, Preprocessing, read_preprocessing
from lnfm.data.store import is_local_store, read_manifest
from lnfm.errors import DiskFull, WeightsMismatch, deferred_termination, disk_full
from lnfm.eval.postprocess import PostprocessConfig
from lnfm.jobs.finetune_config import FinetuneConfig
from lnfm.jobs.export_meta import (FORMATS, SCHEMA_VERSION, ExportError, ExportMeta, SiteInfo, read_meta,
                                   spacing_disagreement, verify_export)
from lnfm.models import ModelConfig
from lnfm.models.build import build_encoder
from lnfm.models.heads import HeadConfig
from lnfm.models import export_formats as fmt
from lnfm.models.interop import from_monai_vit
from lnfm.models.export_onnx import ONNX_FILE, write_onnx
from lnfm.models.lora import apply_lora, merge_lora
from lnfm.models.segmenter import segmenter_from_config
from lnfm.runs import BEST, CHECKPOINTS, CHECKSUMS, MODEL_JSON, FinetuneRun, PretrainRun, read_json
from lnfm.safety import check_apart
from lnfm.train.checkpoint import CheckpointError, restore_params
from lnfm.workdir import file_sha256, list_files, lock_folder, setup_logging

log = logging.getLogger("lnfm.export")


@dataclasses.dataclass
class Exported:
    """A loaded export: `model` is the segmenter (None for an encoder-only export)."""

    meta: ExportMeta  # the parsed model.json
    encoder: object  # the encoder nnx.Module
    model: object | None  # the Segmenter nnx.Module, or None


@dataclasses.dataclass
class _Source:
    """What a run holds: its weights and everything model.json says about it except the format."""

    kind: str  # "segmenter" (finetuning workdir) or "encoder" (pretraining workdir)
    flat: dict  # parameters by dotted name; an encoder-only source has only 'encoder.' names
    model: ModelConfig
    preprocessing: Preprocessing
    training_data: dict
    head: HeadConfig | None = None
    labels: list[str] | None = None
    site: SiteInfo | None = None
    inference: object | None = None  # InferenceConfig
    postprocess: object | None = None  # PostprocessConfig


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """HEAD of the git checkout lnfm runs from, or None (an installed wheel, no git). Read once
    per process: the code already imported does not change when the checkout moves on."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and len(rev) == 40 else None


def _manifests(stores: list[str], lacking: str = "case counts") -> list[dict] | None:
    """Every training store's case records, or None (a warning) when one is not found or not readable from
    here: a moved or deleted store, or a relative path from another folder, only costs the summary its
    counts, never a summary of 0 cases. Neither warning names the store: its path may hold a name."""
    records = []
    for store in stores:
        try:
            found = read_manifest(store) if "://" in store or Path(store).is_dir() else []
        except Exception:  # any reader's error: the export does not need the store, only its summary does
            found = []
        if not found:  # read_manifest finds no record in a folder that is no store, or no folder at all
            log.warning("training data summary without %s: a training store the run read (config.yaml's "
                        "data) is not found or not readable from this folder, or holds no case", lacking)
            return None
        records += found
    return records


def data_summary(stores: list[str], extra: dict | None = None, splits: dict | None = None) -> dict:
    """Counts, sites, spacings and channels of the training stores; never a case id. With `splits` (a finetuning
    run's record of the case ids of each split it used, all labelled) the counts are the run's and the rest is of
    those cases: the stores may have gained cases since it trained."""
    records = _manifests(stores, "case counts" if splits is None else "sites, spacings and channels")
    out: dict = {"stores": len(stores)}
    if splits is not None:
        used = {str(i) for ids in splits.values() for i in ids}
        out.update(cases=len(used), labelled_cases=len(used),
                   splits={str(k): len(ids) for k, ids in sorted(splits.items())})
        records = None if records is None else [r for r in records if r.get("case_id") in used]
    if records is not None:
        if splits is None:
            counts: dict[str, int] = {}
            for r in records:
                counts[str(r.get("split"))] = counts.get(str(r.get("split")), 0) + 1
            out.update(cases=len(records), labelled_cases=sum(1 for r in records if r.get("label_path")),
                       splits=dict(sorted(counts.items())))
        out.update(
            sites=sorted({str(r.get("site", "")) for r in records}),
            spacing_mm=sorted({tuple(round(float(s), 3) for s in r["spacing"]) for r in records if r.get("spacing")}),
            channels=sorted({",".join(r.get("channels") or ["CT"]) for r in records}),
        )
        out["spacing_mm"] = [list(s) for s in out["spacing_mm"]]
    out.update(extra or {})
    return out


def _preprocessing(path: Path) -> Preprocessing:
    """The preprocessing a run recorded; a run without the record cannot say what it trained on."""
    try:
        prep = read_preprocessing(path)
    except ContractError as e:
        raise ExportError(str(e)) from None
    if prep is None:
        raise ExportError(f"{path.parent}: the run records no preprocessing ({path.name}); it was trained by an "
                          f"older lnfm, so its spacing and intensity window are unknown: train it again")
    return prep


def _finetuned_params(run_dir, cfg) -> dict[str, np.ndarray]:
    """The Params of the best model in a finetuning run, read straight from its checkpoint. LoRA
    adapters are folded into their kernels, so the export is a plain segmenter."""
    lora = cfg.strategy.freeze == "lora"

    def build():
        model = segmenter_from_config(cfg.model, cfg.head, len(cfg.site.labels), nnx.Rngs(0))
        if lora:
            apply_lora(model.encoder, cfg.strategy.lora_rank, cfg.strategy.lora_alpha, rngs=nnx.Rngs(1))
        return model

    model = build() if lora else nnx.eval_shape(build)  # LoRA needs real arrays to fold the adapters into
    params = nnx.state(model, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(params))
    try:
        restored = restore_params(run_dir.best, target, key="model")
    except (FileNotFoundError, CheckpointError) as e:
        raise ExportError(str(e)) from None
    if not lora:
        return fmt.flatten_tree(restored)
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    merge_lora(model.encoder)
    return fmt.flat_params(model)


def _repeat_summary(run: FinetuneRun) -> dict:
    """summary.json's record of the exported repeat: a run with several repeats keeps each under
    `repeats` (its top level holds their means), a single repeat's is the file itself."""
    summary = read_json(run.summary) or {}
    repeats = summary.get("repeats")
    r = run.named or 0
    if not isinstance(repeats, list):
        return summary
    return next((rec for rec in repeats if isinstance(rec, dict) and rec.get("repeat") == r), {})


def _check_recorded(run: FinetuneRun, prep: Preprocessing, cfg: FinetuneConfig) -> None:
    """preprocessing.json against config.yaml, which the finetuning job wrote it from and trained with (the
    stores' cases were checked to be at site.spacing): a file edited by hand or copied from another run
    would give model.json a preprocessing the model never saw."""
    for key, mine, config_key, theirs in (
            ("contract.spacing", prep.contract.spacing, "site.spacing", cfg.site.spacing),
            ("normalization.hu_window", prep.normalization.hu_window, "loader.hu_window", cfg.loader.hu_window),
            ("normalization.pet_scale", prep.normalization.pet_scale, "loader.pet_scale", cfg.loader.pet_scale),
            ("patch_size", prep.patch_size, "site.patch", cfg.site.patch)):
        mine, theirs = np.ravel(np.asarray(mine, float)).tolist(), np.ravel(np.asarray(theirs, float)).tolist()
        if mine != theirs:
            raise ExportError(f"{run.preprocessing}: {key} {mine} disagrees with {config_key} {theirs} in "
                              f"{_config_path(run)}, which the run trained with: restore the run's "
                              f"{run.preprocessing.name}, or train again")


def _splits(run: FinetuneRun) -> dict | None:
    """The run's splits.json (None for a run from before it: the summary counts the stores as they are)."""
    try:
        recorded = read_json(run.splits)
    except ValueError as e:  # corrupt JSON, or no object
        raise ExportError(str(e)) from None
    if recorded is not None and not all(isinstance(ids, list) for ids in recorded.values()):
        raise ExportError(f"{run.splits}: not a record of the run's case ids per split; restore the run's "
                          f"{run.splits.name}, or train again")
    return recorded


def _load_finetuned(run: FinetuneRun, config: dict) -> _Source:
    first = run.first()
    cfg = from_dict(FinetuneConfig, config)
    prep = _preprocessing(run.preprocessing)
    _check_recorded(run, prep, cfg)
    flat = _finetuned_params(first, cfg)
    best = first.best_record() or {}
    summary = _repeat_summary(run)
    return _Source(
        "segmenter", flat, cfg.model, prep,
        training_data=data_summary(cfg.data, {
            "num_labeled": summary.get("num_labeled", cfg.train.num_labeled),
            "repeats": int(cfg.train.repeats),
            "repeat": run.named or 0,  # the one exported
            "steps": int(cfg.train.steps),
            "best_step": best.get("step"),
            "best_val_dice": best.get("val_dice"),
            "test_dice": summary.get("dice"),
            "init": "scratch" if cfg.init == "scratch" else "pretrained",
            # self-training: how many unlabelled scans the teacher's pseudo-labels added (0: none)
            "unlabelled_stores": len(cfg.unlabelled),
            "pseudo_labelled_cases": summary.get("pseudo_labelled", 0),
            # node paste: how many stores of unlabelled scans labelled nodes were pasted into (0: none)
            "paste_stores": len(cfg.paste_into),
        }, _splits(run)),
        head=cfg.head, labels=list(cfg.site.labels), site=SiteInfo(cfg.site.name, list(cfg.site.stations)),
        inference=dataclasses.replace(cfg.inference, roi=tuple(prep.patch_size)),
        # what the test masks were made with: the size prior tuned on validation, when the run tuned it
        postprocess=(from_dict(PostprocessConfig, tuned, "postprocess") if (tuned := read_json(first.postprocess))
                     else cfg.postprocess))


def _load_pretrained(run: PretrainRun, data: dict) -> _Source:
    if not isinstance(data.get("model"), dict):
        raise ExportError(f"{run.config}: no model section to rebuild the encoder from")
    cfg = from_dict(ModelConfig, data["model"], "model")
    prep = _preprocessing(run.preprocessing)
    abstract = nnx.eval_shape(lambda: build_encoder(cfg, nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.state(abstract, nnx.Param))
    try:
        try:  # the pretraining job saves nnx.State trees (as finetuning's --init reads them)
            restored = restore_params(run.checkpoints, nnx.State({"encoder": target}))["encoder"]
        except (TypeError, ValueError):  # a checkpoint of plain nested dicts
            restored = restore_params(run.checkpoints, {"encoder": nnx.to_pure_dict(target)})["encoder"]
    except (FileNotFoundError, CheckpointError) as e:
        raise ExportError(str(e)) from None
    pure = nnx.to_pure_dict(restored if isinstance(restored, nnx.State) else nnx.State(restored))
    dcfg = data.get("data", {}) if isinstance(data.get("data"), dict) else {}
    # The pretraining config does not name its stores, so no case counts here.
    return _Source("encoder", fmt.flatten_tree(pure, "encoder."), cfg, prep,
                   training_data={"cases": None, "steps": (data.get("train") or {}).get("steps"),
                                  "spacing_mm": dcfg.get("spacing"), "split": dcfg.get("split")})


def _step_source(path: Path) -> FinetuneRun:
    """The repeat a step folder (best/<step>, checkpoints/<step>) lies in, when the step is the model
    the export reads (its committed best); any other step would silently export another model."""
    run = FinetuneRun.detect(path.parent)
    if run is None or path.parent.name != BEST or run.first().best_step() != path:
        raise ExportError(f"{path}: a checkpoint step, not the model an export takes (a finetuning repeat's best "
                          f"model, a pretraining run's newest checkpoint); pass {path.parent.parent}")
    return run


def detect_source(checkpoint: str | Path) -> FinetuneRun | PretrainRun:
    """The run (finetuning or pretraining workdir) that `checkpoint` names or lies in. A finetuning
    run named by repeat_<r>/ (or its best/, checkpoints/, committed best step) exports repeat r."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"{path}: checkpoint folder not found")
    if path.name.isdigit() and path.parent.name in (BEST, CHECKPOINTS):
        return _step_source(path)
    run = FinetuneRun.detect(path) or PretrainRun.detect(path)
    if run is None:
        raise ExportError(f"{path}: neither a finetuning workdir (config.yaml + best/) nor a pretraining workdir "
                          f"(config.yaml + checkpoints/)")
    if isinstance(run, FinetuneRun) and run.first().best_step() is None:  # e.g. a repeat not yet validated
        raise ExportError(f"{run.first().best}: no best model saved (the run stopped before its first validation)")
    if isinstance(run, FinetuneRun) and run.named is None and len(run.repeat_dirs()) > 1:
        log.info("the workdir holds %d repeats: exporting repeat_0 (pass WORKDIR/repeat_<r> to export repeat r)",
                 len(run.repeat_dirs()))  # no path: logs name no input folder
    return run


def _config_path(run: FinetuneRun | PretrainRun) -> Path:
    """The config.yaml an export is made from (a finetuning run's: its first repeat's)."""
    return run.first().config if isinstance(run, FinetuneRun) else run.config


def read_config(run: FinetuneRun | PretrainRun) -> dict | None:
    """The run's config.yaml, or None when it cannot be read (`load_source` then says why, in its
    place after the checks of the output folder)."""
    try:
        return read_yaml(_config_path(run))
    except (OSError, ValueError):
        return None


def load_source(run: FinetuneRun | PretrainRun, config: dict | None = None) -> _Source:
    """`config`: `read_config(run)` when the caller has read it (None: read here, or the reason it cannot be)."""
    config = read_yaml(_config_path(run)) if config is None else config
    source = _load_finetuned(run, config) if isinstance(run, FinetuneRun) else _load_pretrained(run, config)
    spacing = source.preprocessing.contract.spacing
    off = spacing_disagreement(spacing, source.training_data)
    if off is not None:  # model.json would hold both, and predict refuses it
        what = "the training stores' cases at" if isinstance(run, FinetuneRun) else f"data.spacing in {run.config}"
        raise ExportError(f"{run.preprocessing}: contract.spacing {list(spacing)} mm disagrees with {what} {off} mm "
                          f"(the stores were prepared again since, or the file belongs to another run)")
    return source


# ----------------------------------------------------------------------------- writing


def _meta(source: _Source, format: str) -> ExportMeta:
    """model.json of `source` in `format` (its files are filled in by `_write`)."""
    return ExportMeta(
        schema_version=SCHEMA_VERSION, kind=source.kind, format=format, model=source.model, head=source.head,
        num_classes=len(source.labels) if source.labels is not None else None, labels=source.labels,
        site=source.site, preprocessing=source.preprocessing, inference=source.inference,
        postprocess=source.postprocess, training_data=source.training_data, lnfm_version=__version__,
        git_revision=git_revision(), files={}, stablehlo=None, onnx=None)


def _write(source: _Source, folder: Path, format: str) -> None:
    meta = _meta(source, format)
    stablehlo = onnx = None
    if format in ("stablehlo", "onnx"):  # both hold the segmenter's inference function
        if source.kind != "segmenter":
            raise ExportError(f"the {format} format exports a segmentation model; a pretraining workdir holds only "
                              f"an encoder (export a finetuning workdir)")
        model, _ = build_from_meta(meta, source.flat)
    if format == "orbax":
        fmt.write_orbax(folder, source.flat)
        files = {"params": fmt.PARAMS_DIR}
    elif format == "safetensors":
        fmt.write_safetensors(folder / fmt.SAFETENSORS_FILE, source.flat, {"format": "np"})
        files = {"params": fmt.SAFETENSORS_FILE}
    elif format == "stablehlo":
        stablehlo = fmt.write_stablehlo(folder / fmt.STABLEHLO_FILE, model, tuple(meta.preprocessing.patch_size),
                                        len(meta.channels))
        files = {"function": fmt.STABLEHLO_FILE}
    elif format == "onnx":
        onnx = write_onnx(folder / ONNX_FILE, model, tuple(meta.preprocessing.patch_size), len(meta.channels))
        fmt.write_safetensors(folder / fmt.SAFETENSORS_FILE, source.flat, {"format": "np"})
        files = {"onnx": ONNX_FILE, "params": fmt.SAFETENSORS_FILE}
    elif format == "monai":
        if meta.model.arch != "vit":
            raise ExportError(f"the monai format holds a MONAI ViT; this model's encoder is '{meta.model.arch}' "
                              f"(use orbax or safetensors)")
        _, encoder = build_from_meta(meta, source.flat)
        names = fmt.write_monai(folder, encoder)
        files = {"encoder_pt": names[0], "encoder_safetensors": names[1]}
    else:
        raise ExportError(f"unknown export format '{format}' (choices: {', '.join(FORMATS)})")
    meta = dataclasses.replace(meta, files=files, stablehlo=stablehlo, onnx=onnx)
    (folder / MODEL_JSON).write_text(meta.to_json())
    write_checksums(folder)


def write_checksums(folder: Path) -> None:
    lines = [f"{file_sha256(folder / rel)}  {rel}\n" for rel in list_files(folder) if rel != CHECKSUMS]
    (folder / CHECKSUMS).write_text("".join(lines))


def check_weights_export(folder: str | Path) -> ExportMeta:
    """model.json of an export that `load_export` can rebuild weights from, checked without
    building the model (checksums, format, safetensors header): jobs call it before they write."""
    meta = read_meta(folder)
    verify_export(folder)
    if meta.format not in ("orbax", "safetensors", "monai"):
        raise ExportError(f"{folder}: a {meta.format} export holds no weights to start from (use orbax, "
                          f"safetensors or monai)")
    if meta.format == "safetensors":
        fmt.check_safetensors(Path(folder) / fmt.SAFETENSORS_FILE)
    return meta


def _occupied(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_replaceable(out: Path, force: bool) -> None:
    """`out` is free, or (with force) an intact export: its model.json and every file matching
    checksums.sha256. Anything else (a workdir, a data folder, an edited export) is never deleted."""
    if not _occupied(out):
        return
    if not force:
        raise ExportError(f"{out}: already exists (pass --force to replace it)")
    try:
        read_meta(out)
        verify_export(out)
    except ExportError as e:
        raise ExportError(f"{out}: --force replaces only an intact lnfm export, and this is not one "
                          f"({str(e).split(': ', 1)[-1]}); nothing was deleted") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover_interrupted(out: Path) -> None:
    """Undo what an export killed while writing `out` left: its temporary folder, and the previous
    export it had moved aside to its backup name but not yet replaced (put back when `out` is
    missing and it still verifies; a backup next to a present `out` was being deleted). Called
    with the export lock held, so no other export is writing these names."""
    backups = sorted(out.parent.glob(f".{out.name}.old-*"))
    if backups and not out.exists():
        try:
            verify_export(backups[-1])
        except ExportError:
            pass  # a half-deleted backup: not an export any more
        else:
            os.replace(backups.pop(), out)
            log.warning("put back the previous export that an interrupted export had moved aside")
    for stale in [*backups, *out.parent.glob(f".{out.name}.tmp-*")]:
        _remove(stale)


def read_stores(run, config: dict | None) -> list[str]:
    """The labelled stores a finetuning run's export reads (their manifests give the training-data
    summary), from its `read_config`; none for a pretraining run, or without a readable config."""
    data = config.get("data") if isinstance(run, FinetuneRun) and config is not None else None
    return [str(d) for d in data] if isinstance(data, list) else []


def check_outside_exports(out: Path) -> None:
    """`out` may not lie inside another export (a file it does not list breaks that export's checksums) nor
    inside a prepared store: found by their own files, so a store a run recorded as a path relative to
    another folder is kept apart too."""
    for parent in out.parents:
        if (parent / MODEL_JSON).is_file() and (parent / CHECKSUMS).is_file():
            raise ExportError(f"{out}: lies inside the export {parent} (a folder written there would break its "
                              f"checksums); choose a folder outside it")
        if is_local_store(parent):
            raise ExportError(f"{out}: lies inside the prepared store {parent} (an export is not part of a "
                              f"dataset); choose a folder outside it")


def export_model(checkpoint: str | Path, out: str | Path, format: str = "orbax", force: bool = False) -> Path:
    """Write an export of `checkpoint` into `out` (see the module docstring); returns `out`.

    The new export is written and verified under a temporary name; then the previous one (if
    any) is renamed to a backup name, the new one renamed into place, and the backup deleted.
    One export at a time holds `.<out>.lock` beside `out`; a later export first recovers from
    one that was killed (`recover_interrupted`)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}' (choices: {', '.join(FORMATS)})")
    out = Path(out).absolute()
    run = detect_source(checkpoint)
    # a run still training (or resumed) rotates its checkpoints and rewrites its records: read it once it is done
    with lock_folder(run.root, shared=True, then="export it when it has finished"):
        config = read_config(run)  # read once: its stores for the path rule, its settings for the export
        check_apart({"--out": out}, {"--checkpoint": run.root,
                                     "a training store the export reads": read_stores(run, config)})
        check_outside_exports(out)
        if out.parent.exists() and not out.parent.is_dir():
            raise ExportError(f"{out.parent}: exists and is not a folder")
        with lock_folder(out.parent, f".{out.name}.lock", names=out):  # the refusal names --out, not its parent
            with deferred_termination():  # a SIGTERM mid-recovery would leave a half-removed folder behind
                recover_interrupted(out)
            check_replaceable(out, force)
            source = load_source(run, config)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            try:
                tmp.mkdir()  # inside the try: a SIGTERM right after it still removes the folder
                with deferred_termination():  # Orbax's writer threads finish before a SIGTERM removes tmp
                    _write(source, tmp, format)
                verify_export(tmp)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                reason = disk_full(e)
                if reason is not None:
                    raise DiskFull(f"{out}: cannot write the export ({reason}); "
                                   f"{'the previous export is unchanged' if out.exists() else 'nothing was written'}") \
                        from None
                raise
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            if old.exists() or old.is_symlink():
                _remove(old)
    log.info("exported %s (%s) to --out", source.kind, format)  # no path: logs name no input or output folder
    return out


# ----------------------------------------------------------------------------- reading


def build_from_meta(meta: ExportMeta, flat: dict[str, np.ndarray], where: str = "export"):
    """(segmenter or None, encoder) of the architecture in `meta` carrying the weights `flat`
    (dotted names; the encoder's start with 'encoder.'). Nothing is randomly initialised."""
    cfg = meta.model
    try:
        if meta.kind == "segmenter":
            model = fmt.module_from_flat(
                lambda: segmenter_from_config(cfg, meta.head, int(meta.num_classes), nnx.Rngs(0)), flat, where)
            return model, model.encoder
        return None, fmt.module_from_flat(lambda: build_encoder(cfg, nnx.Rngs(0)), flat, where, prefix="encoder.")
    except WeightsMismatch as e:
        raise ExportError(str(e).splitlines()[0]) from None


def check_weights(flat: dict, folder: Path) -> None:
    """Every weight a finite float: an export whose arrays were rewritten (and re-checksummed) as integers
    or with NaN would run and predict no node at all, with exit 0."""
    for name, array in flat.items():
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating):
            raise ExportError(f"{folder}: weight '{name}' is {array.dtype}, not floating point")
        if not np.all(np.isfinite(array)):
            raise ExportError(f"{folder}: weight '{name}' holds NaN or Inf")


def load_export(folder: str | Path, verify: bool = True) -> Exported:
    """Rebuild the model of an orbax, safetensors, onnx or monai export (checksums verified first).

    `Exported.encoder` feeds `lnfm.models.segmenter.load_encoder_state` (finetuning --init);
    `Exported.model` is the segmenter `lnfm predict` runs (None for encoder-only exports)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if verify:
        verify_export(folder)
    kind = meta.format
    if kind == "stablehlo":
        raise ExportError(f"{folder}: a stablehlo export holds a compiled function, not weights (use "
                          f"lnfm.models.export_formats.read_stablehlo, or export orbax/safetensors)")
    if kind == "monai":
        try:
            encoder = from_monai_vit(fmt.read_safetensors(folder / fmt.MONAI_SAFETENSORS), meta.model)
        except WeightsMismatch as e:
            raise ExportError(f"{folder / fmt.MONAI_SAFETENSORS}: {e}") from None
        return Exported(meta, encoder, None)
    if kind == "orbax":
        flat = fmt.read_orbax(folder)
    elif kind in ("safetensors", "onnx"):
        flat = fmt.read_safetensors(folder / fmt.SAFETENSORS_FILE)
    else:
        raise ExportError(f"{folder / MODEL_JSON}: unknown format '{kind}'")
    check_weights(flat, folder)
    model, encoder = build_from_meta(meta, flat, str(folder))
    return Exported(meta, encoder, model)


# ----------------------------------------------------------------------------- command line


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="lnfm export", description="Export a finetuned or pretrained model.")
    ap.add_argument("--checkpoint", help="finetuning workdir (or its best/ or checkpoints/), or a pretraining workdir")
    ap.add_argument("--out", help="export folder to write")
    ap.add_argument("--format", default=None, choices=FORMATS, help="export format (default: orbax)")
    ap.add_argument("--force", action="store_true", help="replace an existing, intact export (atomically)")
    ap.add_argument("--verify", metavar="DIR", default=None, help="check an export's files against its checksums")
    return ap


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        ignored = [opt for opt, given in (("--checkpoint", args.checkpoint), ("--out", args.out),
                                          ("--format", args.format), ("--force", args.force)) if given]
        if ignored:  # silently verifying only would leave the user believing an export was written
            raise ExportError(f"--verify checks an existing export and writes none: it cannot be combined with "
                              f"{', '.join(ignored)} (run the export and the check as two commands)")
        n = verify_export(args.verify)
        print(f"{args.verify}: {n} files match {CHECKSUMS}")
        return 0
    if not args.checkpoint or not args.out:
        raise ExportError("export needs --checkpoint DIR and --out EXPORT_DIR (or --verify DIR)")
    fmt_name = args.format or "orbax"
    out = export_model(args.checkpoint, args.out, fmt_name, force=args.force)
    print(f"wrote {fmt_name} export to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()  # lnfm at INFO; libraries (orbax, absl) stay at WARNING
    return run(parse_args_once(build_parser(), argv))


__all__ = ["FORMATS", "Exported", "ExportError", "export_model", "load_export", "read_meta", "verify_export",
           "build_from_meta", "git_revision", "data_summary", "main"]
