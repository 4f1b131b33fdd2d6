"""Outputs that would overwrite an input, a model or a workdir the job reads.

NEEDS_PATH_SAFETY: the path rule of `lnfm/safety.py` (no output may equal, contain or lie inside an
input, the model or a workdir the job reads; `export --force` replaces only an export). Every
case but one works on copies under its own input folder, so a job that still overwrote them could
not damage the shared world of the other cases; the export into the training store names the
world's own store (the copied workdir's config points there), which the harness hashes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import Case, run_case
from inputs import dicom_copy, nnunet


def _scan(w, inp) -> Path:
    return Path(shutil.copy(w.scan, inp / "scan.nii.gz"))


def _predict(flag: str):
    def make(w, inp, out):
        scan = _scan(w, inp)
        argv = ["--model", w.orbax, "--input", scan, "--output", out / "mask.nii.gz"]
        if flag == "--output":
            argv[-1] = scan
        else:
            argv += [flag, scan]
        return argv, str(scan)
    return make


def _predict_into_model(w, inp, out):
    model = Path(shutil.copytree(w.orbax, inp / "model"))
    return ["--model", model, "--input", _scan(w, inp), "--output", model / "mask.nii.gz"], str(model / "mask.nii.gz")


def _predict_batch_in_place(w, inp, out):
    folder = inp / "scans"
    folder.mkdir()
    shutil.copy(w.scan, folder / "a.nii.gz")
    return ["--model", w.orbax, "--input", folder, "--output", folder], str(folder)


def _prepare_into_input(inside: bool):
    def make(w, inp, out):
        raw = nnunet(inp)
        target = raw / "store" if inside else raw
        return ["--input", raw, "--output", target, "--workers", "0"], str(target)
    return make


def _workdir_copy(w, inp) -> Path:
    return Path(shutil.copytree(w.workdir, inp / "project" / "finetune"))


def _export_over(target: str):
    def make(w, inp, out):
        workdir = _workdir_copy(w, inp)
        if target == "workdir":
            dest = workdir
        elif target == "parent":
            dest = workdir.parent
        else:
            dest = inp / "thesis"
            dest.mkdir()
            (dest / "chapter1.tex").write_text("months of work")
        return ["--checkpoint", workdir, "--out", dest, "--force"], str(dest)
    return make


def _export_into_training_store(w, inp, out):
    workdir = _workdir_copy(w, inp)  # its config.yaml names the world's store, whose manifest export reads
    dest = Path(w.store) / "export"
    return ["--checkpoint", workdir, "--out", dest], str(dest)


def _export_into_another_export(w, inp, out):
    other = Path(shutil.copytree(w.orbax, inp / "export"))
    dest = other / "safetensors"  # a folder its checksums do not list: the other export would stop verifying
    return ["--checkpoint", _workdir_copy(w, inp), "--out", dest, "--format", "safetensors"], str(dest)


def _finetune_into_init(w, inp, out):
    init = Path(shutil.copytree(w.orbax, inp / "export"))
    return ["--site", "pelvis", "--data", w.ft_store, "--init", init, "--workdir", init, "--quick",
            "train.steps=1", "train.global_batch=8"], str(init)


def _pretrain_into_store(w, inp, out):
    store = Path(shutil.copytree(w.ft_store, inp / "store"))
    return ["--config", "vit_tiny", "--data", store, "--workdir", store, "train.steps=1", "data.workers=0"], str(store)


def _predict_batch_into_a_linked_series(w, inp, out):
    """A batch case that is a link to a series folder elsewhere, named as --output: case 'a' came first
    and was written into the series before case 's1' met the per-case rule."""
    series = dicom_copy(inp / "series")
    folder = inp / "scans"
    folder.mkdir()
    shutil.copy(w.scan, folder / "a.nii.gz")
    (folder / "s1").symlink_to(series)
    return ["--model", w.orbax, "--input", folder, "--output", series], str(series)


def _broken_link(inp: Path) -> Path:
    link = inp / "results"
    link.symlink_to(inp / "not-made-yet")
    return link


def _predict_through_a_broken_link(batch: bool):
    def make(w, inp, out):
        link = _broken_link(inp)
        if batch:
            folder = inp / "scans"
            folder.mkdir()
            shutil.copy(w.scan, folder / "a.nii.gz")
            return ["--model", w.orbax, "--input", folder, "--output", link], str(link)
        return ["--model", w.orbax, "--input", _scan(w, inp), "--output", link / "mask.nii.gz"], \
            str(link / "mask.nii.gz")
    return make


def _export_through_a_broken_link(w, inp, out):
    link = _broken_link(inp)
    return ["--checkpoint", _workdir_copy(w, inp), "--out", link], str(link)


def _synth_through_a_broken_link(w, inp, out):
    link = _broken_link(inp)
    return ["--site", "pelvis", "--num-cases", "1", "--out", link / "phantoms"], str(link / "phantoms")


LONG = "x" * 300  # one name over the 255 bytes a file system allows


def _predict_too_long(flag: str):
    """--output, --input or --model with a name too long: the message names the path (its folder, as the
    long name is cut short in it)."""
    def make(w, inp, out):
        scan = _scan(w, inp)
        bad = (out if flag == "--output" else inp) / f"{LONG}.nii.gz"
        argv = ["--model", w.orbax, "--input", scan, "--output", out / "mask.nii.gz"]
        argv[argv.index(flag) + 1] = bad
        return argv, str(bad.parent)
    return make


def _export_too_long(w, inp, out):
    return ["--checkpoint", _workdir_copy(w, inp), "--out", out / LONG], str(out)


def _prepare_too_long(w, inp, out):
    return ["--input", nnunet(inp), "--output", out / LONG, "--workers", "0"], str(out)


def _finetune_workdir_too_long(w, inp, out):
    return ["--site", "pelvis", "--data", w.ft_store, "--init", "scratch", "--workdir", out / LONG, "--quick",
            "train.steps=1", "train.global_batch=8"], str(out)


def _synth_out_too_long(w, inp, out):
    return ["--site", "pelvis", "--num-cases", "1", "--out", out / LONG], str(out)


def _link_loop(inp: Path) -> Path:
    loop = inp / "loop"
    loop.symlink_to("loop")  # a link to itself: every path through it ends in ELOOP
    return loop


def _predict_through_a_loop(flag: str):
    def make(w, inp, out):
        bad = _link_loop(inp) / "m.nii.gz"
        argv = ["--model", w.orbax, "--input", _scan(w, inp), "--output", out / "mask.nii.gz"]
        argv[argv.index(flag) + 1] = bad
        return argv, str(bad)
    return make


def _export_through_a_loop(w, inp, out):
    dest = _link_loop(inp) / "export"
    return ["--checkpoint", _workdir_copy(w, inp), "--out", dest], str(dest)


def _prepare_through_a_loop(w, inp, out):
    dest = _link_loop(inp) / "store"
    return ["--input", nnunet(inp), "--output", dest, "--workers", "0"], str(dest)


TOO_LONG, LOOP = ("File name too long",), ("Too many levels of symbolic links",)

NEEDS_PATH_SAFETY = [
    Case("predict-output-is-the-input", "predict", _predict("--output"), 2),
    Case("predict-report-is-the-input", "predict", _predict("--report"), 2),
    Case("predict-probabilities-is-the-input", "predict", _predict("--probabilities"), 2),
    Case("predict-output-inside-the-model", "predict", _predict_into_model, 2),
    Case("predict-batch-output-is-the-input-folder", "predict", _predict_batch_in_place, 2),
    Case("prepare-output-is-the-input-folder", "prepare", _prepare_into_input(False), 2),
    Case("prepare-output-inside-the-input-folder", "prepare", _prepare_into_input(True), 2),
    Case("export-force-over-its-own-workdir", "export", _export_over("workdir"), 2),
    Case("export-force-over-the-workdir-parent", "export", _export_over("parent"), 2),
    Case("export-force-over-a-folder-that-is-no-export", "export", _export_over("other"), 2),
    Case("export-out-inside-the-training-store", "export", _export_into_training_store, 2),
    Case("export-out-inside-another-export", "export", _export_into_another_export, 2),
    Case("finetune-workdir-is-the-init-export", "finetune", _finetune_into_init, 2),
    Case("pretrain-workdir-is-the-data-store", "pretrain", _pretrain_into_store, 2),
    Case("predict-batch-output-is-a-linked-case-series", "predict", _predict_batch_into_a_linked_series, 2,
         ("--output is --input",)),
    # an output path through a link to nothing: one line before any work, not a traceback after it
    Case("predict-output-through-a-broken-link", "predict", _predict_through_a_broken_link(False), 2,
         ("a link to", "which does not exist")),
    Case("predict-batch-output-is-a-broken-link", "predict", _predict_through_a_broken_link(True), 2,
         ("a link to", "which does not exist")),
    Case("export-out-is-a-broken-link", "export", _export_through_a_broken_link, 2, ("which does not exist",)),
    Case("synth-out-through-a-broken-link", "synth", _synth_through_a_broken_link, 2, ("which does not exist",)),
    # a name too long for the file system, or a link loop on the way: one line naming the path, not a traceback
    Case("predict-output-name-too-long", "predict", _predict_too_long("--output"), 2, TOO_LONG),
    Case("predict-input-name-too-long", "predict", _predict_too_long("--input"), 2, TOO_LONG),
    Case("predict-model-name-too-long", "predict", _predict_too_long("--model"), 2, TOO_LONG),
    Case("export-out-name-too-long", "export", _export_too_long, 2, TOO_LONG),
    Case("prepare-output-name-too-long", "prepare", _prepare_too_long, 2, TOO_LONG),
    Case("finetune-workdir-name-too-long", "finetune", _finetune_workdir_too_long, 2, TOO_LONG),
    Case("synth-out-name-too-long", "synth", _synth_out_too_long, 2, TOO_LONG),
    Case("predict-output-through-a-link-loop", "predict", _predict_through_a_loop("--output"), 2, LOOP),
    Case("predict-input-through-a-link-loop", "predict", _predict_through_a_loop("--input"), 2, LOOP),
    Case("export-out-through-a-link-loop", "export", _export_through_a_loop, 2, LOOP),
    Case("prepare-output-through-a-link-loop", "prepare", _prepare_through_a_loop, 2, LOOP),
]


@pytest.mark.parametrize("case", NEEDS_PATH_SAFETY, ids=[c.id for c in NEEDS_PATH_SAFETY])
def test_outputs_never_overwrite_what_a_job_reads(case, world, tmp_path, capsys):
    run_case(case, world, tmp_path, capsys)
