"""Hostile input to prepare (data_prep/prepare.py) and synth (data_prep/synth.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harness import Case, run_case
from inputs import (AFFINE, MIRRORED_X, NONUNIFORM_DICOM, body, csv_file, dicom_copy, dicom_edited, dicom_with_garbage,
                    good_pair, nhdr, nii, nii_forms, nnunet, nrrd_in_units, outside_secret, real_ct, not_hu_scans,
                    real_ln_mask, two_series)
from scan_bombs import nifti_bomb


def prep(inp_path, out: Path, *extra) -> list:
    return ["--input", inp_path, "--output", out / "store", "--workers", "0", "salt=s", *extra]


def _one_good(inp: Path) -> Path:
    return csv_file(inp / "cases.csv", [{"case_id": "c1", "image": good_pair(inp)[0]}])


def option(id: str, extra: list, says: tuple, named=None) -> Case:
    """A bad option or config: exit 2 before anything is read or written."""
    return Case(f"prepare-{id}", "prepare", lambda w, inp, out: (prep(_one_good(inp), out, *extra), named), 2, says)


def _config_file(id, text, says):
    def make(w, inp, out):
        cfg = inp / "prep.yaml"
        cfg.write_text(text)
        return prep(_one_good(inp), out, "--config", cfg), str(cfg)
    return Case(f"prepare-{id}", "prepare", make, 2, says)


def _output(id: str, where, says: tuple) -> Case:
    """prepare of one good case into the folder `where(world, inp)`, refused in one line naming it."""
    def make(w, inp, out):
        dest = where(w, inp)
        return ["--input", _one_good(inp), "--output", dest, "--workers", "0", "salt=s"], str(dest)
    return Case(f"prepare-output-{id}", "prepare", make, 2, says)


OPTIONS = [
    option("spacing-negative", ["--spacing=-1.5,1.5,1.5"], ("spacing:", "not a voxel size")),
    option("spacing-zero", ["--spacing=0,1,1"], ("not a voxel size",)),
    option("spacing-nan", ["--spacing=nan,1,1"], ("not a voxel size",)),
    option("spacing-huge", ["--spacing=1000,1000,1000"], ("not a voxel size",)),
    option("spacing-tiny", ["--spacing=0.0001,1,1"], ("not a voxel size",)),
    option("spacing-inf", ["--spacing=inf,1,1"], ("not a voxel size",)),
    option("spacing-two-values", ["--spacing=1,1"], ("spacing", "expected 3 values")),
    option("spacing-text", ["--spacing=a,b,c"], ("spacing", "expected a number")),
    option("override-unknown-key", ["spacng=[1,1,1]"], ("unknown config key 'spacng'", "did you mean 'spacing'")),
    option("override-not-key-value", ["spacing"], ("not of the form key.sub=value",)),
    option("override-bad-int", ["chunk=abc"], ("chunk", "expected an integer")),
    option("chunk-not-dividing-shard", ["chunk=48"], ("shard", "multiple of chunk")),
    option("split-fractions-negative", ["split_fractions=[-1,1,1]"], ("split_fractions",)),
    option("label-map-out-of-range", ["label_map={1: 300}"], ("label_map",)),
    option("site-preset-unknown", ["--site-preset", "mars"], ("unknown sites config 'mars'",)),
    option("workers-text", ["--workers", "x"], ("--workers", "invalid int value")),
    option("shard-index-outside", ["--num-shards", "2", "--shard-index", "5"], ("--shard-index 5",)),
    option("zero-shards", ["--num-shards", "0"], ("--num-shards 0",)),
    option("negative-shard-index", ["--shard-index", "-1"], ("--shard-index -1",)),
    _config_file("config-bad-yaml", "spacing: [1, 2\n", ("not valid YAML",)),
    _config_file("config-not-mapping", "- 1\n- 2\n", ("top level must be a mapping",)),
    _config_file("config-unknown-key", "spacin: [1, 1, 1]\n", ("unknown config key 'spacin'",)),
    Case("prepare-config-bad-spacing", "prepare", lambda w, inp, out: (prep(_one_good(inp), out, "--config", _text(
        inp / "prep.yaml", "spacing: [-1, 1, 1]\n")), None), 2, ("spacing: [-1.0, 1.0, 1.0] is not a voxel size",)),
    Case("prepare-config-missing", "prepare", lambda w, inp, out: (prep(_one_good(inp), out, "--config",
                                                                        inp / "none.yaml"), str(inp / "none.yaml")),
         2, ("config file not found",)),
    Case("prepare-output-is-a-file", "prepare",
         lambda w, inp, out: (["--input", _one_good(inp), "--output", _touch(inp / "afile"), "--workers", "0"],
                              str(inp / "afile")), 2, ("is not a folder",)),
    # A store written into an export broke it ('file not listed in checksums.sha256' in predict and export --verify);
    # one written into a workdir mixed its files with the run's. The harness checks the world's trees are unchanged.
    _output("is-an-export", lambda w, inp: w.safetensors, ("is a model export",)),
    _output("inside-an-export", lambda w, inp: w.orbax / "store", ("lies inside the model export",)),
    _output("is-a-finetuning-workdir", lambda w, inp: w.workdir, ("is a finetuning run's workdir",)),
    _output("is-a-folder-of-the-users", lambda w, inp: _touch(_mkdir(inp / "mine") / "thesis.docx").parent,
            ("holds files prepare did not make (thesis.docx) and is not a store",)),
    Case("prepare-output-bad-url", "prepare",
         lambda w, inp, out: (["--input", _one_good(inp), "--output", "bogus://bucket/x"], "bogus://bucket/x"), 2,
         ("unsupported store URL scheme",)),
    Case("prepare-input-missing", "prepare", lambda w, inp, out: (prep(inp / "nowhere", out), str(inp / "nowhere")),
         2, ("input not found",)),
    Case("prepare-input-empty-folder", "prepare", lambda w, inp, out: (prep(_mkdir(inp / "empty"), out),
                                                                       str(inp / "empty")), 2, ("no cases found",)),
    Case("prepare-csv-without-image-column", "prepare",
         lambda w, inp, out: (prep(_text(inp / "c.csv", "case_id,img\na,b.nii.gz\n"), out), str(inp / "c.csv")), 2,
         ("no 'image' column",)),
    Case("prepare-csv-not-utf8", "prepare",
         lambda w, inp, out: (prep(_bytes(inp / "c.csv", "case_id,image\nf\xe9e,a.nii.gz\n".encode("latin-1")), out),
                              str(inp / "c.csv")), 2, ("not UTF-8",)),
    Case("prepare-nnunet-bad-dataset-json", "prepare",
         lambda w, inp, out: (prep(_broken_json(nnunet(inp)), out), str(inp / "raw" / "dataset.json")), 2,
         ("not valid JSON",)),
    Case("prepare-two-dicom-series-only", "prepare",
         lambda w, inp, out: (prep(two_series(inp / "dicom" / "scans")[0].parent, out),
                              str(inp / "dicom" / "scans")), 2, ("2 DICOM series", "--series")),
]


def _touch(p: Path) -> Path:
    p.write_bytes(b"not a store")
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _text(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _bytes(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _broken_json(root: Path) -> Path:
    (root / "dataset.json").write_text("{not json")
    return root


# ----------------------------------------------------------------------------- bad cases in a batch


def bad_case(id: str, build, says: tuple) -> Case:
    """One bad case next to a good one: the good one converts, the bad one is a FAILED line
    naming its file, exit 1. `build(inp)` returns (row fields, the file at fault)."""
    def make(w, inp, out):
        row, fault = build(inp)
        good = good_pair(inp)
        path = csv_file(inp / "cases.csv", [{"case_id": "good", "image": good[0], "label": good[1]},
                                            {"case_id": "bad", **{k: str(v) for k, v in row.items()}}])
        return prep(path, out), str(fault)
    return Case(f"prepare-{id}", "prepare", make, 1, says, check=_only_good_converted, partial=True)


def _only_good_converted(w, inp, out):
    from lnfm.data.store import read_failures, read_manifest

    assert [r["case_id"] for r in read_manifest(str(out / "store"))] == ["good"]
    assert len(read_failures(str(out / "store"))) == 1
    assert sorted(p.name for p in (out / "store" / "cases").iterdir()) == ["good"]  # no array of the bad case


def _img(inp, data, affine=AFFINE, name="bad.nii.gz"):
    p = nii(inp / name, data, affine)
    return {"image": p}, p


def _lab(inp, label, affine=AFFINE):
    image, _ = body()
    p = nii(inp / "bad_label.nii.gz", label, affine)
    return {"image": nii(inp / "img.nii.gz", image), "label": p}, p


def _forms(inp, name, data, qform, sform):
    p = nii_forms(inp / name, data, qform, sform)
    return {"image": p}, p


def _label_mirrored(inp):
    """A label whose qform mirrors its sform: by the qform the node lies on the other side."""
    p = nii_forms(inp / "bad_label.nii.gz", LAB, MIRRORED_X, AFFINE)
    return {"image": nii(inp / "img.nii.gz", IMG), "label": p}, p


def _nrrd(inp, data, affine):
    from lnfm.io import write_nrrd

    p = inp / "bad.nrrd"
    write_nrrd(p, data, affine)
    return {"image": p}, p


def _file(inp, name, data: bytes):
    p = inp / name
    p.write_bytes(data)
    return {"image": p}, p


IMG, LAB = body()


def _with(a, idx, value, dtype=None):
    a = a.astype(dtype or a.dtype).copy()
    a[idx] = value
    return a


def _truncated(inp):
    src = real_ct(inp).read_bytes()
    return _file(inp, "truncated.nii.gz", src[: len(src) // 3])


def _nhdr_abs(inp):
    h = nhdr(inp / "scan", str(outside_secret(inp)))
    return {"image": h}, h


def _nhdr_rel(inp):
    outside_secret(inp)
    h = nhdr(inp / "scan", "../secret.bin")
    return {"image": h}, h


def _two_series_row(inp):
    folder = two_series(inp / "scans")[0]
    return {"image": folder}, folder


def _real_mask_on_other_grid(inp):
    label = real_ln_mask(inp)
    return {"image": real_ct(inp), "label": label}, label


def _orientation_doubled(inp):
    """Direction cosines of length 2: read as given, every voxel would be twice its size."""
    folder, fault = dicom_edited(lambda ds, n: setattr(ds, "ImageOrientationPatient", [2, 0, 0, 0, 2, 0]))(inp)
    return {"image": folder}, fault


def _as_image(path: Path):
    return {"image": path}, path


BAD_CASES = [
    *[bad_case(id, lambda inp, voxels=voxels: _img(inp, voxels(inp)), says) for id, voxels, says in not_hu_scans()],
    bad_case("nrrd-space-unit-furlong", lambda inp: _as_image(nrrd_in_units(inp, "furlong")),
             ("unsupported NRRD space unit 'furlong'",)),
    bad_case("corrupt-gzip", lambda inp: _file(inp, "corrupt.nii.gz", b"\x1f\x8b" + b"garbage" * 30), ("unreadable",)),
    bad_case("text-named-nii", lambda inp: _file(inp, "notes.nii", b"this is not an image " * 30), ("unreadable",)),
    bad_case("truncated-real-ct", _truncated, ("unreadable",)),
    bad_case("unknown-extension", lambda inp: _file(inp, "scan.png", b"\x89PNG"), ("unknown image format",)),
    # a header claiming 30000^3 voxels (1.6 PB as int16) in a 1 kB file: refused from it, none of it read
    bad_case("header-claims-a-huge-grid", lambda inp: _as_image(Path(nifti_bomb(inp / "huge.nii.gz", (30000,) * 3))),
             ("converting this case needs about", "30000x30000x30000 voxels in this file", "more than this host's")),
    bad_case("image-missing", lambda inp: ({"image": inp / "gone.nii.gz"}, inp / "gone.nii.gz"), ("not found",)),
    bad_case("nan-voxel", lambda inp: _img(inp, _with(IMG, (3, 3, 3), np.nan, np.float32)), ("NaN or Inf",)),
    bad_case("inf-voxel", lambda inp: _img(inp, _with(IMG, (3, 3, 3), np.inf, np.float32)), ("NaN or Inf",)),
    bad_case("one-voxel", lambda inp: _img(inp, np.full((1, 1, 1), 40, np.int16)), ("at least 2 voxels",)),
    bad_case("single-slice", lambda inp: _img(inp, IMG[:, :, :1]), ("at least 2 voxels",)),
    bad_case("2d-image", lambda inp: _img(inp, IMG[:, :, 0]), ("2D",)),
    bad_case("4d-three-channels", lambda inp: _img(inp, np.stack([IMG] * 3, -1)), ("4D",)),
    bad_case("complex-voxels", lambda inp: _img(inp, IMG.astype(np.complex64)), ("unsupported voxel type",)),
    bad_case("all-air", lambda inp: _img(inp, np.full(IMG.shape, -1000, np.int16) + (IMG > 0)), ("all air",)),
    bad_case("hu-saturating-int16", lambda inp: _img(inp, np.where(IMG > 0, 32767, IMG).astype(np.int16)),
             ("int16 range",)),
    bad_case("hu-beyond-int16", lambda inp: _img(inp, IMG.astype(np.float32) * 1000), ("int16 range",)),
    bad_case("coarse-source-spacing", lambda inp: _img(inp, IMG, np.diag([25.0, 1.5, 2.0, 1])), ("absurd voxel",)),
    bad_case("nifti-valid-pixdim-no-qform-sform", lambda inp: _forms(inp, "bad.nii.gz", IMG, None, None),
             ("no orientation",)),
    bad_case("label-qform-mirrors-sform", _label_mirrored, ("qform and sform disagree",)),
    bad_case("singular-affine-nrrd", lambda inp: _nrrd(inp, IMG, np.diag([0.0, 1.5, 2.0, 1])), ("affine",)),
    bad_case("label-grid-shifted", lambda inp: _lab(inp, LAB, np.array([[1.5, 0, 0, 9], [0, 1.5, 0, 0], [0, 0, 2, 0],
                                                                        [0, 0, 0, 1]])), ("up to 9 mm", "affine")),
    # a 0.002 mm offset (a label re-saved with rounded origin): the message says it is the affine, and by how much
    bad_case("label-affine-off-by-2-microns", lambda inp: _lab(inp, LAB, np.array([[1.5, 0, 0, 0.002], [0, 1.5, 0, 0],
                                                                                  [0, 0, 2, 0], [0, 0, 0, 1]])),
             ("up to 0.002 mm", "affine differs")),
    bad_case("label-other-shape", lambda inp: _lab(inp, LAB[:-2]), ("grid", "shape")),
    bad_case("label-fractional", lambda inp: _lab(inp, LAB * 0.5), ("non-integer",)),
    bad_case("label-negative", lambda inp: _lab(inp, LAB.astype(np.int16) - 1), ("outside 0..255",)),
    bad_case("label-300", lambda inp: _lab(inp, LAB.astype(np.int16) * 300), ("outside 0..255",)),
    bad_case("label-empty", lambda inp: _lab(inp, LAB * 0), ("empty label",)),
    bad_case("label-nan", lambda inp: _lab(inp, _with(LAB, (0, 0, 0), np.nan, np.float32)), ("NaN",)),
    bad_case("label-missing", lambda inp: ({"image": nii(inp / "i.nii.gz", IMG), "label": inp / "nol.nii.gz"},
                                           inp / "nol.nii.gz"), ("not found",)),
    bad_case("real-ln-mask-on-another-grid", _real_mask_on_other_grid, ("grid",)),
    bad_case("nhdr-data-file-absolute-elsewhere", _nhdr_abs, ("beside the header",)),
    bad_case("nhdr-data-file-in-parent", _nhdr_rel, ("beside the header",)),
    bad_case("two-dicom-series-in-one-folder", _two_series_row, ("2 DICOM series", "--series")),
    bad_case("dicom-with-a-garbage-slice", lambda inp: ({"image": dicom_with_garbage(inp / "d")}, inp / "d"),
             ("unreadable DICOM",)),
    bad_case("dicom-non-uniform-slices", lambda inp: ({"image": dicom_copy(inp / "d", NONUNIFORM_DICOM)}, inp / "d"),
             ("slice spacing",)),
    bad_case("dicom-orientation-not-unit-vectors", _orientation_doubled, ("ImageOrientationPatient", "unit vectors")),
    bad_case("split-not-a-split", lambda inp: ({"image": nii(inp / "s.nii.gz", IMG), "split": "holdout"},
                                               inp / "s.nii.gz"), ("split 'holdout'",)),
    bad_case("unsafe-case-id", lambda inp: ({"image": nii(inp / "u.nii.gz", IMG), "case_id": "../escape"},
                                            inp / "u.nii.gz"), ("may only hold",)),
]


def _dup(w, inp, out):
    g1, g2 = good_pair(inp, "a"), good_pair(inp, "b")
    path = csv_file(inp / "cases.csv", [{"case_id": "good", "image": g1[0], "label": g1[1]},
                                        {"case_id": "good", "image": g2[0]}])
    return prep(path, out), str(g2[0])


BAD_CASES.append(Case("prepare-duplicate-case-id", "prepare", _dup, 1, ("duplicate case id",),
                      check=_only_good_converted, partial=True))


def _same_image_twice(w, inp, out):
    image, label = good_pair(inp)  # one scan under two ids, e.g. once as train and once as test: leakage
    path = csv_file(inp / "cases.csv", [{"case_id": "good", "image": image, "label": label, "split": "train"},
                                        {"case_id": "again", "image": image, "label": label, "split": "test"}])
    return prep(path, out), str(image)


BAD_CASES.append(Case("prepare-same-image-under-two-ids", "prepare", _same_image_twice, 1,
                      ("lists the image and label of case 'good'",), check=_only_good_converted, partial=True))


def _pet_apart(shift_mm: float):
    """A PET/CT case whose PET lies `shift_mm` above its CT, beside a good PET/CT case: resampled, the PET
    was stored as zero fill wherever it does not reach (all of it 1000 mm away), exit 0."""
    def make(w, inp, out):
        pet = (LAB * 6.0 + 1.0).astype(np.float32)
        far = AFFINE.copy()
        far[2, 3] += shift_mm
        image, label = good_pair(inp)
        bad = nii(inp / "bad_pet.nii.gz", pet, far)
        path = csv_file(inp / "cases.csv", [
            {"case_id": "good", "image": image, "label": label, "pet": nii(inp / "good_pet.nii.gz", pet)},
            {"case_id": "bad", "image": nii(inp / "bad_ct.nii.gz", IMG), "pet": bad}])
        return prep(path, out), str(bad)
    return make


BAD_CASES += [
    Case("prepare-pet-1000-mm-from-its-ct", "prepare", _pet_apart(1000.0), 1, ("channel grid covers only 0.0%",),
         check=_only_good_converted, partial=True),
    # 30 mm along z, where the CT spans 24 slices of 2 mm: 9 of them remain inside the PET
    Case("prepare-pet-30-mm-off-its-ct", "prepare", _pet_apart(30.0), 1, ("channel grid covers only 37.5%",),
         check=_only_good_converted, partial=True),
]


# ----------------------------------------------------------------------------- handled correctly


def _bom(w, inp, out):
    image, label = good_pair(inp)
    path = inp / "cases.csv"
    path.write_bytes(f"\ufeffcase_id,image,label\nmy_case,{image},{label}\n".encode())
    return prep(path, out), None


def _ids(*expected):
    def check(w, inp, out):
        from lnfm.data.store import read_manifest

        assert [r["case_id"] for r in read_manifest(str(out / "store"))] == list(expected)
    return check


def _nnunet_with(extra: dict[str, np.ndarray], fault: str):
    """The two-case nnU-Net folder plus files `extra` (path under raw/ -> voxels); the old code passed over
    each without a word (converted 2, failed 0, exit 0)."""
    def make(w, inp, out):
        raw = nnunet(inp)
        for rel, data in extra.items():
            nii(raw / rel, data)
        return prep(raw, out), str(raw / fault)
    return make


BAD_CASES += [
    Case("prepare-nnunet-image-without-channel-suffix", "prepare",
         _nnunet_with({"imagesTr/caseB.nii.gz": IMG, "labelsTr/caseB.nii.gz": LAB}, "imagesTr/caseB.nii.gz"), 1,
         ("name lacks the _NNNN channel suffix nnU-Net uses",), check=_ids("case0", "case1"), partial=True),
    Case("prepare-nnunet-channel-dataset-json-does-not-declare", "prepare",
         _nnunet_with({"imagesTr/case1_0001.nii.gz": IMG.astype(np.float32)}, "imagesTr/case1_0001.nii.gz"), 1,
         ("channel 0001 is not declared (dataset.json declares 0000 CT)",), check=_ids("case0"), partial=True),
    Case("prepare-nnunet-label-without-an-image", "prepare",
         _nnunet_with({"labelsTr/caseZ.nii.gz": LAB}, "labelsTr/caseZ.nii.gz"), 1,
         ("label without an image: no imagesTr/caseZ_0000 file",), check=_ids("case0", "case1"), partial=True),
]


def _series_flag(w, inp, out):
    folder, _, uid_b = two_series(inp / "dicom" / "scans")
    return prep(folder.parent, out, "--series", uid_b), None


def _one_record_shape(shape):
    def check(w, inp, out):
        from lnfm.data.store import read_manifest

        (rec,) = read_manifest(str(out / "store"))
        assert rec["source_shape"] == list(shape)
    return check


def _rerun(w, inp, out):
    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    raw = nnunet(inp)
    prepare_dataset(str(raw), str(inp / "store"), PrepareConfig(workers=0, salt="s"), show_progress=False)
    return ["--input", raw, "--output", inp / "store", "--workers", "0", "salt=s"], None


def _nhdr_beside(w, inp, out):
    header = nhdr(inp / "scan", "scan.raw")
    (inp / "scan" / "scan.raw").write_bytes(np.asfortranarray(IMG).tobytes(order="F"))
    return prep(csv_file(inp / "c.csv", [{"case_id": "n", "image": header}]), out), None


HANDLED = [
    Case("prepare-csv-with-byte-order-mark", "prepare", _bom, 0, check=_ids("my_case")),
    Case("prepare-two-series-with-series-flag", "prepare", _series_flag, 0, check=_one_record_shape((512, 512, 2))),
    Case("prepare-real-ct", "prepare", lambda w, inp, out: (prep(csv_file(inp / "c.csv", [
        {"case_id": "r", "image": real_ct(inp)}]), out), None), 0, check=_one_record_shape((122, 101, 30))),
    Case("prepare-real-dicom-series", "prepare", lambda w, inp, out: (prep(dicom_copy(inp / "d" / "s").parent, out),
                                                                      None), 0, check=_one_record_shape((512, 512, 2))),
    Case("prepare-nnunet-folder", "prepare", lambda w, inp, out: (prep(nnunet(inp), out), None), 0,
         check=_ids("case0", "case1")),
    Case("prepare-rerun-into-the-same-store-changes-nothing", "prepare", _rerun, 0),
    Case("prepare-nhdr-with-data-beside-it", "prepare", _nhdr_beside, 0, check=_ids("n")),
]


# ----------------------------------------------------------------------------- synth


def synth(id: str, extra: list, rc: int, says: tuple = (), named=None, check=None) -> Case:
    return Case(f"synth-{id}", "synth", lambda w, inp, out: (["--out", out / "phantoms", "--no-gallery",
                                                              "--no-real-shapes", "--shape", "32,32,16", *extra],
                                                             named), rc, says, check)


def _one_phantom(w, inp, out):
    files = sorted(p.name for p in (out / "phantoms" / "imagesTr").iterdir())
    assert files == ["pelvis_000_0000.nii.gz"]
    assert json.loads((out / "phantoms" / "dataset.json").read_text())["numTraining"] == 1


TINY = ["--no-gallery", "--no-real-shapes", "--shape", "32,32,16"]


def _phantoms_made(folder: Path, site: str = "pelvis", num_cases: int = 3) -> Path:
    """Phantoms an earlier `lnfm synth --site SITE --num-cases N` + TINY wrote to `folder`."""
    from lnfm.data.synth import SynthConfig, write_dataset

    write_dataset(SynthConfig(site=site, num_cases=num_cases, shape=(32, 32, 16), gallery=False,
                              use_real_shapes=False), folder)
    return folder


def _into_users_dataset(w, inp, out):
    raw = nnunet(inp)  # a user's nnU-Net folder: its dataset.json was replaced, exit 0
    return ["--out", raw, "--num-cases", "1", *TINY], str(raw)


def _other_site_into_phantoms(w, inp, out):
    mix = _phantoms_made(inp / "mix")  # pelvis 000..002 stayed beside a dataset.json listing axilla_000 alone
    return ["--out", mix, "--site", "axilla", "--num-cases", "1", *TINY], str(mix)


def _stray_file_with_force(w, inp, out):
    folder = _phantoms_made(inp / "phantoms", num_cases=1)
    stray = nii(folder / "imagesTr" / "mine_0000.nii.gz", IMG)
    return ["--out", folder, "--num-cases", "2", "--force", *TINY], str(stray)


def _force_over_other_phantoms(w, inp, out):
    _phantoms_made(out / "phantoms")
    return ["--out", out / "phantoms", "--site", "axilla", "--num-cases", "1", "--force", *TINY], None


def _only_axilla(w, inp, out):
    files = sorted(p.relative_to(out / "phantoms").as_posix() for p in (out / "phantoms").rglob("*") if p.is_file())
    assert files == [".lnfm-synth.json", "dataset.json", "imagesTr/axilla_000_0000.nii.gz",
                     "labelsTr/axilla_000.nii.gz"]
    meta = json.loads((out / "phantoms" / "dataset.json").read_text())
    assert [(c["case"], c["site"]) for c in meta["cases"]] == [("axilla_000", "axilla")]


SYNTH = [
    Case("synth-out-holds-a-users-nnunet-dataset", "synth", _into_users_dataset, 2,
         ("holds files synth did not make (dataset.json, imagesTr, labelsTr)",)),
    Case("synth-other-settings-into-its-own-phantoms", "synth", _other_site_into_phantoms, 2,
         ("holds phantoms synth made with other settings", "site: 'pelvis' there, 'axilla' now", "pass --force")),
    Case("synth-force-with-a-stray-file-in-the-phantoms", "synth", _stray_file_with_force, 2,
         ("not a file of the phantoms synth recorded",)),
    Case("synth-force-replaces-its-own-phantoms-whole", "synth", _force_over_other_phantoms, 0, check=_only_axilla),
    synth("num-cases-zero", ["--num-cases", "0"], 2, ("--num-cases wants at least 1",)),
    synth("num-cases-negative", ["--num-cases", "-3"], 2, ("--num-cases wants at least 1",)),
    synth("num-cases-text", ["--num-cases", "many"], 2, ("--num-cases",)),
    # a traceback from numpy's seed sequence, after the mark was written: a plain rerun was then refused
    synth("seed-negative", ["--seed", "-1"], 2, ("--seed", "a seed is a whole number >= 0")),
    synth("shape-too-small", ["--shape", "8,8,8"], 2, ("--shape wants X,Y,Z with each >= 16",)),
    synth("shape-two-values", ["--shape", "32,32"], 2, ("--shape wants X,Y,Z",)),
    synth("shape-text", ["--shape", "a,b,c"], 2, ("--shape",)),
    synth("site-unknown", ["--site", "mars"], 2, ("invalid choice: 'mars'",)),
    synth("seed-text", ["--seed", "x"], 2, ("--seed",)),
    Case("synth-out-is-a-file", "synth", lambda w, inp, out: (["--out", _touch(inp / "afile"), "--num-cases", "1",
                                                               "--no-gallery"], str(inp / "afile")), 2,
         ("is not a folder",)),
    synth("one-small-case", ["--num-cases", "1"], 0, check=_one_phantom),
]

ALL = OPTIONS + BAD_CASES + HANDLED + SYNTH


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_hostile_prepare_and_synth(case, world, tmp_path, capsys):
    run_case(case, world, tmp_path, capsys)
