"""Synthetic phantoms: determinism, written grids, node sizes, HU, orientation, PET, every site,
and the held-out variant. Real node shapes depend on the shared data folder, so the whole
module also runs with it hidden (the `shared` marker)."""

import dataclasses
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lnfm.data import synth
from lnfm.data import synth_anatomy as A
from lnfm.data.geometry import axial_diameters
from lnfm.data.synth import (HELDOUT_RANGES, SITES, VARIANTS, SynthConfig, case_seed, generate_case, heldout_config,
                             main, write_dataset)
from lnfm.data.synth_nodes import TEST_POOL_SHARE, mask_pool, real_mask_files

pytestmark = pytest.mark.shared

SMALL = SynthConfig(shape=(64, 64, 32), gallery=False)


def small(**kw) -> SynthConfig:
    return SynthConfig(**{**SMALL.__dict__, **kw})


def _min_width_mm(mask2d: np.ndarray, sx: float, sy: float) -> float:
    """Reference short axis of one axial slice: the smallest caliper width over 180 directions
    of the pixel-corner point set (independent of the project's Feret-based measure)."""
    ij = np.argwhere(mask2d).astype(float)
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    pts = (ij[:, None] + corners[None]).reshape(-1, 2) * [sx, sy]
    t = np.deg2rad(np.arange(0, 180, 0.5))
    proj = pts @ np.stack([np.cos(t), np.sin(t)])
    return float((proj.max(0) - proj.min(0)).min())


def _canonical(arr, affine):
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(arr, ornt)
    return data, affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)


def test_deterministic_by_seed():
    a, b, c = generate_case("pelvis", 7, SMALL), generate_case("pelvis", 7, SMALL), generate_case("pelvis", 8, SMALL)
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine) and a.nodes == b.nodes
    assert a.image.shape != c.image.shape or a.image.tobytes() != c.image.tobytes()


def test_written_dataset_grids_and_prefix_property(tmp_path):
    cfg = small(site="mediastinum", num_cases=3, seed=3, pet=True, stations=True, gallery=True)
    summary = write_dataset(cfg, tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "lymph_node": 1} and meta["numTraining"] == 3 == summary["cases"]
    assert meta["channel_names"] == {"0": "CT", "1": "PET"} and meta["file_ending"] == ".nii.gz"
    for entry in meta["cases"]:
        cid = entry["case"]
        img = nib.load(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz")
        pet = nib.load(tmp_path / "imagesTr" / f"{cid}_0001.nii.gz")
        lab = nib.load(tmp_path / "labelsTr" / f"{cid}.nii.gz")
        st = nib.load(tmp_path / "labelsTr_stations" / f"{cid}.nii.gz")
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert pet.get_data_dtype() == np.float32
        for other in (pet, lab, st):
            assert other.shape == img.shape and np.allclose(other.affine, img.affine)
        lab_a, st_a = np.asarray(lab.dataobj), np.asarray(st.dataobj)
        assert lab_a.any() and np.array_equal(st_a > 0, lab_a > 0)
        names = meta["stations"]["mediastinum"]
        assert {names[str(v)] for v in np.unique(st_a[st_a > 0])} == {n["station"] for n in entry["nodes"]}
        assert (tmp_path / "gallery" / f"{cid}.png").stat().st_size > 1000
    # Case i depends only on (site, seed, i): the written case 2 equals a direct generation.
    direct = generate_case("mediastinum", case_seed(3, 2), cfg)
    written = np.asarray(nib.load(tmp_path / "imagesTr" / "mediastinum_002_0000.nii.gz").dataobj)
    assert np.array_equal(direct.image, written)
    assert not list(tmp_path.rglob(".*tmp*"))


def test_node_short_axis_in_range_and_records_match():
    lo, hi = SMALL.short_axis_mm
    checked = 0
    for i in range(4):
        case = generate_case("abdomen", i, SMALL)
        lab, aff = _canonical(case.label, case.affine)
        sp = np.sqrt((aff[:3, :3] ** 2).sum(0))
        cc, n = ndimage.label(lab)
        assert n == len(case.nodes) >= 1
        recorded = sorted(r["short_axis_mm"] for r in case.nodes)
        measured = []
        for k in range(1, n + 1):
            comp = cc == k
            widths = [_min_width_mm(comp[:, :, z], sp[0], sp[1]) for z in np.flatnonzero(comp.any((0, 1)))]
            measured.append(max(widths))
        measured.sort()
        for m, r in zip(measured, recorded):
            assert lo - 1e-6 <= r <= hi + 1e-6
            assert 0.75 * r - 1e-6 <= m <= r + 1e-6  # min caliper width never exceeds the Feret-perpendicular width
            checked += 1
    assert checked >= 4


def test_hu_of_tissues():
    means: dict[int, list[float]] = {}
    # A wide thin chest slab shows lung; the small neck shows air, bone and muscle.
    for site, seed, shape in (("head_neck", 0, (64, 64, 32)), ("mediastinum", 1, (144, 144, 12)),
                              ("pelvis", 2, (64, 64, 32))):
        case = generate_case(site, seed, small(noise_hu=(10.0, 10.0), shape=shape))
        for t in (A.AIR, A.FAT, A.MUSCLE, A.BONE, A.NODE, A.LUNG):
            # Cortical bone is only a few voxels thick: take all of it; erode the rest past the blur.
            core = case.tissue == t if t == A.BONE else ndimage.binary_erosion(case.tissue == t, iterations=2)
            if core.sum() > 30:
                means.setdefault(t, []).append(float(case.image[core].mean()))
    assert all(-120 <= m <= -80 for m in means[A.FAT]), means[A.FAT]
    assert all(25 <= m <= 80 for m in means[A.MUSCLE]), means[A.MUSCLE]
    assert all(m > 400 for m in means[A.BONE]), means[A.BONE]
    assert all(m < -960 for m in means[A.AIR]), means[A.AIR]
    assert all(-900 <= m <= -780 for m in means[A.LUNG]), means[A.LUNG]


@pytest.mark.parametrize("kw", [{"use_real_shapes": False}, {"real_shape_fraction": 1.0}], ids=["fallback", "real"])
def test_node_hu_with_and_without_real_shapes(kw):
    """Nodes of 8 mm and more read as soft tissue (nominal 40/55 HU, -12..+18 per node) whatever
    their shape source; smaller ones are pulled towards fat by partial volume, as in real CT, so
    a single tiny node says little about the phantom's HU."""
    big = []
    for seed in range(6):
        case = generate_case("pelvis", seed, small(noise_hu=(10.0, 10.0), **kw))
        tissue, aff = _canonical(case.tissue, case.affine)
        image, _ = _canonical(case.image, case.affine)
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
        comps, _ = ndimage.label(tissue == A.NODE)
        for i, box in enumerate(ndimage.find_objects(comps), 1):
            node = comps[box] == i
            if axial_diameters(node, spacing)[0] >= 8:
                big.append(float(image[box][node].mean()))
    assert len(big) >= 3, big
    assert all(-10 <= m <= 90 for m in big), big
    assert 15 <= np.mean(big) <= 75, big


def test_orientations_vary_and_world_centroids_agree():
    codes = set()
    for i in range(8):
        case = generate_case(SITES[i % 5], 100 + i, SMALL)
        codes.add(case.info["orientation"])
        assert abs(np.linalg.det(case.affine[:3, :3])) > 1e-3
        assert "".join(nib.aff2axcodes(case.affine)) == case.info["orientation"]
        zooms = nib.Nifti1Image(case.image, case.affine).header.get_zooms()
        assert np.allclose(sorted(zooms), sorted(case.info["spacing"]), atol=1e-4)
        cc, n = ndimage.label(case.label)
        coms = np.array(ndimage.center_of_mass(case.label, cc, range(1, n + 1)))
        world = coms @ case.affine[:3, :3].T + case.affine[:3, 3]
        for node in case.nodes:
            assert np.min(np.linalg.norm(world - node["centroid_world"], axis=1)) < 0.05
    assert len(codes) >= 3


def test_same_anatomy_in_world_whatever_the_orientation():
    """Two cases that differ only in stored orientation hold the same world-space image."""
    case = generate_case("pelvis", 11, SMALL)
    can, aff = _canonical(case.image, case.affine)
    assert "".join(nib.aff2axcodes(aff)) == "RAS"
    # Sampling the stored array at the world points of the canonical grid gives the canonical array.
    idx = np.array([[0, 0, 0], [5, 9, 3], [63, 10, 31], [20, 40, 7]])
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    src = np.round((world - case.affine[:3, 3]) @ np.linalg.inv(case.affine[:3, :3]).T).astype(int)
    shape_ok = np.all((src >= 0) & (src < case.image.shape), axis=1)
    assert shape_ok.all()
    assert np.array_equal(can[tuple(idx.T)], case.image[tuple(src.T)])


def test_pet_uptake_higher_in_nodes():
    case = generate_case("axilla", 4, small(pet=True))
    body = (case.tissue != A.AIR) & (case.label == 0)
    assert case.pet.dtype == np.float32
    assert case.pet[case.label > 0].mean() > 2 * np.median(case.pet[body])


@pytest.mark.parametrize("site", SITES)
def test_every_site_generates(site):
    case = generate_case(site, 0, SMALL)
    assert case.image.shape in {tuple(np.array((64, 64, 32))[list(p)]) for p in
                                ((0, 1, 2), (1, 0, 2), (2, 0, 1), (0, 2, 1), (1, 2, 0), (2, 1, 0))}
    assert case.label.any() and case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert {n["station"] for n in case.nodes} <= set(case.station_names)


@pytest.mark.parametrize("kw", [{"use_real_shapes": False},
                                {"real_masks_dir": "/nonexistent", "real_shape_fraction": 1.0}])
def test_fallback_shapes_without_real_masks(kw):
    case = generate_case("abdomen", 3, small(nodes_per_case=(6, 6), **kw))
    assert case.nodes and {n["shape"] for n in case.nodes} <= {"ovoid", "lobulated"}


def test_real_shapes_used_when_present(shared_data):
    kinds = {n["shape"] for i in range(3)
             for n in generate_case("mediastinum", i, small(real_shape_fraction=1.0)).nodes}
    assert "real" in kinds


def test_unknown_site_is_one_line_error():
    with pytest.raises(ValueError, match="unknown site 'liver'"):
        generate_case("liver", 0, SMALL)


def test_cli_summary(tmp_path, capsys):
    assert main(["--site", "head_neck", "--num-cases", "2", "--out", str(tmp_path), "--shape", "48,48,24",
                 "--no-gallery"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 cases" in out and "short axis" in out
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["head_neck_000.nii.gz", "head_neck_001.nii.gz"]
    assert not (tmp_path / "gallery").exists()


def test_heldout_variant_differs_in_every_listed_way():
    train = [generate_case("pelvis", i, SMALL) for i in range(4)]
    held = [generate_case("pelvis", i, heldout_config(SMALL)) for i in range(4)]
    lo, hi = HELDOUT_RANGES["spacing_inplane"]
    assert all(0.6 <= c.info["spacing"][0] <= 1.0 for c in train)
    assert all(lo <= c.info["spacing"][0] <= hi for c in held)
    assert {c.info["orientation"] for c in held} <= set(VARIANTS["heldout"].orientations)
    assert not set(VARIANTS["heldout"].orientations) & set(VARIANTS["train"].orientations)
    assert not set(VARIANTS["heldout"].slice_choices) & set(VARIANTS["train"].slice_choices)
    assert all(c.info["noise_hu"] >= 24 for c in held) and all(c.info["noise_hu"] <= 22 for c in train)
    assert all(c.info["hu_scale"] == 1.0 and c.info["hu_offset"] == 0.0 for c in train)
    assert all(c.info["hu_scale"] > 1.0 and c.info["hu_offset"] > 0 for c in held)


def test_heldout_calibration_is_a_linear_map_of_the_uncalibrated_image(monkeypatch):
    """The held-out scanner's HU = scale * HU + offset (rounded, clipped at -1024): recomputed here from
    the same phantom generated with the calibration switched off."""
    cfg = heldout_config(SMALL)
    calibrated = generate_case("pelvis", 2, cfg)
    monkeypatch.setitem(synth.VARIANTS, "heldout",
                        dataclasses.replace(VARIANTS["heldout"], hu_scale=(1.0, 1.0), hu_offset=(0.0, 0.0)))
    raw = generate_case("pelvis", 2, cfg)
    scale, offset = calibrated.info["hu_scale"], calibrated.info["hu_offset"]
    expected = np.clip(np.round(raw.image.astype(np.float64) * scale + offset), -1024, 3071)
    assert np.abs(calibrated.image - expected).max() <= 1  # info rounds scale and offset
    muscle = raw.tissue == A.MUSCLE  # soft tissue (~50 HU) moves up by at least 50 * 0.02 + 6 HU
    assert np.mean(calibrated.image[muscle]) > np.mean(raw.image[muscle]) + 5


def test_distractors_are_unlabelled_soft_tissue_clear_of_nodes():
    for cfg in (SMALL, heldout_config(SMALL)):
        case = generate_case("pelvis", 1, cfg)
        assert case.info["distractors"] >= 1
        vein = case.tissue == A.VEIN
        assert not (vein & (case.label > 0)).any()
        assert float(case.image[ndimage.binary_erosion(vein)].mean()) > -20  # soft tissue, not fat


def test_variant_draws_do_not_move_the_nodes(monkeypatch):
    """Distractors and calibration draw from their own stream: a variant without distractors
    gives the same grid, nodes and labels, only the image differs."""
    a = generate_case("abdomen", 4, SMALL)
    monkeypatch.setitem(synth.VARIANTS, "train", dataclasses.replace(VARIANTS["train"], distractors=(0, 0)))
    b = generate_case("abdomen", 4, SMALL)
    assert a.info["distractors"] >= 1 and b.info["distractors"] == 0
    assert a.nodes == b.nodes and np.array_equal(a.label, b.label) and np.array_equal(a.affine, b.affine)
    assert not np.array_equal(a.image, b.image)


def test_real_mask_pools_are_disjoint_stable_and_sized(tmp_path):
    folder = tmp_path / "NIH_LN_ABD"
    folder.mkdir()
    for i in range(400):
        (folder / f"mask_{i:04d}.zip").write_bytes(b"")
    train = real_mask_files("NIH_LN_ABD", str(tmp_path), "train")
    test = real_mask_files("NIH_LN_ABD", str(tmp_path), "test")
    assert not set(train) & set(test) and len(train) + len(test) == 400
    assert abs(len(test) / 400 - TEST_POOL_SHARE) < 0.06
    assert [mask_pool(p) for p in test] == ["test"] * len(test)  # by file name only: any machine agrees
    with pytest.raises(ValueError, match="unknown mask pool"):
        real_mask_files("NIH_LN_ABD", str(tmp_path), "val")


def test_heldout_cases_use_only_test_pool_masks(shared_data, monkeypatch):
    from lnfm.data import synth_nodes

    used = []
    original = synth_nodes.load_real_mask
    monkeypatch.setattr(synth_nodes, "load_real_mask", lambda p: used.append(p) or original(p))
    for i in range(3):
        generate_case("pelvis", i, heldout_config(SMALL, real_shape_fraction=1.0))
    assert used and all(mask_pool(p) == "test" for p in used)
    used.clear()
    for i in range(3):
        generate_case("pelvis", i, small(real_shape_fraction=1.0))
    assert used and all(mask_pool(p) == "train" for p in used)


def test_a_short_neck_grid_places_nodes_where_a_station_starts_beyond_its_end():
    """Held-out neck phantom 1 of dataset seed 303 on a 96x96x48 grid: level IIA starts at z = 10 mm, above
    the grid's top, so its z range was reversed and numpy refused to draw from it."""
    cfg = heldout_config(SynthConfig(site="head_neck", shape=(96, 96, 48), gallery=False), seed=303)
    case = generate_case("head_neck", case_seed(303, 1), cfg)
    labels, n = ndimage.label(case.label > 0)
    assert n >= 1 and sorted(case.label.shape) == [48, 96, 96]  # the held-out variant may store the axes permuted
    # every node lies inside the grid with the placement's 3-voxel margin
    for box in ndimage.find_objects(labels):
        assert all(s.start >= 3 and s.stop <= size - 3 for s, size in zip(box, case.label.shape))


# ----------------------------------------------------------------------------- --out: a folder synth did not make

TINY = ["--no-gallery", "--no-real-shapes", "--shape", "32,32,16"]


def _synth(capsys, *argv) -> tuple[int, str]:
    """`lnfm synth ARGV` through the CLI's error boundary: (exit code, stderr)."""
    from lnfm.cli import run_job

    capsys.readouterr()
    rc = run_job("synth", [*map(str, argv), *TINY])
    return rc, capsys.readouterr().err


def test_a_users_dataset_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    from tree_helpers import tree_digest

    user = tmp_path / "user"
    (user / "imagesTr").mkdir(parents=True)
    (user / "dataset.json").write_text('{"name": "MY_HOSPITAL_DATASET", "channel_names": {"0": "CT"}}')
    (user / "imagesTr" / "mine_0000.nii.gz").write_bytes(b"a scan")
    before = tree_digest(tmp_path)
    for force in ([], ["--force"]):  # --force replaces synth's own phantoms only
        rc, err = _synth(capsys, "--num-cases", "1", "--out", user, *force)
        assert rc == 2 and err.splitlines() == [
            f"lnfm synth: error: {user}: holds files synth did not make (dataset.json, imagesTr); synth writes only "
            f"into a new or empty folder or one it made: choose another --out"]
        assert tree_digest(tmp_path) == before
    # An empty folder, or one holding only hidden files (.DS_Store), is as good as a new one.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")
    assert _synth(capsys, "--num-cases", "1", "--out", empty)[0] == 0
    assert sorted(p.name for p in (empty / "imagesTr").iterdir()) == ["pelvis_000_0000.nii.gz"]


def test_another_sites_run_into_a_phantom_folder_is_refused_and_force_replaces_it_whole(tmp_path, capsys):
    """pelvis x 3, then axilla x 1 into the same folder: the old code left pelvis_000..002 beside a dataset.json
    listing axilla only, so prepare stored pelvis phantoms as axilla."""
    from tree_helpers import tree_digest

    from lnfm.data.cases import discover

    mix = tmp_path / "mix"
    assert _synth(capsys, "--site", "pelvis", "--num-cases", "3", "--out", mix)[0] == 0
    before = tree_digest(tmp_path)
    rc, err = _synth(capsys, "--site", "axilla", "--num-cases", "1", "--out", mix)
    assert rc == 2 and err.splitlines() == [
        f"lnfm synth: error: {mix}: holds phantoms synth made with other settings (num_cases: 3 there, 1 now; "
        f"site: 'pelvis' there, 'axilla' now); pass --force to replace them, or choose another --out"]
    assert tree_digest(tmp_path) == before
    assert _synth(capsys, "--site", "axilla", "--num-cases", "1", "--out", mix, "--force")[0] == 0
    files = sorted(p.relative_to(mix).as_posix() for p in mix.rglob("*") if p.is_file())
    assert files == [".lnfm-synth.json", "dataset.json", "imagesTr/axilla_000_0000.nii.gz",
                     "labelsTr/axilla_000.nii.gz"]
    # What prepare reads is what was written: the case generated directly from (axilla, seed 0, case 0).
    cases, errors = discover(str(mix))
    assert errors == [] and [(c.case_id, c.site) for c in cases] == [("axilla_000", "axilla")]
    direct = generate_case("axilla", case_seed(0, 0), SynthConfig(shape=(32, 32, 16), use_real_shapes=False))
    assert np.array_equal(np.asarray(nib.load(mix / "imagesTr" / "axilla_000_0000.nii.gz").dataobj), direct.image)


def test_the_same_command_again_reruns_and_finishes_an_interrupted_run(tmp_path, capsys):
    out = tmp_path / "phantoms"
    args = ("--site", "pelvis", "--num-cases", "2", "--pet", "--out", out)
    assert _synth(capsys, *args)[0] == 0
    first = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _synth(capsys, *args)[0] == 0  # README's and `make demo`'s reruns
    # A run killed after its first case: no dataset.json yet, a temporary beside the next file.
    (out / "dataset.json").unlink()
    (out / "labelsTr" / "pelvis_001.nii.gz").unlink()
    (out / "imagesTr" / "pelvis_001_0000.nii.gz").rename(out / "imagesTr" / ".pelvis_001_0000.nii.gz.tmp77.nii.gz")
    assert _synth(capsys, *args)[0] == 0
    again = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert again == first  # complete, byte for byte, and the temporary is gone
    # A folder an earlier synth wrote without the mark file is recognised by its dataset.json.
    (out / ".lnfm-synth.json").unlink()
    assert _synth(capsys, *args)[0] == 0
    assert json.loads((out / ".lnfm-synth.json").read_text())["config"]["num_cases"] == 2


def test_a_stray_file_in_a_phantom_folder_is_refused_even_with_force(tmp_path, capsys):
    from tree_helpers import tree_digest

    out = tmp_path / "phantoms"
    assert _synth(capsys, "--num-cases", "1", "--out", out)[0] == 0
    stray = out / "imagesTr" / "mine_0000.nii.gz"
    stray.write_bytes(b"a user's scan")
    before = tree_digest(tmp_path)
    for argv in (("--num-cases", "1"), ("--num-cases", "2", "--force")):
        rc, err = _synth(capsys, *argv, "--out", out)
        assert rc == 2 and err.splitlines() == [
            f"lnfm synth: error: {stray}: not a file of the phantoms synth recorded in {out} (1 such file(s)); "
            f"prepare would take it for one of them: move it away or choose another --out"]
        assert tree_digest(tmp_path) == before


def test_a_phantom_changed_since_synth_wrote_it_is_neither_rewritten_nor_replaced(tmp_path, capsys):
    """The same command again rewrites every phantom and --force removes them: a label a user corrected,
    or a dataset.json they annotated, is no longer synth's to replace (the mark records each file's digest)."""
    from tree_helpers import tree_digest

    out = tmp_path / "phantoms"
    assert _synth(capsys, "--num-cases", "2", "--out", out)[0] == 0
    recorded = json.loads((out / ".lnfm-synth.json").read_text())["files"]
    assert sorted(recorded) == ["dataset.json", "imagesTr/pelvis_000_0000.nii.gz", "imagesTr/pelvis_001_0000.nii.gz",
                                "labelsTr/pelvis_000.nii.gz", "labelsTr/pelvis_001.nii.gz"]
    assert recorded["labelsTr/pelvis_001.nii.gz"] == hashlib.sha256(
        (out / "labelsTr" / "pelvis_001.nii.gz").read_bytes()).hexdigest()
    for rel in ("labelsTr/pelvis_001.nii.gz", "dataset.json"):
        edited = out / rel
        original = edited.read_bytes()
        edited.write_bytes(original + b" ")  # a user's change
        before = tree_digest(tmp_path)
        for argv, verb in ((("--num-cases", "2"), "rewrite"), (("--num-cases", "3", "--force"), "replace")):
            rc, err = _synth(capsys, *argv, "--out", out)
            assert rc == 2 and err.splitlines() == [
                f"lnfm synth: error: {edited}: changed since synth wrote it, and synth would {verb} it: move it "
                f"away, or choose another --out"], (rel, argv)
            assert tree_digest(tmp_path) == before
        edited.write_bytes(original)
    assert _synth(capsys, "--num-cases", "3", "--out", out, "--force")[0] == 0  # unchanged files are synth's
    assert len(json.loads((out / ".lnfm-synth.json").read_text())["files"]) == 7
