"""model.json: the typed metadata of an export, read with the config system's validation.

Every field is required (no defaults): `lnfm.export` fills each from what the run
recorded, and `read_meta` refuses a file with a missing, unknown or mistyped key in
one line naming it. `preprocessing` is the contract the model was trained under
(`lnfm.data.contract`); `lnfm predict` applies it to new scans unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lnfm.errors import LnfmError
from lnfm.config import ConfigError, from_dict, to_dict
from lnfm.data.contract import Preprocessing, contract_problem, hu_window_problem
from lnfm.data.scan_checks import check_target_spacing
from lnfm.data.store import SPACING_RTOL
from lnfm.eval.inference import InferenceConfig, window_problem
from lnfm.eval.postprocess import PostprocessConfig, postprocess_problem
from lnfm.models.config import ModelConfig
from lnfm.models.heads.config import HeadConfig
from lnfm.runs import CHECKSUMS, MODEL_JSON, ExportFolder, FinetuneRun, PretrainRun
from lnfm.workdir import file_sha256, list_files

SCHEMA_VERSION = 2  # 1: untyped model.json of lnfm 0.1.0 (preprocessing from defaults)
FORMATS = ("orbax", "safetensors", "stablehlo", "onnx", "monai")


class ExportError(LnfmError, ValueError):
    """An export that cannot be written or read; the message is one line naming the path."""


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    name: str
    stations: list[str]


@dataclasses.dataclass(frozen=True)
class ExportMeta:
    schema_version: int
    kind: Literal["segmenter", "encoder"]
    format: Literal["orbax", "safetensors", "stablehlo", "onnx", "monai"]
    model: ModelConfig
    head: HeadConfig | None  # the finetuning run's `head` section (None for an encoder export)
    num_classes: int | None
    labels: list[str] | None
    site: SiteInfo | None
    preprocessing: Preprocessing
    inference: InferenceConfig | None  # roi = preprocessing.patch_size
    postprocess: PostprocessConfig | None  # as finetuning evaluated
    training_data: dict[str, Any]  # counts, sites, spacings; never a case id
    lnfm_version: str
    git_revision: str | None
    files: dict[str, str]  # role -> file or folder in the export
    stablehlo: dict[str, Any] | None  # signature of a stablehlo export
    onnx: dict[str, Any] | None  # opset, input/output names and shapes of an onnx export

    @property
    def channels(self) -> tuple[str, ...]:
        return self.preprocessing.contract.channels

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1, sort_keys=True) + "\n"


def parse_meta(data: Any, where: str) -> ExportMeta:
    if not isinstance(data, dict):
        raise ExportError(f"{where}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ExportError(f"{where}: schema_version {version} is not {SCHEMA_VERSION} (export the model again with "
                          f"this lnfm)")
    head = data.get("head")
    if isinstance(head, dict):  # HeadConfig has defaults for finetuning configs; model.json records every field
        missing = [f.name for f in dataclasses.fields(HeadConfig) if f.name not in head]
        if missing:
            raise ExportError(f"{where}: missing config key 'head.{missing[0]}'")
    try:
        meta = from_dict(ExportMeta, data)
        check_target_spacing(meta.preprocessing.contract.spacing, "preprocessing.contract.spacing")
    except ConfigError as e:
        raise ExportError(f"{where}: {e}") from None
    _check_values(meta, where)
    return meta


def _check_values(meta: ExportMeta, where: str) -> None:
    """Values a hand-edited model.json can hold that its types allow but the model cannot run with."""
    for role, rel in meta.files.items():  # the files predict loads are those checksums.sha256 verifies
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not str(rel).strip():
            raise ExportError(f"{where}: files.{role} '{rel}' must name a file inside the export folder")
    if meta.kind == "segmenter" and (meta.num_classes or 0) < 2:
        raise ExportError(f"{where}: num_classes {meta.num_classes} is not at least 2 (background and a node class)")
    problem = hu_window_problem(meta.preprocessing.normalization.hu_window, "preprocessing.normalization.hu_window")
    if problem:
        raise ExportError(f"{where}: {problem}")
    patch = [int(p) for p in meta.preprocessing.patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise ExportError(f"{where}: preprocessing.patch_size {patch} is not three window sizes of at least 1 voxel")
    token = [int(t) for t in meta.model.patch_size]
    if meta.model.arch == "vit" and len(token) == 3 and any(p % t for p, t in zip(patch, token)):
        raise ExportError(f"{where}: preprocessing.patch_size {patch} is not a whole number of the ViT's "
                          f"{token} tokens per axis")
    problem = _contract_problem(meta) or postprocess_problem(meta.postprocess)
    if problem:
        raise ExportError(f"{where}: {problem}")
    inf = meta.inference
    problem = (window_problem(inf.overlap, inf.sw_batch_size, "inference.overlap", "inference.sw_batch_size",
                              inf.sigma_scale, "inference.sigma_scale") if inf is not None else None)
    if problem:
        raise ExportError(f"{where}: {problem}")
    for fmt, graph, name in (("stablehlo", meta.stablehlo, "StableHLO function was lowered"),
                             ("onnx", meta.onnx, "ONNX graph was converted")):
        shape = (graph or {}).get("input_shape")
        if meta.format == fmt and isinstance(shape, list) and len(shape) == 5 and list(shape[1:4]) != patch:
            raise ExportError(f"{where}: preprocessing.patch_size {patch} differs from the window the {name} "
                              f"for {list(shape[1:4])}")
    if inf is not None and [int(r) for r in inf.roi] != patch:
        raise ExportError(f"{where}: inference.roi {list(inf.roi)} differs from preprocessing.patch_size {patch} "
                          f"(the window the model was trained on)")


def _contract_problem(meta: ExportMeta) -> str | None:
    """What in model.json's preprocessing or labels the model cannot have been trained with."""
    contract, norm = meta.preprocessing.contract, meta.preprocessing.normalization
    problem = contract_problem(contract, "preprocessing.contract.")
    if problem:
        return problem
    if meta.model.in_channels != len(contract.channels):
        return (f"preprocessing.contract.channels {list(contract.channels)} are not the model's "
                f"{meta.model.in_channels} input channels")
    if not (math.isfinite(norm.pet_scale) and norm.pet_scale > 0):
        return f"preprocessing.normalization.pet_scale {norm.pet_scale:g} is not a positive divisor"
    if meta.kind == "segmenter" and meta.labels is not None and len(meta.labels) != meta.num_classes:
        return f"labels {meta.labels} are not num_classes ({meta.num_classes}) names"
    off = spacing_disagreement(contract.spacing, meta.training_data)
    if off is not None:
        return (f"preprocessing.contract.spacing {list(contract.spacing)} mm disagrees with training_data.spacing_mm "
                f"{off} (the spacing the training cases were stored at)")
    return None


def spacing_disagreement(spacing, training_data: dict) -> list | None:
    """training_data.spacing_mm when it is not `spacing` (within SPACING_RTOL), else None (also when either
    is unknown). spacing_mm is a finetuned model's list of the spacings its stores hold, or an encoder's
    pretraining data.spacing (one [x, y, z]). What model.json holds twice, the export and predict check."""
    recorded = training_data.get("spacing_mm")
    if spacing is None or recorded is None:
        return None
    rows = recorded if isinstance(recorded, list) and all(isinstance(r, list) for r in recorded) else [recorded]
    try:
        agree = all(np.allclose(np.asarray(r, float), spacing, rtol=SPACING_RTOL, atol=0) for r in rows)
    except (TypeError, ValueError):  # not numbers, or not three of them
        agree = False
    return None if agree else recorded


def not_an_export(path: str | Path) -> ExportError:
    """Why `path` is no export folder, saying what to pass instead when it is a file or folder inside
    an export (model.json itself, say) or a training workdir that has not been exported yet."""
    path = Path(path)
    inside = next((p for p in path.parents if ExportFolder.detect(p) is not None), None)
    if inside is not None:
        return ExportError(f"{path}: not an export folder but a {'file' if path.is_file() else 'path'} inside the "
                           f"export {inside}; pass {inside}")
    export_first = f"run `lnfm export --checkpoint {path} --out EXPORT` first and pass EXPORT"
    if FinetuneRun.detect(path) is not None:
        return ExportError(f"{path}: a finetuning workdir, not an export; {export_first}")
    if PretrainRun.detect(path) is not None:  # its export is an encoder: `lnfm predict` needs a finetuned one
        return ExportError(f"{path}: a pretraining workdir, not an export; {export_first} (an encoder only: "
                           f"to segment, finetune it and export the finetuning workdir)")
    return ExportError(f"{path}: not an export (no {MODEL_JSON})")


def read_meta(folder: str | Path) -> ExportMeta:
    """model.json of an export folder (no JAX needed)."""
    export = ExportFolder.detect(folder)
    if export is None:
        raise not_an_export(folder)
    try:
        data = json.loads(export.model_json.read_text())
    except ValueError as e:
        raise ExportError(f"{export.model_json}: not valid JSON ({e})") from None
    return parse_meta(data, str(export.model_json))


def verify_export(folder: str | Path) -> int:
    """Check every file against checksums.sha256; returns the number of files checked."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not (folder / MODEL_JSON).is_file():
        raise not_an_export(folder)
    if not listing.is_file():
        raise ExportError(f"{listing}: checksum list missing")
    expected = {}
    for n, line in enumerate(listing.read_text().splitlines(), start=1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ExportError(f"{listing}: line {n} is not '<sha256>  <path>'")
        expected[rel] = digest
    present = [rel for rel in list_files(folder) if rel != CHECKSUMS]
    for rel in present:
        if rel not in expected:
            raise ExportError(f"{folder / rel}: file not listed in {CHECKSUMS}")
    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            raise ExportError(f"{path}: listed in {CHECKSUMS} but missing")
        if file_sha256(path) != digest:
            raise ExportError(f"{path}: checksum mismatch (the file changed or is corrupt)")
    return len(expected)
