"""Segment lymph nodes in new scans with an export (`lnfm predict`).

    lnfm predict --model EXPORT_DIR --input SCAN[,PET] --output MASK.nii.gz
                 [--probabilities P.nii.gz] [--report nodes.csv] [--overlay preview.png] [--series UID]
    lnfm predict --model EXPORT_DIR --input FOLDER --output OUT_FOLDER [...]

SCAN is NIfTI, NRRD or a DICOM series folder; a model with two channels takes
`--input ct.nii.gz,pet.nii.gz`; a PET on a coarser grid is resampled onto the CT's
as prepare does. The pipeline is the one training used, read from model.json's
preprocessing contract and applied by prepare's own code
(`lnfm.data.prepare.read_channels` and `preprocess_case`: RAS reorientation,
resampling to the training spacing, body crop, CT as stored), then
`lnfm.data.contract.normalize` with the training normalisation and the finetuning
job's inference path (`lnfm.eval.predictor`: Gaussian sliding window, argmax,
prediction kept inside the body, components under `min_volume_mm3` removed, and those the run's
tuned node size prior rejects: `min_short_axis_mm`, `max_elongation`).
The label map goes back to the scan's grid by
nearest-neighbour sampling (`restore_to_source`, order 0): each scan voxel takes the
label of the model voxel it falls in, which is the mapping evaluation uses, so the
mask equals the finetuning job's own prediction mapped to the source grid. The
foreground probability map is resampled linearly. Outputs have exactly the input's
shape and affine; every file is written under a temporary name and renamed only
when all of a case's outputs are ready.

`--format nifti,dicom-seg,rtstruct` also writes a DICOM-SEG and an RTSTRUCT of the same mask
onto the source slices of a DICOM series input (`lnfm.jobs.predict_dicom`).

Batch mode: `--input FOLDER` holding NIfTI/NRRD files and/or DICOM series
subfolders (multi-channel cases as CASE_0000.nii.gz, CASE_0001.nii.gz, ...);
`--output` and any --probabilities/--report/--overlay name folders that receive
CASE.nii.gz, CASE.csv and CASE.png.

`--backend auto|jax|onnxruntime` picks the network's runtime (`lnfm.eval.backends`):
auto runs JAX on a GPU, and ONNX Runtime on a CPU-only machine when the export holds
model.onnx (`lnfm export --format onnx`), JAX otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lnfm.config import parse_args_once
from lnfm.data.contract import normalize
from lnfm.data.geometry import nonzero_box, restore_to_source, spacing_of
from lnfm.data.prepare import CaseError, preprocess_case, read_channels
from lnfm.eval import backends
from lnfm.eval.inference import window_problem
from lnfm.data.scan_checks import ScanError, check_ct, check_field_of_view, check_pet, check_source_spacing
from lnfm.errors import DiskFull, LnfmError, deferred_termination, disk_full
from lnfm.eval.predictor import Predictor
from lnfm.eval.report import node_table, report_csv, write_overlay
from lnfm.jobs.export_meta import ExportError, ExportMeta, read_meta, verify_export
from lnfm.io import ImageReadError, Volume, is_dicom_path, series_uid, write_nifti
from lnfm.io.dicom import split_series, split_series_reason
from lnfm.io.grid import image_grid
from lnfm.jobs.predict_marks import earlier_mark, made_by_predict, nifti_descrip
from lnfm.jobs.predict_memory import memory_problem
from lnfm.jobs.predict_dicom import (FORMATS, OutputFormats, check_outside_inputs, export_digest, output_paths,
                                     parse_formats, source_series, write_dicom_outputs)
from lnfm.runs import ExportFolder
from lnfm.safety import check_apart
from lnfm.workdir import atomic_write_text, hold_temps, progress, remove_stale_temps, setup_logging, temp_file

log = logging.getLogger("lnfm.predict")

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


class PredictError(LnfmError, ValueError):
    """A scan or an option `lnfm predict` cannot use; one line naming the file."""


@dataclasses.dataclass
class PredictOptions:
    """Settings that default to model.json's values when None."""
    overlap: float | None = None  # sliding-window overlap
    tta: bool | None = None  # average over the 8 axis flips
    sw_batch_size: int | None = None  # windows per forward pass
    min_volume_mm3: float | None = None  # smaller predicted components are removed
    min_short_axis_mm: float | None = None  # components with a smaller minor diameter are removed (0: off)
    max_elongation: float | None = None  # components over this major/minor diameter ratio are removed (0: off)


class Prediction:
    """A case's outputs on the source grid. The probability map is resampled there only when first
    read (an order-1 resampling of the whole scan: the costliest step after the network)."""

    def __init__(self, labels: np.ndarray, affine: np.ndarray, hu: np.ndarray, model_probability: np.ndarray,
                 geometry: dict):
        self.labels = labels  # (X, Y, Z) uint8 on the source grid
        self.affine = affine  # the source affine
        self.hu = hu  # (X, Y, Z) channel 0 of the scan (HU) on the source grid
        self._model_probability, self._geometry, self._probability = model_probability, geometry, None

    @property
    def probability(self) -> np.ndarray:
        """(X, Y, Z) foreground probability (or (X, Y, Z, K-1) per class) on the source grid."""
        if self._probability is None:
            prob = restore_to_source(self._model_probability, self._geometry, order=1)
            self._probability = np.clip(prob, 0.0, 1.0).astype(np.float32)
        return self._probability


# ----------------------------------------------------------------------------- model


def load_predictor(export_dir: str | Path, backend: str = "auto"
                   ) -> tuple[Callable[[np.ndarray], np.ndarray], ExportMeta]:
    """(fn, model.json): fn maps normalised patches (B, *patch, C) to probabilities (B, *patch, K),
    on the backend `lnfm.eval.backends` resolves `backend` to. Checksums are verified first."""

    meta = read_meta(export_dir)
    if meta.kind != "segmenter":
        raise ExportError(f"{export_dir}: an encoder-only export cannot segment (export a finetuning workdir)")
    if meta.format not in ("orbax", "safetensors", "stablehlo", "onnx"):
        raise ExportError(f"{export_dir}: a {meta.format} export holds no segmentation head (use orbax, "
                          f"safetensors, stablehlo or onnx)")
    verify_export(export_dir)
    name = backends.choose_backend(backend, export_dir, meta.format, "onnx" in meta.files)
    if name == "onnxruntime":
        fn = backends.onnx_network(Path(export_dir) / meta.files["onnx"])
    elif meta.format == "stablehlo":
        from lnfm.models.export_formats import STABLEHLO_FILE, read_stablehlo  # JAX: imported only for it

        fn = backends.stablehlo_network(read_stablehlo(Path(export_dir) / STABLEHLO_FILE))
    else:
        from lnfm.jobs.export import load_export
        from lnfm.models.layers import dtype_problem_here

        problem = dtype_problem_here(meta.model.dtype)
        if problem:
            raise ExportError(f"{export_dir}: {problem} (run it with --backend onnxruntime or on a GPU)")
        fn = backends.jax_network(load_export(export_dir, verify=False).model)
    log.info("model %s-%s (%s export) on %s", meta.model.arch, meta.model.size, meta.format, name)
    return _finite_output(fn, export_dir), meta


def _finite_output(fn: Callable[[np.ndarray], np.ndarray], export_dir) -> Callable[[np.ndarray], np.ndarray]:
    """`fn`, refusing a window whose probabilities hold NaN or Inf (corrupt weights in a compiled graph:
    otherwise 0 nodes and exit 0). One pass over each window batch, small next to the network."""
    def checked(batch: np.ndarray) -> np.ndarray:
        out = np.asarray(fn(batch))
        if not np.isfinite(out).all():
            raise ExportError(f"{export_dir}: the network's output holds NaN or Inf (its weights are corrupt)")
        return out

    return checked


# ----------------------------------------------------------------------------- input


def read_scan(paths: list[str], meta: ExportMeta, series: str | None = None) -> Volume:
    """Channels stacked (X, Y, Z, C) float32 on the first file's grid, read as prepare reads them
    (a coarser PET is resampled onto the CT grid) and checked with prepare's checks
    (`lnfm.data.scan_checks`). `series` picks a DICOM series."""
    channels = meta.channels
    name = paths[0]
    if len(paths) != len(channels):
        hint = ",".join(f"{c.lower()}.nii.gz" for c in channels)
        raise PredictError(f"{name}: the model expects {len(channels)} channel(s) ({', '.join(channels)}) but got "
                           f"{len(paths)}; pass them as --input {hint}")
    try:
        first = read_channels(list(paths), meta.preprocessing.contract.resample_channels, series)
    except CaseError as e:
        raise PredictError(str(e).splitlines()[0]) from None
    data = first.data
    for c, ch in enumerate(channels):
        src = paths[c] if len(paths) == len(channels) else name
        lo, hi = float(data[..., c].min()), float(data[..., c].max())
        if lo == hi:
            raise PredictError(f"{src}: the {ch} image is constant ({lo:g} everywhere): nothing to segment")
        try:
            if c == 0:
                check_source_spacing(spacing_of(first.affine), name)
                check_field_of_view(first.affine, data.shape, name)
            if ch.upper() == "CT":
                check_ct(data[..., c], src, meta.preprocessing.contract.body_threshold_hu)
            else:  # as prepare checks it
                check_pet(data[..., c], src)
        except ScanError as e:
            raise PredictError(str(e)) from None
    return Volume(data, first.affine)


def check_header_memory(paths: list[str], meta: ExportMeta, probabilities: bool, series: str | None = None) -> None:
    """`check_scan_memory`'s refusal, on the grid the first file's headers give (`lnfm.io.grid`), before any voxel
    is read: a compressed scan this host cannot segment was inflated into memory first, up to all of it, pushing
    other processes out. No word where the headers give no grid (the read names the problem) or it fits: the
    warning for a scan larger than the free memory comes once, after the read."""
    grid = image_grid(paths[0], series)
    if grid is None:
        return
    found = memory_problem(*grid, tuple(meta.preprocessing.contract.spacing), int(meta.num_classes or 2),
                           probabilities)
    if found is not None and found[1]:
        raise PredictError(f"{paths[0]}: {found[0]}")


def check_scan_memory(vol: Volume, meta: ExportMeta, probabilities: bool, name: str) -> None:
    """Refuse a scan this host cannot segment, in one line naming it (`lnfm.jobs.predict_memory`); warn, without
    its path, when it needs more than is free now."""
    found = memory_problem(vol.data.shape, tuple(spacing_of(vol.affine)), tuple(meta.preprocessing.contract.spacing),
                           int(meta.num_classes or 2), probabilities)
    if found is None:
        return
    text, refuse = found
    if refuse:
        raise PredictError(f"{name}: {text}")
    log.warning("this scan: %s", text)


# ----------------------------------------------------------------------------- pipeline


def check_options(options: PredictOptions) -> None:
    """Option values the sliding window and the post-processing can use, checked before anything is read."""
    problem = window_problem(options.overlap, options.sw_batch_size, "--overlap", "--batch-size")
    if problem:
        raise PredictError(problem)
    for flag, value, unit in (("--min-volume-mm3", options.min_volume_mm3, "volume >= 0 mm3"),
                              ("--min-short-axis-mm", options.min_short_axis_mm, "length >= 0 mm"),
                              ("--max-elongation", options.max_elongation, "ratio >= 0 (0: off)")):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PredictError(f"{flag}: {value:g} is not a finite {unit}")


def make_predictor(probabilities: Callable, meta: ExportMeta, options: PredictOptions | None = None) -> Predictor:
    """The finetuning job's inference path with model.json's settings (and any options)."""
    options = options or PredictOptions()
    inf, post = meta.inference, meta.postprocess
    inf = dataclasses.replace(inf, **{k: v for k, v in (("overlap", options.overlap), ("tta_flips", options.tta),
                                                        ("sw_batch_size", options.sw_batch_size)) if v is not None})
    post = dataclasses.replace(post, **{k: float(v) for k, v in (("min_volume_mm3", options.min_volume_mm3),
                                                                 ("min_short_axis_mm", options.min_short_axis_mm),
                                                                 ("max_elongation", options.max_elongation))
                                        if v is not None})
    return Predictor(probabilities, tuple(meta.preprocessing.patch_size), int(meta.num_classes), inf, post)


def predict_volume(probabilities: Callable, meta: ExportMeta, vol: Volume, options: PredictOptions | None = None
                   ) -> Prediction:
    """The whole pipeline (see the module docstring) for one checked scan."""
    pre = meta.preprocessing
    data, _, geometry = preprocess_case(vol, pre.contract)
    image = normalize(data, pre.normalization, list(meta.channels))
    names = [c.upper() for c in meta.channels]
    hu = data[..., names.index("CT")] if "CT" in names else None
    seg = make_predictor(probabilities, meta, options)(image, geometry["spacing"], hu)
    probs = seg.probabilities
    fg = probs[..., 1:] if probs.shape[-1] > 2 else probs[..., 1]
    labels_src = restore_to_source(seg.labels, geometry, order=0)
    return Prediction(labels_src.astype(np.uint8), np.asarray(vol.affine), vol.data[..., 0], fg, geometry)


def _temp(path: Path) -> Path:
    """A new temporary file for output `path`, locked until `write_outputs`' renames (`hold_temps`): a predict
    in another PID namespace sharing the folder must not take it for a killed writer's."""
    suffix = path.name[-7:] if path.name.lower().endswith(".nii.gz") else path.suffix  # MASK.NII.GZ keeps .NII.GZ
    with temp_file(path.with_name(path.name[:-len(suffix)] if suffix else path.name), suffix, "part") as tmp:
        return tmp


@hold_temps()  # each temporary file stays locked until the renames put them all in place
def write_outputs(pred: Prediction, meta: ExportMeta, output: Path | None, probabilities: Path | None = None,
                  report: Path | None = None, overlay: Path | None = None, title: str = "",
                  dicom: tuple | None = None, force: bool | None = None) -> None:
    """Write every requested output under a temporary name, then rename them all (a pending pair with no
    temporary name removes its final path: predict's own earlier output that this run does not replace).
    `output` is the NIfTI mask (None: not asked for); `dicom` = (source series, {format: path}, OutputFormats).
    `force` is the command's --force, its outputs checked when the model had not yet loaded
    (`check_not_there`): they are checked again as they are put in place (`_commit`). None (a library
    call) replaces whatever is there."""
    pending: list[tuple[Path, Path]] = []
    try:
        for final in (output, probabilities, report, overlay, *(dicom[1].values() if dicom else ())):
            if final is not None:
                final.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(final.parent)  # left by a predict that was killed
        if output is not None:
            pending.append((_temp(output), output))
            write_nifti(pending[-1][0], pred.labels, pred.affine, nifti_descrip(pred.labels, pred.affine))
        if dicom is not None:
            series, paths, formats = dicom
            write_dicom_outputs(pred.labels, pred.affine, meta, series, paths, formats, _temp, pending)
        if probabilities is not None:
            pending.append((_temp(probabilities), probabilities))
            write_nifti(pending[-1][0], pred.probability, pred.affine, nifti_descrip(pred.probability, pred.affine))
        if report is not None:
            prob = pred.probability if pred.probability.ndim == 3 else pred.probability.max(axis=-1)
            rows = node_table(pred.labels, pred.affine, pred.hu, prob, meta.labels)
            pending.append((_temp(report), report))
            atomic_write_text(pending[-1][0], report_csv(rows))
        if overlay is not None:
            pending.append((_temp(overlay), overlay))
            write_overlay(pending[-1][0], pred.hu, pred.labels, pred.affine,
                          tuple(meta.preprocessing.normalization.hu_window), title)
    except BaseException as e:
        for tmp, _ in pending:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        reason = disk_full(e)
        if reason is not None:  # the user's to fix, not a bug: one line, the old outputs are intact
            raise DiskFull(f"{pending[-1][1] if pending else output}: cannot write ({reason}); "
                           f"nothing was replaced") from None
        raise
    with deferred_termination():  # a case's outputs are replaced together: a signal waits for the last rename
        if force is not None:
            _commit(pending, force)
            return
        for tmp, final in pending:
            if tmp is None:  # an earlier run's output this run does not write (an RTSTRUCT with no node)
                final.unlink(missing_ok=True)
            else:
                os.replace(tmp, final)


def _written_meanwhile(pending: list[tuple[Path | None, Path]], final: Path, placed=()) -> PredictError:
    """Remove this case's temporary files and the new files it has already put in place (`placed`);
    the error naming `final`, which another process or a user wrote while predict ran."""
    for path in placed:
        path.unlink(missing_ok=True)
    for tmp, _ in pending:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return PredictError(f"{final}: written by another process or a user while predict ran; left as it is, "
                        f"and none of this case's outputs was written")


def _is_replaceable(final: Path, force: bool) -> bool:
    """`check_not_there`'s rule, again: absent, or with --force an unchanged output of predict's."""
    return not os.path.lexists(final) or (force and made_by_predict(final))


def _reserve(tmp: Path, final: Path) -> bool:
    """Put `tmp` at `final` only if nothing is there: a hard link (False when a link cannot be made here);
    without links, an empty file made exclusively, which `os.replace` then fills. FileExistsError if
    `final` appeared."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network shares)
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return False


# renameat2(2), in glibc since 2.28: None elsewhere (another OS or C library)
_renameat2 = getattr(ctypes.CDLL(None), "renameat2", None) if sys.platform == "linux" else None
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the files at `a` and `b` in one step (renameat2 RENAME_EXCHANGE); False where it cannot be done
    (no renameat2, a file system without it, either name gone), having changed nothing."""
    return _renameat2 is not None and _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                                 _RENAME_EXCHANGE) == 0


def _identity(path: Path) -> tuple | None:
    """What tells the file at `path` from one put there later: its inode, size and modification time (not its
    change time, which the exchange itself sets)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _commit(pending: list[tuple[Path | None, Path]], force: bool) -> None:
    """Put a case's outputs in place, checking each as `check_not_there` did before the model loaded: a
    file another predict or a user wrote meanwhile is left as it is, and the case fails with nothing of
    its own written. Every output is checked before any is renamed; a new one is then created without
    replacing anything, and a replaced one is checked again, then exchanged with its new file in one step: the
    file moved away must be the one checked, or every exchange is undone (where the system cannot exchange,
    a plain rename leaves a gap of microseconds after the check)."""
    for _, final in pending:
        if not _is_replaceable(final, force):
            raise _written_meanwhile(pending, final)
    placed: list[Path] = []  # new files put in place: removed again if a later one clashes
    filled: list[tuple[Path, Path]] = []  # (tmp, final): final reserved by an empty file, tmp renamed onto it
    linked: list[Path] = []  # temporary names whose final is a hard link to them
    for tmp, final in pending:
        if tmp is None or os.path.lexists(final):
            continue
        try:
            is_link = _reserve(tmp, final)
        except FileExistsError:
            raise _written_meanwhile(pending, final, placed) from None
        placed.append(final)
        if is_link:
            linked.append(tmp)
        else:
            filled.append((tmp, final))
    replaced = [(tmp, final) for tmp, final in pending if final not in set(placed)]
    checked = {}  # final: the file found replaceable (its identity taken before the check reads it)
    for _, final in replaced:  # right before the renames: each is still absent or (--force) predict's
        checked[final] = _identity(final)
        if not _is_replaceable(final, force):
            raise _written_meanwhile(pending, final, placed)
    swapped: list[tuple[Path, Path]] = []  # (tmp, final): tmp now holds the replaced file
    for tmp, final in replaced:
        if tmp is None or checked[final] is None or not _exchange(tmp, final):
            continue
        swapped.append((tmp, final))
        if _identity(tmp) != checked[final]:  # written after the check: it and the others go back
            for a, b in reversed(swapped):
                _exchange(a, b)
            raise _written_meanwhile(pending, final, placed)
    for tmp, final in replaced:
        if tmp is None:  # an earlier run's output this run does not write (an RTSTRUCT with no node)
            final.unlink(missing_ok=True)
        elif (tmp, final) in swapped:
            tmp.unlink(missing_ok=True)  # the replaced output, moved here by the exchange
        else:
            os.replace(tmp, final)
    for tmp, final in filled:
        os.replace(tmp, final)
    for tmp in linked:
        tmp.unlink(missing_ok=True)


def _check_output(path: Path, what: str, suffixes: tuple[str, ...]) -> None:
    if not path.name.lower().endswith(suffixes):
        raise PredictError(f"{path}: {what} must end with {' or '.join(suffixes)}")


def _nearest_existing(path: Path) -> Path | None:
    """`path` itself or its nearest parent that exists."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def _check_folder(path: Path, what: str) -> None:
    """The nearest existing folder on `path` (itself or a parent) is a folder, not a file."""
    p = _nearest_existing(path)
    if p is not None and not p.is_dir():
        raise PredictError(f"{p}: {what} needs a folder here, but this is a file")


def _check_file_path(path: Path, what: str) -> None:
    """An output file can be written at `path`: not an existing folder, no file where a folder must be."""
    if path.is_dir():
        raise PredictError(f"{path}: {what} is an existing folder; name a file")
    _check_folder(path.parent, what)


def check_outputs(output, probabilities=None, overlay=None, formats: tuple[str, ...] = ("nifti",),
                  report=None) -> None:
    if formats == ("nifti",):  # with DICOM formats --output may be a bare name (see predict_dicom)
        _check_output(Path(output), "--output", (".nii", ".nii.gz"))
    if probabilities is not None:
        _check_output(Path(probabilities), "--probabilities", (".nii", ".nii.gz"))
    if overlay is not None:
        _check_output(Path(overlay), "--overlay", (".png",))
    if report is not None:
        _check_output(Path(report), "--report", (".csv",))
    for what, path in [*((f"--output ({fmt})" if fmt != "nifti" else "--output", p)
                         for fmt, p in output_paths(output, formats).items()),
                       ("--probabilities", probabilities), ("--report", report), ("--overlay", overlay)]:
        if path is not None:
            _check_file_path(Path(path), what)


def check_case_paths(paths: dict[str, Path], probabilities, report, overlay, inputs: list[str], model=None) -> None:
    """Every output of one case (each --format file of --output, --probabilities, --report,
    --overlay) apart from the input channels and the model, and from each other."""
    check_outside_inputs(paths, inputs)  # the DICOM-specific wording for a file inside a series folder
    outputs = {("--output" if fmt == "nifti" else f"--output ({fmt})"): p for fmt, p in paths.items()}
    outputs.update({"--probabilities": probabilities, "--report": report, "--overlay": overlay})
    check_apart(outputs, {"--input": inputs, "--model": model})


def predict_case(predictor: Callable, meta: ExportMeta, inputs: list[str], output: str | Path,
                 probabilities: str | Path | None = None, report: str | Path | None = None,
                 overlay: str | Path | None = None, options: PredictOptions | None = None,
                 vol: Volume | None = None, formats: OutputFormats | None = None, series=None,
                 series_uid: str | None = None, force: bool | None = None) -> Prediction:
    """Read and check one scan (unless `vol` holds it already read by `read_scan`, and `series` its
    DICOM source headers), segment it and write its outputs (see the module docstring).
    `series_uid` picks the series of a DICOM folder holding several. No input path reaches an
    output or the log: folder and file names often hold patient names. `force`: see `write_outputs`."""
    formats = formats or OutputFormats()
    paths = output_paths(output, formats.formats)
    check_outputs(output, probabilities, overlay, formats.formats, report)
    check_case_paths(paths, probabilities, report, overlay, list(inputs))
    if vol is None:  # a batch's case (one scan given to `run` was read and checked before the model loaded)
        check_header_memory(list(inputs), meta, probabilities is not None, series_uid)
        vol = read_scan(list(inputs), meta, series_uid)  # first: its checks name a bad slice in one line
        check_scan_memory(vol, meta, probabilities is not None, list(inputs)[0])
    series = source_series(list(inputs), formats, series_uid) if series is None else series
    pred = predict_volume(predictor, meta, vol, options)
    site = meta.site.name if meta.site else None
    write_outputs(pred, meta, paths.pop("nifti", None), Path(probabilities) if probabilities else None,
                  Path(report) if report else None, Path(overlay) if overlay else None,
                  title=f"lnfm predict: {site} model" if site else "lnfm predict",
                  dicom=(series, paths, formats) if formats.dicom else None, force=force)
    log.info("%d node(s) predicted", _count_nodes(pred.labels))
    return pred


def _count_nodes(labels: np.ndarray) -> int:
    from scipy import ndimage

    mask = labels > 0
    box = nonzero_box(mask)
    return 0 if box is None else int(ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))[1])


# ----------------------------------------------------------------------------- batch


def check_batch_paths(folder, out, probabilities=None, report=None, overlay=None, model=None) -> None:
    """Output folders apart from the input folder and the model; mask and probability folders
    apart from each other (both receive CASE.nii.gz)."""
    outputs = {"--output": out, "--probabilities": probabilities, "--report": report, "--overlay": overlay}
    check_apart(outputs, {"--input": folder, "--model": model}, distinct=False)
    file_suffixes = {"--output": (".nii", ".nii.gz"), "--probabilities": (".nii", ".nii.gz"), "--report": (".csv",),
                     "--overlay": (".png",)}
    for what, path in outputs.items():
        if path is not None and Path(path).name.lower().endswith(file_suffixes[what]):
            # a folder named mask.nii.gz holding CASE.nii.gz files is not what was meant
            raise PredictError(f"{path}: {what} names a file, but --input {folder} is a folder of scans (batch "
                               f"mode, one output per case): name a folder")
    for what, path in outputs.items():
        if path is not None:
            _check_folder(Path(path), what)
    check_apart({"--output": out, "--probabilities": probabilities}, {})


def check_batch_cases(cases: dict[str, list[str]], out, probabilities=None, report=None, overlay=None) -> None:
    """Output folders apart from every case's input as well as from the batch folder: a case may be a link
    to a scan or a series folder elsewhere, and an output folder that is (or holds) one would take the
    earlier cases' outputs before that case met the rule."""
    outputs = {"--output": out, "--probabilities": probabilities, "--report": report, "--overlay": overlay}
    check_apart(outputs, {"--input": [p for inputs in cases.values() for p in inputs]}, distinct=False)


def _strip_suffix(name: str) -> str:
    for s in _IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[:-len(s)]
    return name


def find_cases(folder: Path, n_channels: int, unusable: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Case name -> channel files of a batch folder: image files and DICOM series subfolders;
    with several channels, CASE_0000, CASE_0001, ... files form one case. Entries that look like a case
    but cannot be one (a broken link, a subfolder with no file directly inside) go into `unusable`
    (name -> reason), so that the batch reports them instead of passing over them; other files
    (notes, spreadsheets) are not scans and are left alone."""
    cases: dict[str, list[str]] = {}
    channels: dict[str, list[str]] = {}  # case -> its channel numbers, when made of CASE_0000, ... files
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.exists():
            if unusable is not None:
                unusable[entry.name] = f"{entry}: a broken link (its target does not exist)"
            continue
        if entry.is_dir() and not any(p.is_file() for p in entry.iterdir()):
            if unusable is not None:
                unusable[entry.name] = (f"{entry}: no file directly inside (a DICOM series in a subfolder? pass the "
                                        f"series folder itself, or a folder whose subfolders are series)")
            continue
        if entry.is_dir():
            case, channel = entry.name, None
        elif entry.is_file() and entry.name.lower().endswith(_IMAGE_SUFFIXES):
            stem = _strip_suffix(entry.name)
            m = _CHANNEL_SUFFIX.match(stem)
            case, channel = (m.group("case"), m.group("ch")) if m and (n_channels > 1 or m.group("ch") == "0000") \
                else (stem, None)
        else:
            continue
        # Two inputs of one case name would write the same CASE.nii.gz: the later would silently win.
        if case in cases and (channel is None or case not in channels or channel in channels[case]):
            raise PredictError(f"{entry}: makes the same case '{case}' as {cases[case][0]} (both would write "
                               f"{case}.nii.gz); rename or move one of them")
        cases.setdefault(case, []).append(str(entry))
        if channel is not None:
            channels.setdefault(case, []).append(channel)
    return {k: sorted(v) for k, v in sorted(cases.items())}


def is_batch_input(path: Path) -> bool:
    """A folder that is not itself a DICOM series. A folder holding loose DICOM files beside scans or
    series subfolders is neither, and is refused; a CD's DICOMDIR (an index, not a slice) does not
    count as a loose file."""
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    loose = [p for p in entries if p.is_file() and p.name.upper() != "DICOMDIR" and is_dicom_path(p)]
    if not loose:
        return True
    scans = [p for p in entries if p.is_dir() or p.name.lower().endswith(_IMAGE_SUFFIXES)]
    if scans:
        raise PredictError(f"{path}: holds DICOM files ({loose[0].name}{', ...' if len(loose) > 1 else ''}) beside "
                           f"scans or folders ({scans[0].name}{', ...' if len(scans) > 1 else ''}): pass one series "
                           f"folder, or a folder of scans with the loose DICOM files moved out")
    return False


def _series_uid(folder: str) -> str:
    """The SeriesInstanceUID of a batch's series folder, '' when it has none or cannot say (reading the
    case reports why)."""
    try:
        return series_uid(folder)
    except ImageReadError:
        return ""


def batch_cases(folder: str | Path, n_channels: int, unusable: dict[str, str] | None = None
                ) -> dict[str, list[str]]:
    """`find_cases` of a batch folder, refused in one line when it holds no scan."""
    folder = Path(folder)
    unusable = {} if unusable is None else unusable
    cases = find_cases(folder, n_channels, unusable)
    split = split_series({inputs[0]: _series_uid(inputs[0]) for inputs in cases.values() if Path(inputs[0]).is_dir()})
    for case in [c for c, inputs in cases.items() if inputs[0] in split]:  # half a series each: both fail
        path = cases.pop(case)[0]
        unusable[case] = f"{path}: {split_series_reason(split[path])}"
    if not cases:
        why = f" ({next(iter(unusable.values()))})" if unusable else ""
        raise PredictError(f"{folder}: no NIfTI, NRRD or DICOM series found{why}")
    return cases


def predict_folder(predictor: Callable, meta: ExportMeta, folder: str | Path, out: str | Path,
                   probabilities: str | Path | None = None, report: str | Path | None = None,
                   overlay: str | Path | None = None, options: PredictOptions | None = None,
                   show_progress: bool = True, formats: OutputFormats | None = None) -> dict[str, str]:
    """Segment every case of `folder`; returns {case: error} for the cases that failed."""
    check_batch_paths(folder, out, probabilities, report, overlay)
    unusable: dict[str, str] = {}
    cases = batch_cases(folder, len(meta.channels), unusable)
    check_batch_cases(cases, out, probabilities, report, overlay)
    return {**unusable, **_predict_cases(predictor, meta, cases, out, probabilities, report, overlay, options,
                                         show_progress, formats)}


def _predict_cases(predictor: Callable, meta: ExportMeta, cases: dict[str, list[str]], out: str | Path,
                   probabilities: str | Path | None, report: str | Path | None, overlay: str | Path | None,
                   options: PredictOptions | None, show_progress: bool, formats: OutputFormats | None,
                   force: bool | None = None) -> dict[str, str]:
    """`predict_folder`'s loop over `cases` (`batch_cases`), once its caller has checked the paths
    (`check_batch_paths`): a bad scan fails alone, a full disk or a bug stops the batch."""
    out = Path(out)
    failed = {}
    bar = progress(total=len(cases), desc="predict", disable=not show_progress)
    for n, (case, inputs) in enumerate(cases.items(), start=1):
        try:
            predict_case(predictor, meta, inputs, out / f"{case}.nii.gz",
                         Path(probabilities) / f"{case}.nii.gz" if probabilities else None,
                         Path(report) / f"{case}.csv" if report else None,
                         Path(overlay) / f"{case}.png" if overlay else None, options, formats=formats,
                         force=force)
        except DiskFull:  # every later case would fail the same way: stop, the finished cases are kept
            raise
        except LnfmError as e:  # a bad scan fails alone; a bug stops the batch with its traceback
            failed[case] = str(e).splitlines()[0]
            log.warning("case %d of %d failed (listed at the end)", n, len(cases))
        bar.update(1)
        bar.set_postfix(failed=len(failed))
    bar.close()
    return failed


# ----------------------------------------------------------------------------- command line


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="lnfm predict", description="Segment lymph nodes with an export.")
    ap.add_argument("--model", required=True, help="export folder (orbax, safetensors, stablehlo or onnx)")
    ap.add_argument("--backend", default="auto", choices=("auto", "jax", "onnxruntime"),
                    help="network runtime: auto = JAX on a GPU, onnxruntime on a CPU when the export has "
                         "model.onnx, else JAX (default: auto)")
    ap.add_argument("--input", required=True, help="scan (NIfTI, NRRD, DICOM series folder), comma-separated "
                                                   "channels (ct.nii.gz,pet.nii.gz), or a folder of scans")
    ap.add_argument("--output", required=True, help="mask .nii.gz (or a folder in batch mode); DICOM outputs "
                                                    "go next to it as STEM.seg.dcm, STEM.rtstruct.dcm")
    ap.add_argument("--format", action="append", default=None, metavar="|".join(FORMATS),
                    help="outputs to write, repeatable or comma-separated (default nifti); dicom-seg and rtstruct "
                         "need a DICOM series input")
    ap.add_argument("--seg-per-node", action="store_true", help="DICOM-SEG: one segment per node, not per class")
    ap.add_argument("--rtstruct-all-nodes", action="store_true", help="RTSTRUCT: add one ROI holding all nodes")
    ap.add_argument("--seg-compression", choices=("jpeg2000", "none"), default=None,
                    help="DICOM-SEG transfer syntax: JPEG 2000 Lossless or uncompressed (default jpeg2000)")
    ap.add_argument("--probabilities", default=None, help="foreground probability .nii.gz (folder in batch mode)")
    ap.add_argument("--report", default=None, help="node report .csv (folder in batch mode)")
    ap.add_argument("--overlay", default=None, help="preview .png (folder in batch mode)")
    ap.add_argument("--series", default=None, help="SeriesInstanceUID to read when a DICOM folder holds several")
    ap.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: model.json)")
    ap.add_argument("--tta", action="store_true", default=None, help="average over the 8 axis flips")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: model.json)")
    ap.add_argument("--min-volume-mm3", type=float, default=None,
                    help="remove predicted components smaller than this (default: model.json)")
    ap.add_argument("--min-short-axis-mm", type=float, default=None,
                    help="remove components whose minor diameter is below this; 0 keeps all (default: model.json, "
                         "tuned on the run's validation cases)")
    ap.add_argument("--max-elongation", type=float, default=None,
                    help="remove components longer than this many times their minor diameter (vessel-like); 0 "
                         "keeps all (default: model.json, tuned on the run's validation cases)")
    ap.add_argument("--force", action="store_true",
                    help="replace output files an earlier lnfm predict wrote (without it any existing file is "
                         "refused; with it any file predict did not write still is)")
    return ap


def check_not_there(paths, force: bool) -> None:
    """Without --force, no output file may exist: an output path that names a scan's label, a report or
    any other file of the user's would be replaced without a word. With it, only files predict wrote
    (`made_by_predict`) are replaced."""
    for path in paths:
        if path is None or not os.path.lexists(path):
            continue
        if not force:
            raise PredictError(f"{path}: exists already (pass --force to replace it, or choose another output)")
        if not made_by_predict(path):
            earlier = earlier_mark(path)
            why = (f"marked by an earlier lnfm predict, {earlier}; remove it yourself if it is unchanged" if earlier
                   else "no mark of predict's, or changed since predict wrote it")
            raise PredictError(f"{path}: exists and is not an unchanged output of lnfm predict ({why}); --force "
                               f"replaces only predict's own files (choose another output)")


def check_writable(paths) -> None:
    """Every output's nearest existing folder takes a new file, before the model loads and runs. A file is
    made and removed there: permission bits (`os.access`) say yes to root where the system refuses (sysfs,
    an immutable folder), and a read-only mount is only known by trying."""
    seen = set()
    for path in paths:
        folder = _nearest_existing(Path(path).absolute().parent) if path is not None else None
        if folder is None or folder in seen:
            continue
        seen.add(folder)
        try:
            with temp_file(folder / "lnfm-write-check") as probe:  # a name remove_stale_temps clears after a crash
                os.unlink(probe)
        except OSError as e:
            raise PredictError(f"{path}: cannot write into {folder} ({e.strerror or e})") from None


def _case_files(outputs: dict, probabilities, report, overlay) -> list:
    """The files one case writes: `outputs` (`output_paths`' mask and DICOM files) and the optional ones."""
    return [*outputs.values(), probabilities, report, overlay]


def _batch_files(cases, out, probabilities, report, overlay, formats: tuple[str, ...]) -> list:
    """The files `_predict_cases` writes for `cases`."""
    files = []
    for case in cases:
        files += _case_files(output_paths(Path(out) / f"{case}.nii.gz", formats),
                             Path(probabilities) / f"{case}.nii.gz" if probabilities else None,
                             Path(report) / f"{case}.csv" if report else None,
                             Path(overlay) / f"{case}.png" if overlay else None)
    return files


def check_option_use(args: argparse.Namespace, formats: OutputFormats, inputs: list[str]) -> None:
    """An option that would change nothing for this input or these formats is refused, not ignored."""
    needs = {"--seg-per-node": (args.seg_per_node, "dicom-seg"),
             "--seg-compression": (args.seg_compression is not None, "dicom-seg"),
             "--rtstruct-all-nodes": (args.rtstruct_all_nodes, "rtstruct")}
    for option, (given, fmt) in needs.items():
        if given and fmt not in formats.formats:
            raise PredictError(f"{option}: applies to --format {fmt}, which is not requested")
    if args.series and not any(Path(p).is_dir() for p in inputs):
        raise PredictError(f"{inputs[0]}: --series picks a series of a DICOM folder; this input is a file")


def run(args: argparse.Namespace) -> int:
    options = PredictOptions(args.overlap, args.tta, args.batch_size, args.min_volume_mm3, args.min_short_axis_mm,
                             args.max_elongation)
    check_options(options)
    meta = read_meta(args.model)
    formats = OutputFormats(parse_formats(args.format), args.seg_per_node, args.rtstruct_all_nodes,
                            args.seg_compression or "jpeg2000")
    if formats.dicom:  # the DICOM outputs name the export by its checksum
        formats.export_sha256 = export_digest(args.model)
    # A comma separates channels, unless the whole string names something (a folder such as "Smith, John")
    inputs = [str(args.input)] if os.path.lexists(args.input) else [p for p in str(args.input).split(",") if p]
    if len(inputs) > 1:
        missing = next((p for p in inputs if not os.path.lexists(p)), None)
        if missing is not None:
            raise PredictError(f"{missing}: not found (--input {args.input} was read as {len(inputs)} "
                               f"comma-separated channels)")
    check_option_use(args, formats, inputs)
    for path in inputs:
        if ExportFolder.detect(Path(path)) is not None:
            raise PredictError(f"{path}: is an lnfm export, not a scan (pass it as --model)")
    batch = len(inputs) == 1 and is_batch_input(Path(inputs[0]))
    cases = None
    if batch:
        check_batch_paths(inputs[0], args.output, args.probabilities, args.report, args.overlay, args.model)
        # Listed once, before the model loads: two files of one case name are refused fast.
        unusable: dict[str, str] = {}  # entries that look like cases and cannot be: reported as failed
        cases = batch_cases(inputs[0], len(meta.channels), unusable)
        check_batch_cases(cases, args.output, args.probabilities, args.report, args.overlay)
        files = _batch_files(cases, args.output, args.probabilities, args.report, args.overlay, formats.formats)
        check_not_there(files, args.force)
        check_writable(files)
    else:
        outputs = output_paths(args.output, formats.formats)  # the mask and DICOM files of the one case
        check_case_paths(outputs, args.probabilities, args.report, args.overlay, inputs, args.model)
    vol = series = None
    if batch and args.series:
        raise PredictError(f"{inputs[0]}: --series picks the series of one scan; it does not apply to a folder "
                           f"of scans")
    if not batch:  # check the scan before the model loads: bad input fails fast
        check_outputs(args.output, args.probabilities, args.overlay, formats.formats, args.report)
        check_outside_inputs(outputs, inputs)
        files = _case_files(outputs, args.probabilities, args.report, args.overlay)
        check_not_there(files, args.force)
        check_writable(files)
        check_header_memory(inputs, meta, bool(args.probabilities), args.series)
        vol = read_scan(inputs, meta, args.series)  # first: the DICOM outputs' header reading trusts its checks
        check_scan_memory(vol, meta, bool(args.probabilities), inputs[0])
        series = source_series(inputs, formats, args.series)
    predictor, meta = load_predictor(args.model, args.backend)
    if batch:
        # the paths were checked above, with --model, before the model loaded
        failed = {**unusable, **_predict_cases(predictor, meta, cases, args.output, args.probabilities, args.report,
                                               args.overlay, options, True, formats, args.force)}
        for case, err in failed.items():
            print(f"FAILED {case}: {err}", file=sys.stderr)
        return 1 if failed else 0
    predict_case(predictor, meta, inputs, args.output, args.probabilities, args.report, args.overlay, options,
                 vol=vol, formats=formats, series=series, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()  # lnfm at INFO; libraries (orbax, absl) stay at WARNING
    return run(parse_args_once(build_parser(), argv))


__all__ = ["PredictError", "PredictOptions", "Prediction", "load_predictor", "read_scan", "predict_volume",
           "predict_case", "predict_folder", "find_cases", "write_outputs", "main"]
