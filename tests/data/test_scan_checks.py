"""Scans that are not a usable body CT, and target spacings that are not a voxel size, are
refused in one line by prepare (and by the same checks in predict: tests/hostile)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from raw_cases import affine_lps, phantom, save, write_csv

from lnfm.cli import run_job
from lnfm.config import ConfigError
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.benchmark import BenchmarkSpec
from lnfm.data.scan_checks import (NO_AIR_HU, ScanError, check_ct, check_field_of_view, check_hu_scale,
                                   check_source_spacing, check_target_spacing)
from lnfm.data.synth import SynthConfig, case_seed, generate_case
from lnfm.io import read_image

# Every real CT volume of ../shared/data (the two single-slice sets are checked below on their own).
REAL_CTS = ["ct/totalsegmentator/example_ct.nii.gz", "ct/totalsegmentator/example_ct_sm.nii.gz",
            "ct/totalsegmentator/example_ct_dicom", "ct/totalsegmentator/chest_vessels/ct_cropped.nii.gz",
            "dicom_small/lungmask"]
BODY_HU = PrepareConfig().body_threshold_hu


@pytest.mark.parametrize("spacing", [(-1.5, 1.5, 1.5), (0.0, 1.0, 1.0), (math.nan, 1, 1), (1e4, 1e4, 1e4),
                                     (1e-4, 1.0, 1.0), (math.inf, 1, 1)])
def test_absurd_target_spacing_is_one_config_error_before_any_case(tmp_path, spacing):
    img, _ = phantom()
    csv_path = write_csv(tmp_path / "cases.csv", [{"case_id": "a", "image": save(tmp_path / "a.nii.gz", img,
                                                                                  affine_lps())}])
    with pytest.raises(ConfigError, match=r"^spacing: .* is not a voxel size"):
        prepare_dataset(str(csv_path), str(tmp_path / "store"), PrepareConfig(workers=0, spacing=spacing),
                        show_progress=False)
    assert not (tmp_path / "store").exists()


def test_valid_spacing_passes_as_floats():
    assert check_target_spacing([1, "1.5", 2.0]) == (1.0, 1.5, 2.0) and check_target_spacing(None) is None


def test_spacing_flag_error_is_one_line_and_exit_2(tmp_path, capsys):
    img, _ = phantom()
    csv_path = write_csv(tmp_path / "cases.csv", [{"case_id": "a", "image": save(tmp_path / "a.nii.gz", img,
                                                                                  affine_lps())}])
    rc = run_job("prepare", ["--input", str(csv_path), "--output", str(tmp_path / "store"), "--spacing=-1,1,1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["lnfm prepare: error: spacing: [-1.0, 1.0, 1.0] is not a voxel size (three values "
                               "from 0.05 to 20 mm)"]


def _bad_scans(root):
    img, _ = phantom()
    return {
        "one_voxel": (save(root / "one.nii.gz", np.full((1, 1, 1), 40, np.int16), np.eye(4)), "at least 2 voxels"),
        "all_air": (save(root / "air.nii.gz", np.full(img.shape, -1000, np.int16) + (img > 0), affine_lps()),
                    "all air"),
        "saturated": (save(root / "sat.nii.gz", np.where(img > 0, 32767, img).astype(np.int16), affine_lps()),
                      "int16 range"),
        "beyond_int16": (save(root / "big.nii.gz", img.astype(np.float32) * 1000, affine_lps()), "int16 range"),
        "coarse_source": (save(root / "coarse.nii.gz", img, np.diag([25.0, 1, 1, 1])), "absurd voxel spacing"),
        "hu_x10": (save(root / "x10.nii.gz", img * np.int16(10), affine_lps()), "not Hounsfield units (scaled by 10"),
        "hu_div10": (save(root / "div10.nii.gz", img / np.float32(10), affine_lps()), "(divided by 10?)"),
    }


def test_unusable_scans_fail_in_one_line_naming_the_file(tmp_path):
    scans = _bad_scans(tmp_path)
    img, _ = phantom()
    rows = [{"case_id": k, "image": path} for k, (path, _) in scans.items()]
    rows.append({"case_id": "good", "image": save(tmp_path / "good.nii.gz", img, affine_lps())})
    res = prepare_dataset(str(write_csv(tmp_path / "cases.csv", rows)), str(tmp_path / "store"),
                          PrepareConfig(workers=0, salt="s"), show_progress=False)
    assert res.converted == 1
    got = {f["case_id"]: (f["file"], f["reason"]) for f in res.failures}
    for case, (path, reason) in scans.items():
        assert got[case][0] == path and reason in got[case][1] and "\n" not in got[case][1], (case, got[case])


@pytest.mark.parametrize("name", REAL_CTS)
def test_every_real_ct_passes_bare_and_padded(shared_data, name):
    data = read_image(shared_data / name).data
    check_ct(data, name, BODY_HU)
    for pad in (-3024, -32768):  # scanners fill outside the field of view with one such value
        check_ct(np.pad(data, 8, constant_values=pad), name, BODY_HU)


def test_real_single_slices_pass_the_hu_scale_check(shared_data):
    """Too thin for check_ct (one slice; four unevenly spaced), but CT in HU all the same."""
    files = [shared_data / "dicom_small/pydicom_CT_small.dcm",
             *sorted(p for p in (shared_data / "dicom_small/monai_ct_dicom").iterdir() if p.name != "LICENSE")]
    for f in files:
        ds = pydicom.dcmread(f)
        hu = apply_rescale(ds.pixel_array, ds)
        check_hu_scale(hu, str(f), float(hu.min()))


def _refusal(data, name) -> str:
    with pytest.raises(ScanError) as e:
        check_ct(data, name, BODY_HU)
    msg = str(e.value)
    assert msg.startswith(f"{name}: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("name", REAL_CTS[1:3] + REAL_CTS[4:])  # the two others x10 leave the int16 range first
def test_real_ct_times_10_is_refused(shared_data, name):
    data = read_image(shared_data / name).data
    msg = _refusal(data * np.int16(10), name)
    lowest = 10 * int(np.unique(data)[1])  # the minimum is taken for padding; the next value is air's lowest
    share = float(re.match(rf"{re.escape(name)}: ([\d.]+)% of voxels lie below -1200 HU, values down to {lowest} "
                           r"\(air is -1000\): not Hounsfield units \(scaled by 10, or a wrong rescale slope\?\)$",
                           msg).group(1))
    assert 30 < share < 50  # air and lung: everything below -120 HU before scaling


@pytest.mark.parametrize("name", REAL_CTS)
@pytest.mark.parametrize("pad", [None, -3024])
def test_real_ct_divided_by_10_is_refused(shared_data, name, pad):
    source = read_image(shared_data / name).data
    data = source.astype(np.float32) / 10
    if pad is not None:  # padded after the mistake: the border stays at the scanner's value
        data = np.pad(data, 8, constant_values=pad)
    msg = _refusal(data, name)
    found = re.match(rf"{re.escape(name)}: no voxel below -500 HU \(no air or lung\), 99.8% of values within "
                     r"(-?[\d.]+)\.\.(-?[\d.]+) and \d+% of them piled at (-?[\d.]+), as air \(-1000 HU\) would "
                     r"be: not Hounsfield units \(divided by 10\?\)$", msg)
    floor, top = float(found.group(1)), float(found.group(2))
    # air (-1024..-990 HU) and bone, both /10; with a border below it, lungmask's own padding (-2048) /10
    assert (-105 < floor < -99 or floor == source.min() / np.float32(10)) and top < 300


@pytest.mark.parametrize("name", REAL_CTS)
def test_a_noisy_real_ct_passes_and_divided_by_10_is_refused(shared_data, name):
    """Noise of a sharp kernel or a low dose (60 HU more) leaves 5-8 HU /10, as much as a smooth CT's in HU: the
    air piled at the floor tells all the same."""
    source = read_image(shared_data / name).data
    noisy = np.clip(source + np.random.default_rng(0).normal(0, 60, source.shape), -1024, None).astype(np.float32)
    check_ct(noisy, name, BODY_HU)
    assert "piled at" in _refusal(noisy / 10, name)


def test_x10_and_div10_phantoms_fail_in_one_line_with_the_cause(tmp_path):
    img, _ = phantom()
    # air is -1005..-996: the minimum is taken for padding, -1004 is the lowest value left
    assert "values down to -10040 (air is -1000)" in _refusal(img * np.int16(10), "x10.nii.gz")
    assert _refusal(img / np.float32(10), "d.nii.gz").endswith("(divided by 10?)")


@pytest.mark.parametrize("pad", [-1024, -2000, -3024, -32768])
def test_a_phantom_padded_with_one_or_two_constants_passes(pad):
    img, _ = phantom()
    check_ct(np.pad(img, 4, constant_values=pad), "p.nii.gz", BODY_HU)
    check_ct(np.pad(np.pad(img, 3, constant_values=-3024), 3, constant_values=pad), "p.nii.gz", BODY_HU)


@pytest.mark.parametrize("name", REAL_CTS)
def test_a_real_ct_padded_with_four_constants_passes(shared_data, name):
    """A FOV circle, a slab, and two more slabs added by other tools: each border a constant far below air."""
    data = read_image(shared_data / name).data.astype(np.int16)
    for pad in (-2000, -2048, -3024, -32768):
        data = np.pad(data, 3, constant_values=pad)
    check_ct(data, name, BODY_HU)


@pytest.mark.parametrize("name", REAL_CTS[1:3] + REAL_CTS[4:])
def test_real_ct_times_10_inside_four_padding_constants_is_refused(shared_data, name):
    data = read_image(shared_data / name).data * np.int16(10)
    for pad in (-20000, -20480, -30240, -32768):  # the padding went through the same slope
        data = np.pad(data, 3, constant_values=pad)
    assert "not Hounsfield units (scaled by 10" in _refusal(data, name)


def test_a_crop_inside_the_body_without_air_passes():
    """Synthetic pelvis crops hold no air and span as little as a CT /10; their floor is a noise tail."""
    cfg = SynthConfig(site="pelvis", seed=1, shape=(40, 40, 24), gallery=False, use_real_shapes=False)
    image = generate_case("pelvis", case_seed(1, 4), cfg).image
    assert image.min() > -500 and np.ptp(np.percentile(image, [0.1, 99.9])) < 200
    check_ct(image, "crop.nii.gz", BODY_HU)


def _scaled(affine, factor):
    scaled = np.array(affine, float)
    scaled[:3] *= factor  # every length and the origin: an affine in cm (0.1) or in tenths of a mm (10) read as mm
    return scaled


@pytest.mark.parametrize("name", REAL_CTS)
def test_a_real_ct_whose_affine_is_in_cm_is_refused(shared_data, name):
    """Its voxels (0.06-0.3 mm) pass the spacing check; its field of view (18.9-50 mm across) does not."""
    vol = read_image(shared_data / name)
    affine = _scaled(vol.affine, 0.1)
    check_source_spacing(np.linalg.norm(affine[:3, :3], axis=0), name)
    with pytest.raises(ScanError) as e:
        check_field_of_view(affine, vol.data.shape, name)
    assert re.fullmatch(rf"{re.escape(name)}: field of view only [\d.]+ x [\d.]+ x [\d.]+ mm, voxels [\d.]+ x [\d.]+ x "
                        r"[\d.]+ mm: too small for a body CT, or a crop of one with voxels this fine: is its affine in "
                        r"cm, not mm\?", str(e.value)), str(e.value)


@pytest.mark.parametrize("name", REAL_CTS)
def test_a_real_ct_whose_affine_is_times_10_is_refused(shared_data, name):
    vol = read_image(shared_data / name)
    affine = _scaled(vol.affine, 10)
    with pytest.raises(ScanError, match=r"absurd voxel spacing|wider than any CT scanner reconstructs \(over 1 m "
                                        r"across\): is its affine scaled by 10\?$"):
        check_source_spacing(np.linalg.norm(affine[:3, :3], axis=0), name)
        check_field_of_view(affine, vol.data.shape, name)


@pytest.mark.parametrize("name", REAL_CTS + ["dicom_small/pydicom_CT_small.dcm"])
def test_real_cts_their_crops_and_thin_slabs_pass_the_field_of_view_check(shared_data, name):
    vol = read_image(shared_data / name)
    shape = vol.data.shape
    check_field_of_view(vol.affine, shape, name)
    spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
    for box_mm in (100, 40, 10):  # a crop around a node keeps the scan's voxels
        check_field_of_view(vol.affine, [min(n, max(2, round(box_mm / s))) for n, s in zip(shape, spacing)], name)
    check_field_of_view(vol.affine, (*shape[:2], 2), name)  # two slices


def test_the_projects_phantoms_pass_the_field_of_view_check():
    """Synth's finest pixels (0.6 mm) on the benchmark's and demo's grid (57.6 mm across) and on a test grid."""
    check_field_of_view(np.diag([0.6, 0.6, 5.0, 1.0]), BenchmarkSpec().shape, "benchmark.nii.gz")
    cfg = SynthConfig(site="head_neck", seed=0, shape=(24, 24, 16), gallery=False, use_real_shapes=False,
                      spacing_inplane=(0.6, 0.6))
    case = generate_case("head_neck", case_seed(0, 0), cfg)
    check_field_of_view(case.affine, case.image.shape, "synth.nii.gz")
    img, _ = phantom()  # the fixtures of these tests: 40 x 43 x 48 mm
    check_field_of_view(affine_lps(), img.shape, "phantom.nii.gz")


def test_prepare_refuses_a_real_ct_whose_affine_is_in_cm_in_one_line(shared_data, tmp_path):
    import nibabel as nib

    src = nib.load(shared_data / "ct/totalsegmentator/example_ct.nii.gz")
    affine = _scaled(src.affine, 0.1)
    img = nib.Nifti1Image(np.asanyarray(src.dataobj), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    path = str(tmp_path / "cm.nii.gz")
    nib.save(img, path)
    res = prepare_dataset(str(write_csv(tmp_path / "cases.csv", [{"case_id": "cm", "image": path}])),
                          str(tmp_path / "store"), PrepareConfig(workers=0, salt="s"), show_progress=False)
    assert res.converted == 0 and [(f["file"], f["reason"]) for f in res.failures] == [
        (path, "field of view only 36.6 x 30.3 x 33.6 mm, voxels 0.3 x 0.3 x 0.3 mm: too small for a body CT, or a "
               "crop of one with voxels this fine: is its affine in cm, not mm?")]


def interior_boxes(vol, sizes_mm):
    """The boxes of a grid of each size over the scan that lie inside the body: no voxel below NO_AIR_HU, and fat
    or lung tissue in them (a box inside one organ, all above 0 HU, is refused as HU + 1024 would be)."""
    data, spacing = vol.data, np.linalg.norm(vol.affine[:3, :3], axis=0)
    for mm in sizes_mm:
        size = [max(2, min(n, round(mm / s))) for n, s in zip(data.shape, spacing)]
        for corner in itertools.product(*(range(0, n - k + 1, k) for n, k in zip(data.shape, size))):
            box = data[tuple(slice(c, c + k) for c, k in zip(corner, size))]
            if NO_AIR_HU < box.min() < 0:
                yield box


@pytest.mark.parametrize("name", REAL_CTS)
def test_real_ct_cropped_inside_the_body_passes(shared_data, name):
    """Boxes of 15 mm too, where a few voxels at a crop's floor were taken for the air of a CT /10: 3885 of the
    8721 boxes of these five scans were refused."""
    boxes = list(interior_boxes(read_image(shared_data / name), (15, 30, 60)))
    assert len(boxes) >= 15
    for box in boxes:
        check_ct(box, name, BODY_HU)
        check_ct(np.pad(box, 4, constant_values=-3024), name, BODY_HU)


def test_real_ct_cropped_inside_the_body_and_divided_by_10_is_refused(shared_data):
    """No air to pile: what gives away crops of fat and soft tissue (a quarter of their voxels at -190..-30 HU,
    under 5% above 200) is their fat at -19..-3 and a tenth of a CT's noise. Before, 36 of the 351 passed."""
    reasons = []
    for name in REAL_CTS:
        for box in interior_boxes(read_image(shared_data / name), (30, 60)):
            if np.mean((box >= -190) & (box <= -30)) >= 0.25 and np.mean(box > 200) < 0.05:
                reasons.append(_refusal(box.astype(np.float32) / 10, name).split(": ", 1)[1])
    assert len(reasons) > 300
    fat = [re.match(r"no voxel below -500 HU \(no air or lung\), (\d+)% of values within -16..-5 as fat \(-100 HU\) "
                    r"divided by 10 would be, ([\d.]+)% below -40 and neighbouring voxels ([\d.]+) HU apart \(a CT's "
                    r"differ by 5 HU or more\): not Hounsfield units \(divided by 10\?\)$", r) for r in reasons]
    fat = [m for m in fat if m]
    assert len(fat) > 300 and all(int(m[1]) > 15 and float(m[2]) < 10 and float(m[3]) < 5 for m in fat)
    piled = [r for r in reasons if "piled at" in r and r.endswith("not Hounsfield units (divided by 10?)")]
    narrow = [r for r in reasons if r.startswith("values span only")]  # all fat: -19..-3
    assert len(fat) + len(piled) + len(narrow) == len(reasons)
