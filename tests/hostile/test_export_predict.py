"""Hostile input to `lnfm export` and `lnfm predict`."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from harness import Case, run_case
from inputs import (AFFINE, MIRRORED_X, NONUNIFORM_DICOM, REAL_DICOM, body, dicom_copy, dicom_edited,
                    dicom_with_garbage, nhdr, nii, nii_forms, nrrd_in_units, outside_secret, real_ct, not_hu_scans,
                    two_series)


def _copy(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, name: str, change) -> Path:
    data = bytearray((folder / name).read_bytes())
    (folder / name).write_bytes(bytes(change(data)))
    return folder


def _rechecksum(folder: Path) -> Path:
    from lnfm.jobs.export import write_checksums

    write_checksums(folder)  # checksums that match the damage: the parser itself must refuse it
    return folder


def _flip(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0xFF
    return data


def _smear(data: bytearray) -> bytearray:
    data[100:300] = b"y" * 200
    return data


def _head(data: bytearray) -> bytearray:
    data[10:20] = b"x" * 10
    return data


# ----------------------------------------------------------------------------- export


def export(id, argv, rc, says=(), named=None, check=None) -> Case:
    return Case(f"export-{id}", "export", lambda w, inp, out: (argv(w, inp, out), named and named(w, inp, out)),
                rc, says, check)


def _pretend_export(w, inp, out) -> Path:
    folder = inp / "old_export"
    folder.mkdir(exist_ok=True)
    (folder / "keep.txt").write_text("mine")
    return folder


def _verified(w, inp, out):
    from lnfm.jobs.export import verify_export

    assert verify_export(out / "exp") == 2  # model.json and model.safetensors


EXPORT = [
    export("checkpoint-missing", lambda w, inp, out: ["--checkpoint", inp / "none", "--out", out / "exp"], 2,
           ("checkpoint folder not found",), lambda w, inp, out: str(inp / "none")),
    export("checkpoint-not-a-workdir", lambda w, inp, out: ["--checkpoint", inp, "--out", out / "exp"], 2,
           ("neither a finetuning workdir",), lambda w, inp, out: str(inp)),
    export("format-unknown", lambda w, inp, out: ["--checkpoint", w.workdir, "--out", out / "exp", "--format",
                                                  "tflite"], 2, ("invalid choice: 'tflite'",)),
    export("nothing-to-do", lambda w, inp, out: ["--checkpoint", w.workdir], 2, ("needs --checkpoint",)),
    export("out-exists-without-force", lambda w, inp, out: ["--checkpoint", w.workdir, "--out",
                                                            _pretend_export(w, inp, out)], 2, ("--force",),
           lambda w, inp, out: str(inp / "old_export")),
    export("out-is-a-file", lambda w, inp, out: ["--checkpoint", w.workdir, "--out", _file(inp / "afile")], 2,
           (), lambda w, inp, out: str(inp / "afile")),
    export("safetensors-export-verifies", lambda w, inp, out: ["--checkpoint", w.workdir, "--out",
                                                                             out / "exp", "--format", "safetensors"],
           0, check=_verified),
    export("verify-not-an-export", lambda w, inp, out: ["--verify", inp], 2, ("not an export",),
           lambda w, inp, out: str(inp)),
    export("verify-checksum-mismatch", lambda w, inp, out: ["--verify", _rewrite(
        _copy(w.safetensors, inp / "e"), "model.safetensors", _flip)], 2, ("checksum mismatch",),
           lambda w, inp, out: str(inp / "e" / "model.safetensors")),
    export("verify-file-missing", lambda w, inp, out: ["--verify", _unlink(_copy(w.safetensors, inp / "e"),
                                                                           "model.safetensors")], 2,
           ("listed in checksums.sha256 but missing",), lambda w, inp, out: str(inp / "e" / "model.safetensors")),
    export("verify-extra-file", lambda w, inp, out: ["--verify", _extra(_copy(w.safetensors, inp / "e"))], 2,
           ("not listed in checksums.sha256",), lambda w, inp, out: str(inp / "e" / "extra.bin")),
    export("verify-checksum-list-garbled", lambda w, inp, out: ["--verify", _garble(_copy(w.safetensors,
                                                                                          inp / "e"))], 2,
           ("is not '<sha256>  <path>'",), lambda w, inp, out: str(inp / "e" / "checksums.sha256")),
    export("verify-with-checkpoint-and-out", lambda w, inp, out: ["--verify", w.safetensors, "--checkpoint",
                                                                  w.workdir, "--out", out / "exp"], 2,
           ("--verify checks an existing export and writes none", "cannot be combined with --checkpoint, --out")),
    export("verify-with-format", lambda w, inp, out: ["--verify", w.safetensors, "--format", "onnx"], 2,
           ("cannot be combined with --format",)),  # verified only, exit 0, no export written
    export("verify-the-model-json-file", lambda w, inp, out: ["--verify", w.safetensors / "model.json"], 2,
           ("not an export folder but a file inside the export",), lambda w, inp, out: str(w.safetensors)),
    export("verify-a-finetuning-workdir", lambda w, inp, out: ["--verify", w.workdir], 2,
           ("a finetuning workdir, not an export", "lnfm export --checkpoint"), lambda w, inp, out: str(w.workdir)),
    export("checkpoint-an-older-best-step", lambda w, inp, out: ["--checkpoint", _older_best(w, inp), "--out",
                                                                 out / "exp"], 2,
           ("a checkpoint step, not the model an export takes",), lambda w, inp, out: str(inp / "ft" / "best" / "1")),
    export("checkpoint-the-committed-best-step", lambda w, inp, out: ["--checkpoint", w.workdir / "best" / "2",
                                                                      "--out", out / "exp", "--format",
                                                                      "safetensors"], 0, check=_verified),
]


def _older_best(w, inp) -> Path:
    run = _copy(w.workdir, inp / "ft")
    _copy(run / "best" / "2", run / "best" / "1")  # an older best step beside the committed one
    return run / "best" / "1"


def _file(p: Path) -> Path:
    p.write_text("x")
    return p


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink(missing_ok=True)
    return folder


def _extra(folder: Path) -> Path:
    (folder / "extra.bin").write_bytes(b"x")
    return folder


def _garble(folder: Path) -> Path:
    (folder / "checksums.sha256").write_text("nonsense\n")
    return folder


# ----------------------------------------------------------------------------- predict


def pred_argv(model, scan, out: Path, *extra) -> list:
    return ["--model", model, "--input", scan, "--output", out / "mask.nii.gz", "--report", out / "nodes.csv",
            "--overlay", out / "preview.png", *extra]


def scan_case(id: str, build, says: tuple) -> Case:
    """A bad scan: exit 2 before the model loads, one line naming the file, no output."""
    def make(w, inp, out):
        scan, fault = build(inp)
        return pred_argv(w.orbax, scan, out), str(fault)
    return Case(f"predict-{id}", "predict", make, 2, says)


def dicom_output_case(id: str, build, says: tuple) -> Case:
    """A bad series asked for DICOM outputs: their header reading met it first, with a traceback."""
    def make(w, inp, out):
        scan, fault = build(inp)
        return pred_argv(w.orbax, scan, out, "--format", "nifti,dicom-seg,rtstruct"), str(fault)
    return Case(f"predict-{id}-with-dicom-outputs", "predict", make, 2, says)


def model_case(id: str, build, says: tuple, named_file: str | None = None) -> Case:
    def make(w, inp, out):
        model = build(w, inp)
        return pred_argv(model, w.scan, out), str(model / named_file) if named_file else str(model)
    return Case(f"predict-{id}", "predict", make, 2, says)


IMG, _ = body()


def _img(inp, data, affine=None, name="bad.nii.gz"):
    p = nii(inp / name, data, np.diag([1.5, 1.5, 2.0, 1]) if affine is None else affine)
    return p, p


def _with(a, idx, value, dtype):
    a = a.astype(dtype).copy()
    a[idx] = value
    return a


def _raw(inp, name, data: bytes):
    p = inp / name
    p.write_bytes(data)
    return p, p


def _no_geometry(inp, data, pixdim):
    """A NIfTI with neither qform nor sform: nibabel builds its affine from pixdim alone."""
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    img.header["pixdim"][1:4] = pixdim
    nib.save(img, str(inp / "bad.nii.gz"))
    return inp / "bad.nii.gz", inp / "bad.nii.gz"


def _forms(inp, qform, sform):
    p = nii_forms(inp / "bad.nii.gz", IMG, qform, sform)
    return p, p


def _nrrd(inp, data, affine):
    from lnfm.io import write_nrrd

    write_nrrd(inp / "bad.nrrd", data, affine)
    return inp / "bad.nrrd", inp / "bad.nrrd"


def _two_series(inp):
    folder = two_series(inp / "scans")[0]
    return folder, folder


def _nhdr_out(inp):
    h = nhdr(inp / "scan", str(outside_secret(inp)))
    return h, h


def _pair_different_grids(inp):
    # Another grid alone is fine (a coarser PET is resampled as prepare does); a second channel
    # for a one-channel model is not.
    a = nii(inp / "ct.nii.gz", IMG)
    b = nii(inp / "pet.nii.gz", IMG[:-4])
    return f"{a},{b}", a


def _shift_x(ds, n):
    if n == 1:  # the middle slice 2 mm (3 pixels) to the side: the slices are not one stack
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 2.0, *ds.ImagePositionPatient[1:]]


def _no_pixels(ds, n):
    if n == 0:
        del ds.PixelData


def _zero_dim(inp):
    """A NIfTI header whose dim[2] is 0 (data after it): no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape((10, 10, 10))
    header.set_data_dtype(np.int16)
    header["dim"][2] = 0
    header.set_sform(AFFINE, code=1)  # an orientation: the zero dimension is the one fault
    header["vox_offset"] = 352
    path = inp / "bad.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 2000)
    return path, path


def _real_ct_nrrd_cm(inp):
    """The real CT as a converter may write it, in centimetres: read in mm, its mask lies on the original grid."""
    import nrrd

    src = nib.load(real_ct(inp))
    nrrd.write(str(inp / "ct_cm.nrrd"), np.asarray(src.dataobj), {
        "space": "right-anterior-superior", "space directions": src.affine[:3, :3].T / 10,
        "space origin": src.affine[:3, 3] / 10, "space units": ["cm", "cm", "cm"]}, index_order="F")
    return inp / "ct_cm.nrrd"


SCANS = [
    *[scan_case(id, lambda inp, voxels=voxels: _img(inp, voxels(inp)), says) for id, voxels, says in not_hu_scans()],
    scan_case("nrrd-space-unit-furlong", lambda inp: (nrrd_in_units(inp, "furlong"),) * 2,
              ("unsupported NRRD space unit 'furlong'",)),
    scan_case("input-missing", lambda inp: (inp / "none.nii.gz", inp / "none.nii.gz"), ("not found",)),
    scan_case("corrupt-gzip", lambda inp: _raw(inp, "c.nii.gz", b"\x1f\x8b garbage"), ("unreadable",)),
    scan_case("text-named-nii", lambda inp: _raw(inp, "t.nii", b"not an image " * 40), ("unreadable",)),
    scan_case("truncated-real-ct", lambda inp: _raw(inp, "t.nii.gz", real_ct(inp).read_bytes()[:20000]),
              ("unreadable",)),
    scan_case("unknown-extension", lambda inp: _raw(inp, "scan.jpg", b"\xff\xd8"), ("unknown image format",)),
    scan_case("one-voxel", lambda inp: _img(inp, np.full((1, 1, 1), 40, np.int16)), ("constant",)),
    scan_case("single-slice", lambda inp: _img(inp, IMG[:, :, :1]), ("at least 2 voxels",)),
    scan_case("all-air", lambda inp: _img(inp, np.full(IMG.shape, -1000, np.int16) + (IMG > 0)), ("all air",)),
    scan_case("label-map-as-ct", lambda inp: _img(inp, (IMG > 0).astype(np.uint8)), ("a label map",)),
    scan_case("float-mask-as-ct", lambda inp: _img(inp, (IMG > 0).astype(np.float32) * 3), ("a label map",)),
    scan_case("ct-clipped-to-int8", lambda inp: _img(inp, np.clip(IMG, -128, 127).astype(np.int8)), ("8-bit voxels",)),
    scan_case("hu-plus-1024-without-intercept", lambda inp: _img(inp, (IMG.astype(np.int32) + 1024).astype(np.uint16)),
              ("rescale intercept",)),
    scan_case("hu-saturating-int16", lambda inp: _img(inp, np.where(IMG > 0, 32767, IMG).astype(np.int16)),
              ("int16 range",)),
    scan_case("hu-beyond-int16", lambda inp: _img(inp, IMG.astype(np.float32) * 1000), ("int16 range",)),
    scan_case("nan-voxel", lambda inp: _img(inp, _with(IMG, (2, 2, 2), np.nan, np.float32)), ("NaN or Inf",)),
    scan_case("constant", lambda inp: _img(inp, np.full(IMG.shape, 40, np.int16)), ("constant",)),
    scan_case("coarse-spacing", lambda inp: _img(inp, IMG, np.diag([25.0, 1.5, 2.0, 1])), ("absurd voxel",)),
    scan_case("micro-spacing", lambda inp: _img(inp, IMG, np.diag([0.01, 0.01, 0.01, 1])), ("absurd voxel",)),
    scan_case("nifti-zero-pixdim-no-qform-sform", lambda inp: _no_geometry(inp, IMG, (0.0, 1.5, 2.0)),
              ("no orientation",)),
    scan_case("nifti-negative-pixdim-no-qform-sform", lambda inp: _no_geometry(inp, IMG, (-1.5, 1.5, 2.0)),
              ("no orientation",)),
    # a valid pixdim gives voxel sizes, not which way the axes point: nibabel guessed them
    scan_case("nifti-valid-pixdim-no-qform-sform", lambda inp: _forms(inp, None, None), ("no orientation",)),
    # nibabel took the sform; a viewer taking the qform shows the scan mirrored left-right
    scan_case("nifti-qform-mirrors-sform", lambda inp: _forms(inp, MIRRORED_X, AFFINE),
              ("qform and sform disagree",)),
    scan_case("zero-spacing-nrrd", lambda inp: _nrrd(inp, IMG, np.diag([0.0, 1.5, 2.0, 1])), ("affine",)),
    scan_case("2d-image", lambda inp: _img(inp, IMG[:, :, 0]), ("expected a 3D volume",)),
    scan_case("two-dicom-series", _two_series, ("2 DICOM series", "--series")),
    scan_case("dicom-garbage-slice", lambda inp: (dicom_with_garbage(inp / "d"), inp / "d"), ("unreadable DICOM",)),
    scan_case("dicom-non-uniform", lambda inp: (dicom_copy(inp / "d", NONUNIFORM_DICOM), inp / "d"),
              ("slice spacing",)),
    scan_case("nhdr-data-file-elsewhere", _nhdr_out, ("beside the header",)),
    scan_case("nifti-dim-zero", _zero_dim, ("no voxels",)),
    scan_case("dicom-orientation-not-unit-vectors", dicom_edited(lambda ds, n: setattr(
        ds, "ImageOrientationPatient", [2, 0, 0, 0, 2, 0])), ("ImageOrientationPatient", "unit vectors")),
    scan_case("dicom-orientation-not-perpendicular", dicom_edited(lambda ds, n: setattr(
        ds, "ImageOrientationPatient", [1, 0, 0, 0.5, 0.8660254, 0])), ("perpendicular",)),
    scan_case("dicom-negative-pixel-spacing", dicom_edited(lambda ds, n: setattr(
        ds, "PixelSpacing", [-0.625, 0.625])), ("PixelSpacing", "positive")),
    scan_case("dicom-slices-off-one-line", dicom_edited(_shift_x, extra_slice=True), ("on one line",)),
    scan_case("dicom-slice-without-pixel-data", dicom_edited(_no_pixels), ("no pixel data",)),
    scan_case("dicom-rescale-slope-zero", dicom_edited(lambda ds, n: setattr(ds, "RescaleSlope", 0)),
              ("RescaleSlope 0", "not 0")),
    scan_case("two-channels-for-a-one-channel-model", lambda inp: (f"{real_ct(inp)},{real_ct(inp)}",
                                                                    inp / "real_ct.nii.gz"), ("expects 1 channel",)),
    scan_case("channels-on-different-grids", _pair_different_grids, ("expects 1 channel",)),
    dicom_output_case("dicom-garbage-slice", lambda inp: (dicom_with_garbage(inp / "d"), inp / "d"),
                      ("unreadable DICOM",)),
    dicom_output_case("dicom-slice-without-position", dicom_edited(
        lambda ds, n: n == 1 and delattr(ds, "ImagePositionPatient")), ("lacks geometry", "ImagePositionPatient")),
    scan_case("dicom-slice-position-not-a-number", dicom_edited(
        lambda ds, n: n == 1 and setattr(ds, "ImagePositionPatient", [0, 0, "NaN"]), extra_slice=True),
        ("ImagePositionPatient", "is not a finite position")),
]


def _series_unknown(w, inp, out):
    folder = two_series(inp / "scans")[0]
    return pred_argv(w.orbax, folder, out, "--series", "1.2.3"), str(folder)


def batch_argv(model, folder, out: Path, *extra) -> list:
    """A batch's argv: an output folder for each kind of output."""
    return ["--model", model, "--input", folder, "--output", out / "masks", "--report", out / "reports",
            "--overlay", out / "previews", *extra]


def _series_batch(w, inp, out):
    (inp / "batch").mkdir()
    shutil.copy(w.scan, inp / "batch" / "a.nii.gz")
    return batch_argv(w.orbax, inp / "batch", out, "--series", "1.2.3"), str(inp / "batch")


def _batch_file_outputs(w, inp, out):
    """A batch with the one-scan output names: each would become a folder of CASE files."""
    (inp / "batch").mkdir()
    shutil.copy(w.scan, inp / "batch" / "a.nii.gz")
    return pred_argv(w.orbax, inp / "batch", out), str(out / "mask.nii.gz")


def _batch_unusable_entries(w, inp, out):
    """A broken link and a patient folder with its series one level down, beside a good scan."""
    folder = inp / "batch"
    (folder / "patient" / "CT").mkdir(parents=True)
    shutil.copy(w.scan, folder / "good.nii.gz")
    shutil.copy(w.scan, folder / "patient" / "CT" / "ct.nii.gz")
    (folder / "moved.nii.gz").symlink_to(inp / "gone.nii.gz")
    return ["--model", w.orbax, "--input", folder, "--output", out / "masks"], "patient"


def _batch_loose_dicom(w, inp, out):
    folder = inp / "batch"
    folder.mkdir()
    shutil.copy(w.scan, folder / "a.nii.gz")
    shutil.copy(next(p for p in sorted(REAL_DICOM.iterdir()) if p.name != "LICENSE"), folder / "stray.dcm")
    return batch_argv(w.orbax, folder, out), str(folder)


def _one_scan(*extra, names=None):
    def make(w, inp, out):
        return pred_argv(w.orbax, w.scan, out, *extra), names
    return make


def _comma_in_path(w, inp, out):
    folder = inp / "Smith, John"
    folder.mkdir()
    shutil.copy(w.scan, folder / "ct.nii.gz")
    return pred_argv(w.orbax, folder / "ct.nii.gz", out), None


def _bad_suffix(flag, name):
    def make(w, inp, out):
        argv = ["--model", w.orbax, "--input", w.scan, "--output", out / "mask.nii.gz", flag, out / name]
        if flag == "--output":
            argv = ["--model", w.orbax, "--input", w.scan, "--output", out / name]
        return argv, str(out / name)
    return make


def _empty_batch(w, inp, out):
    (inp / "empty").mkdir()
    (inp / "empty" / "readme.txt").write_text("no scans here")
    return batch_argv(w.orbax, inp / "empty", out), str(inp / "empty")


def _batch_one_bad(w, inp, out):
    folder = inp / "batch"
    folder.mkdir()
    shutil.copy(w.scan, folder / "good.nii.gz")
    nii(folder / "air.nii.gz", np.full(IMG.shape, -1000, np.int16) + (IMG > 0))
    return ["--model", w.orbax, "--input", folder, "--output", out / "masks"], "air"


def _batch_same_case(second: str):
    """Two inputs of one batch folder that would write the same CASE.nii.gz: `a.nii.gz` and `second`."""
    def make(w, inp, out):
        folder = inp / "batch"
        folder.mkdir()
        shutil.copy(w.scan, folder / "a.nii.gz")
        shutil.copy(w.scan, folder / "b.nii.gz")
        if second == "a":  # a DICOM series subfolder named like the file
            dicom_copy(folder / "a")
        elif second.endswith(".nrrd"):
            _nrrd(folder, IMG, np.diag([1.5, 1.5, 2.0, 1]))
            (folder / "bad.nrrd").rename(folder / second)
        else:
            nii(folder / second, IMG)
        return ["--model", w.orbax, "--input", folder, "--output", out / "masks"], str(folder / second)
    return make


def _only_good_mask(w, inp, out):
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["good.nii.gz"]


def _encoder_only(w, inp):
    import json

    folder = _copy(w.orbax, inp / "enc")
    meta = json.loads((folder / "model.json").read_text())
    meta["kind"] = "encoder"
    (folder / "model.json").write_text(json.dumps(meta))
    return _rechecksum(folder)


def _occupied(name: str, flag: str):
    """An output path where something else already is: a folder named like the output file, or a file
    where the output's folder must be."""
    def make(w, inp, out):
        if flag == "--batch":
            (out / name).write_text("x")
            folder = inp / "batch"
            folder.mkdir()
            shutil.copy(w.scan, folder / "a.nii.gz")
            return ["--model", w.orbax, "--input", folder, "--output", out / name], str(out / name)
        if name == "afile":
            (out / name).write_text("x")
            return pred_argv(w.orbax, w.scan, out / name), str(out / name)
        (out / name).mkdir()
        return pred_argv(w.orbax, w.scan, out), str(out / name)
    return make


def _meta_edit(change, source="orbax"):
    """model.json edited by hand (and its checksum list written again to match): a value the model cannot run."""
    def build(w, inp):
        import json

        folder = _copy(getattr(w, source), inp / "m")
        meta = json.loads((folder / "model.json").read_text())
        change(meta)
        (folder / "model.json").write_text(json.dumps(meta))
        return _rechecksum(folder)
    return build


def _model_json(text):
    def build(w, inp):
        folder = _copy(w.orbax, inp / "m")
        (folder / "model.json").write_text(text)
        return folder
    return build


OPTIONS = [
    Case("predict-series-unknown", "predict", _series_unknown, 2, ("no DICOM series 1.2.3",)),
    Case("predict-series-with-a-batch-folder", "predict", _series_batch, 2, ("--series",)),
    Case("predict-output-not-nifti", "predict", _bad_suffix("--output", "mask.png"), 2, ("must end with .nii",)),
    Case("predict-probabilities-not-nifti", "predict", _bad_suffix("--probabilities", "p.csv"), 2,
         ("must end with .nii",)),
    Case("predict-overlay-not-png", "predict", _bad_suffix("--overlay", "o.jpg"), 2, ("must end with .png",)),
    Case("predict-batch-folder-without-scans", "predict", _empty_batch, 2, ("no NIfTI, NRRD or DICOM series",)),
    Case("predict-batch-one-bad-case", "predict", _batch_one_bad, 1, ("all air",), check=_only_good_mask,
         partial=True),
    Case("predict-batch-with-one-scan-output-names", "predict", _batch_file_outputs, 2,
         ("--output names a file", "folder of scans"),),  # each became a folder of CASE files, exit 0
    Case("predict-batch-broken-link-and-nested-series", "predict", _batch_unusable_entries, 1,
         ("no file directly inside",), check=_only_good_mask, partial=True),  # both passed over, exit 0
    Case("predict-batch-loose-dicom-beside-scans", "predict", _batch_loose_dicom, 2,
         ("holds DICOM files (stray.dcm) beside scans",)),  # read as one series: a misleading refusal
    Case("predict-report-not-csv", "predict", lambda w, inp, out: (
        ["--model", w.orbax, "--input", w.scan, "--output", out / "mask.nii.gz", "--report", out / "r.nii.gz"],
        str(out / "r.nii.gz")), 2, ("--report must end with .csv",)),  # CSV text under a .nii.gz name, exit 0
    Case("predict-seg-per-node-without-dicom-seg", "predict", _one_scan("--seg-per-node", names="--seg-per-node"),
         2, ("applies to --format dicom-seg",)),  # ignored, exit 0
    Case("predict-series-for-a-nifti-file", "predict", _one_scan("--series", "1.2.3"), 2,
         ("--series picks a series of a DICOM folder",)),  # ignored, exit 0
    Case("predict-batch-nii-and-nii-gz-of-one-name", "predict", _batch_same_case("a.nii"), 2,
         ("same case 'a'",)),
    Case("predict-batch-nrrd-and-nii-gz-of-one-name", "predict", _batch_same_case("a.nrrd"), 2,
         ("same case 'a'",)),
    Case("predict-batch-dicom-folder-and-file-of-one-name", "predict", _batch_same_case("a"), 2,
         ("same case 'a'",)),
    Case("predict-overlap-not-a-number", "predict", lambda w, inp, out: (pred_argv(w.orbax, w.scan, out,
                                                                                   "--overlap", "lots"), None),
         2, ("--overlap",)),
    Case("predict-output-is-a-folder", "predict", _occupied("mask.nii.gz", "--output"), 2, ("existing folder",)),
    Case("predict-report-is-a-folder", "predict", _occupied("nodes.csv", "--report"), 2, ("existing folder",)),
    Case("predict-output-folder-is-a-file", "predict", _occupied("afile", "--output"), 2, ("this is a file",)),
    Case("predict-batch-output-is-a-file", "predict", _occupied("masks", "--batch"), 2, ("this is a file",)),
    Case("predict-output-empty", "predict", lambda w, inp, out: (["--model", w.orbax, "--input", w.scan, "--output",
                                                                  ""], "--output"), 2, ("names no file",)),
    Case("predict-overlap-one", "predict", lambda w, inp, out: (pred_argv(w.orbax, w.scan, out, "--overlap", "1"),
                                                                "--overlap"), 2, ("[0, 1)",)),
    Case("predict-overlap-near-one", "predict", lambda w, inp, out: (pred_argv(w.orbax, w.scan, out, "--overlap",
                                                                               "0.9999"), "--overlap"), 2,
         ("is above 0.75",)),  # a one-voxel step ran for hours with exit 0
    Case("predict-overlap-negative", "predict", lambda w, inp, out: (pred_argv(w.orbax, w.scan, out, "--overlap",
                                                                               "-0.5"), "--overlap"), 2, ("[0, 1)",)),
    Case("predict-batch-size-zero", "predict", lambda w, inp, out: (pred_argv(w.orbax, w.scan, out, "--batch-size",
                                                                              "0"), "--batch-size"), 2,
         ("at least 1",)),
    Case("predict-min-volume-nan", "predict", lambda w, inp, out: (pred_argv(w.orbax, w.scan, out, "--min-volume-mm3",
                                                                             "nan"), "--min-volume-mm3"), 2,
         ("finite",)),
    Case("predict-min-short-axis-negative", "predict", lambda w, inp, out: (
        pred_argv(w.orbax, w.scan, out, "--min-short-axis-mm", "-1"), "--min-short-axis-mm"), 2, ("length >= 0 mm",)),
    Case("predict-max-elongation-inf", "predict", lambda w, inp, out: (
        pred_argv(w.orbax, w.scan, out, "--max-elongation", "inf"), "--max-elongation"), 2, ("ratio >= 0",)),
    model_case("model-json-overlap-one", _meta_edit(lambda m: m["inference"].update(overlap=1.0)),
               ("inference.overlap: 1 is not in [0, 1) (the fraction of a window its neighbour shares)",),
               "model.json"),
    model_case("model-json-zero-spacing", _meta_edit(lambda m: m["preprocessing"]["contract"].update(
        spacing=[0.0, 6.0, 6.0])), ("preprocessing.contract.spacing",), "model.json"),
    model_case("stablehlo-patch-edited", _meta_edit(lambda m: m["preprocessing"].update(patch_size=[16, 16, 16]),
                                                    "stablehlo"), ("patch_size",), "model.json"),
    model_case("model-json-num-classes-zero", _meta_edit(lambda m: m.update(num_classes=0)), ("num_classes 0",),
               "model.json"),
    model_case("model-json-hu-window-inverted", _meta_edit(lambda m: m["preprocessing"]["normalization"].update(
        hu_window=[400.0, -1000.0])), ("hu_window",), "model.json"),
    model_case("model-json-body-threshold-nan", _meta_edit(lambda m: m["preprocessing"]["contract"].update(
        body_threshold_hu=float("nan"))), ("body_threshold_hu nan",), "model.json"),
    model_case("model-json-min-volume-negative", _meta_edit(lambda m: m["postprocess"].update(min_volume_mm3=-5.0)),
               ("postprocess.min_volume_mm3 -5",), "model.json"),
    model_case("model-json-sigma-zero", _meta_edit(lambda m: m["inference"].update(sigma_scale=0.0)),
               ("inference.sigma_scale 0",), "model.json"),
    model_case("model-json-roi-not-the-patch", _meta_edit(lambda m: m["inference"].update(
        roi=[r // 2 for r in m["inference"]["roi"]])), ("differs from preprocessing.patch_size",), "model.json"),
    model_case("model-json-window-below-one-token", _meta_edit(lambda m: (
        m["preprocessing"].update(patch_size=[1, 1, 1]), m["inference"].update(roi=[1, 1, 1]))),
        ("is not a whole number of the ViT's",), "model.json"),  # ran and predicted from one voxel, exit 0
    model_case("model-json-one-label-short", _meta_edit(lambda m: m.update(labels=m["labels"][:-1])),
               ("not num_classes",), "model.json"),
    model_case("model-json-pet-scale-zero", _meta_edit(lambda m: m["preprocessing"]["normalization"].update(
        pet_scale=0.0)), ("pet_scale 0",), "model.json"),
    model_case("model-json-channels-pet-only", _meta_edit(lambda m: m["preprocessing"]["contract"].update(
        channels=["PET"])), ("does not start with 'CT'",), "model.json"),
    model_case("model-json-orientation-unknown", _meta_edit(lambda m: m["preprocessing"]["contract"].update(
        orientation="LPI")), ("orientation 'LPI'",), "model.json"),
    model_case("model-json-contract-from-a-newer-lnfm", _meta_edit(lambda m: m["preprocessing"]["contract"].update(
        version=99)), ("preprocessing.contract.version 99 is not one this lnfm reads",), "model.json"),
    model_case("model-json-ct-stored-as-float", _meta_edit(lambda m: m["preprocessing"]["contract"].update(
        ct_storage="float32")), ("preprocessing.contract.ct_storage 'float32' is not 'int16'",), "model.json"),
    model_case("model-json-overlap-near-one", _meta_edit(lambda m: m["inference"].update(overlap=0.9999)),
               ("inference.overlap: 0.9999 is above 0.75",), "model.json"),  # a one-voxel step: hours, exit 0
    model_case("model-json-file-outside-the-export", _meta_edit(lambda m: m["files"].update(params="../params")),
               ("must name a file inside the export",), "model.json"),
    model_case("model-missing", lambda w, inp: inp / "none", ("not an export",)),
    model_case("model-not-an-export", lambda w, inp: inp, ("not an export",)),
    model_case("model-json-file-not-its-folder", lambda w, inp: w.orbax / "model.json",
               ("not an export folder but a file inside the export",)),
    model_case("model-a-finetuning-workdir", lambda w, inp: w.workdir,
               ("a finetuning workdir, not an export", "run `lnfm export --checkpoint")),
    model_case("model-json-not-json", _model_json("{oops"), ("not valid JSON",), "model.json"),
    model_case("model-json-without-format", _model_json('{"model": {}}'), ("schema_version None is not 2",),
               "model.json"),
    model_case("model-json-a-list", _model_json("[1, 2]"), ("expected a JSON object",), "model.json"),
    model_case("encoder-only-export", _encoder_only, ("encoder-only export cannot segment",)),
    model_case("checksum-mismatch", lambda w, inp: _rewrite(_copy(w.safetensors, inp / "m"), "model.safetensors",
                                                            _flip), ("checksum mismatch",), "model.safetensors"),
    model_case("corrupt-safetensors", lambda w, inp: _rechecksum(_rewrite(_copy(w.safetensors, inp / "m"),
                                                                          "model.safetensors", _head)),
               ("not a readable safetensors file",), "model.safetensors"),
    model_case("corrupt-stablehlo", lambda w, inp: _rechecksum(_rewrite(_copy(w.stablehlo, inp / "m"),
                                                                        "inference.stablehlo", _smear)),
               ("not a readable StableHLO file",), "inference.stablehlo"),
    model_case("orbax-params-missing", lambda w, inp: _rechecksum(_rmtree(_copy(w.orbax, inp / "m"), "params")),
               ("not a readable Orbax parameter file",), "params"),
]


def _rmtree(folder: Path, name: str) -> Path:
    shutil.rmtree(folder / name, ignore_errors=True)
    return folder


def _same_grid_as(source):
    def check(w, inp, out):
        ref = nib.load(source(w, inp))
        mask = nib.load(out / "mask.nii.gz")
        assert mask.shape == ref.shape[:3] and np.allclose(mask.affine, ref.affine, atol=1e-4)
        assert (out / "nodes.csv").is_file() and (out / "preview.png").is_file()
    return check


def _two_series_flag(w, inp, out):
    folder, _, uid_b = two_series(inp / "scans")
    return pred_argv(w.orbax, folder, out, "--series", uid_b), None


def _mask_shape(shape):
    def check(w, inp, out):
        assert nib.load(out / "mask.nii.gz").shape == shape
    return check


def _upper_suffix(w, inp, out):
    return ["--model", w.orbax, "--input", w.scan, "--output", out / "MASK.NII.GZ", "--probabilities",
            out / "P.NII.GZ"], None


def _reads_back(w, inp, out):
    for name in ("MASK.NII.GZ", "P.NII.GZ"):  # the suffix says gzip: the file must be gzipped
        assert (out / name).read_bytes()[:2] == b"\x1f\x8b", name
        assert nib.load(out / name).shape[:3] == nib.load(w.scan).shape


def _tilt(ds, n):
    """A 20 degree gantry tilt: each slice shifted along y by its z position times tan(20 deg)."""
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + z * float(np.tan(np.radians(20.0))), z]
    ds.GantryDetectorTilt = 20.0


def _tilted_case(w, inp, out):
    folder, _ = dicom_edited(_tilt, extra_slice=True)(inp)
    return pred_argv(w.orbax, folder, out), None


def _on_the_tilted_grid(w, inp, out):
    """The mask lies on the series' own (sheared) grid: its shape and affine."""
    from lnfm.io.dicom import read_dicom_series

    src = read_dicom_series(inp / "d")
    mask = nib.load(out / "mask.nii.gz")
    assert mask.shape == src.data.shape[:3] == (512, 512, 3)
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
    assert abs(src.affine[1, 2]) > 0.3  # the slice axis leans along y: the grid is sheared


HANDLED = [
    Case("predict-real-ct", "predict", lambda w, inp, out: (pred_argv(w.orbax, real_ct(inp), out), None), 0,
         check=_same_grid_as(lambda w, inp: inp / "real_ct.nii.gz")),
    Case("predict-two-series-with-series-flag", "predict", _two_series_flag, 0, check=_mask_shape((512, 512, 2))),
    Case("predict-output-suffix-in-capitals", "predict", _upper_suffix, 0, check=_reads_back),
    Case("predict-real-ct-nrrd-in-cm", "predict", lambda w, inp, out: (pred_argv(w.orbax, _real_ct_nrrd_cm(inp), out),
                                                                       None), 0,
         check=_same_grid_as(lambda w, inp: inp / "real_ct.nii.gz")),
    Case("predict-input-path-with-a-comma", "predict", _comma_in_path, 0,  # read as two channels: refused
         check=_same_grid_as(lambda w, inp: inp / "Smith, John" / "ct.nii.gz")),
    Case("predict-dicom-gantry-tilt", "predict", _tilted_case, 0, check=_on_the_tilted_grid),
    Case("predict-stablehlo-export", "predict", lambda w, inp, out: (pred_argv(w.stablehlo, w.scan, out), None), 0,
         check=_same_grid_as(lambda w, inp: w.scan)),
]

ALL = EXPORT + SCANS + OPTIONS + HANDLED


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_hostile_export_and_predict(case, world, tmp_path, capsys):
    run_case(case, world, tmp_path, capsys)
