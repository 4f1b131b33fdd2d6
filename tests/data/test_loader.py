"""Loader: exact resume, foreground oversampling, padding, per-process shards, mixing."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from raw_cases import affine_lps, phantom, save, write_csv

from lnfm.data.loader import LoaderConfig, make_loader, normalize, read_box
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.store import open_array

PATCH = (16, 16, 16)
PLAIN = LoaderConfig(patch_size=PATCH, batch_size=4, flips=False, rot90=False, intensity_scale=0.0,
                     intensity_shift=0.0, hu_window=(-1000.0, 1000.0))


def _store(root: Path, shapes, body_hu=None, node=2, **prepare) -> str:
    """Cases with a body (noisy ~40 HU, or exactly `body_hu`) and one 70 HU node of label 1 (`prepare`: more
    PrepareConfig settings)."""
    rows = []
    for i, shape in enumerate(shapes):
        c = [s // 2 for s in shape]
        img, lab = phantom(shape=shape, nodes=((c[0], c[1], c[2], node),), seed=i)
        if body_hu is not None:
            img[(img > -500) & (lab == 0)] = body_hu
        aff = affine_lps(spacing=(1.0, 1.0, 1.0))
        rows.append({"case_id": f"c{i}", "image": save(root / f"i{i}.nii.gz", img, aff),
                     "label": save(root / f"l{i}.nii.gz", lab, aff), "split": "train"})
    csv_path = write_csv(root / "cases.csv", rows)
    res = prepare_dataset(str(csv_path), str(root / "store"),
                          PrepareConfig(workers=0, crop_body=False, salt="t", **prepare),
                          show_progress=False)
    assert res.ok, res.failures
    return str(root / "store")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> str:
    """Two 48^3 cases with one 3^3 node each: a random 16^3 patch rarely holds the node."""
    return _store(tmp_path_factory.mktemp("big"), [(48, 48, 48), (48, 40, 44)], node=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_normalize_window_and_pet_scale():
    cfg = LoaderConfig(hu_window=(-100.0, 300.0), pet_scale=5.0)
    x = np.array([[-1000.0, 2.0], [100.0, 10.0], [500.0, 0.0]], np.float32)
    np.testing.assert_allclose(normalize(x, cfg), [[0.0, 0.4], [0.5, 2.0], [1.0, 0.0]])


def test_restored_iterator_yields_identical_batches(big_store):
    cfg = dataclasses.replace(LoaderConfig(patch_size=PATCH, batch_size=3), rotate_deg=15.0, scale=0.1)
    it = iter(make_loader([big_store], cfg, labels=True, shard_index=0, shard_count=1))
    _take(it, 2)
    state = it.get_state()
    json.loads(state)  # JSON bytes: a training checkpoint can store it as text
    expected = _take(it, 3)
    fresh = iter(make_loader([big_store], cfg, labels=True, shard_index=0, shard_count=1))
    fresh.set_state(state)
    assert _same(_take(fresh, 3), expected)
    unrestored = iter(make_loader([big_store], cfg, labels=True, shard_index=0, shard_count=1))
    assert not _same(_take(unrestored, 3), expected)
    with pytest.raises(ValueError, match="Sampler in checkpoint does not match"):  # another seed is refused
        iter(make_loader([big_store], dataclasses.replace(cfg, seed=1), labels=True, shard_index=0,
                         shard_count=1)).set_state(state)


def test_restore_with_worker_processes(big_store):
    cfg = dataclasses.replace(PLAIN, workers=2, batch_size=2)
    it = iter(make_loader([big_store], cfg, labels=True, shard_index=0, shard_count=1))
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = iter(make_loader([big_store], cfg, labels=True, shard_index=0, shard_count=1))
    fresh.set_state(state)
    assert _same(_take(fresh, 4), expected)


def _fg_share(store, fg_fraction, n_batches=16):
    cfg = dataclasses.replace(PLAIN, fg_fraction=fg_fraction, batch_size=8)
    it = iter(make_loader([store], cfg, labels=True, shard_index=0, shard_count=1))
    labels = np.concatenate([b["label"] for b in _take(it, n_batches)])
    return (labels.reshape(len(labels), -1).max(axis=1) > 0).mean()


def test_foreground_fraction_is_honoured(big_store):
    assert _fg_share(big_store, 1.0) == 1.0
    low = _fg_share(big_store, 0.0)
    assert low < 0.15
    half = _fg_share(big_store, 0.5)
    assert 0.3 < half < 0.8  # 128 draws: 0.5 + background hits, binomial sd 0.045


def test_small_volume_is_padded_by_repeating_its_border(tmp_path):
    """A volume smaller than the patch sits inside it, and the rest repeats its border voxels, image and
    label alike: the padding predict gives a volume thinner than its window (sliding_window_inference)."""
    store = _store(tmp_path, [(10, 8, 6)], node=1)
    it = iter(make_loader([store], dataclasses.replace(PLAIN, fg_fraction=0.0), labels=True, shard_index=0,
                          shard_count=1))
    arr = open_array(store, "cases/c0/image_0000").read().result()
    lab = open_array(store, "cases/c0/label").read().result()
    offsets = list(itertools.product(*(range(p - n + 1) for p, n in zip(PATCH, arr.shape))))
    for batch in _take(it, 3):
        for image, label in zip(batch["image"][..., 0], batch["label"]):
            assert image.shape == PATCH
            matches = [o for o in offsets
                       if np.array_equal(label, np.pad(lab, [(a, p - n - a) for a, p, n in zip(o, PATCH, lab.shape)],
                                                       mode="edge"))
                       and np.allclose(image, normalize(np.pad(arr, [(a, p - n - a) for a, p, n in
                                                                     zip(o, PATCH, arr.shape)], mode="edge")[..., None],
                                                        PLAIN)[..., 0])]
            assert matches  # the patch is the volume at some offset, its border repeated outward
    # read_box itself: a box hanging over two faces keeps the inside and fills or repeats the rest.
    inside = arr[:5, 4:8, 2:6]
    box = read_box(open_array(store, "cases/c0/image_0000"), np.array([-3, 4, 2]), (8, 8, 8), -1000.0)
    np.testing.assert_array_equal(box[3:, :4, :4], inside)
    assert (box[:3] == -1000).all() and (box[:, 4:] == -1000).all()
    box = read_box(open_array(store, "cases/c0/image_0000"), np.array([-3, 4, 2]), (8, 8, 8), -1000.0, edge=True)
    np.testing.assert_array_equal(box, np.pad(inside, [(3, 0), (0, 4), (0, 4)], mode="edge"))
    missed = read_box(open_array(store, "cases/c0/image_0000"), np.array([20, 0, 0]), (4, 4, 4), -7.0, edge=True)
    assert (missed == -7.0).all()  # a box that misses the volume has nothing to repeat


def _patch_hashes(store, shard_index, shard_count, n=6):
    it = iter(make_loader([store], PLAIN, shard_index=shard_index, shard_count=shard_count))
    return [hashlib.sha1(x.tobytes()).hexdigest() for b in _take(it, n) for x in b["image"]]


def test_per_process_shards_are_disjoint(tmp_path):
    # Random HU everywhere, so two patches are equal only if they are the same draw.
    img = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16)
    path = save(tmp_path / "noise.nii.gz", img, affine_lps())
    prepare_dataset(str(write_csv(tmp_path / "c.csv", [{"case_id": "n", "image": path, "split": "train"}])),
                    str(tmp_path / "store"), PrepareConfig(workers=0, crop_body=False, salt="t"), show_progress=False)
    store = str(tmp_path / "store")
    a, b = _patch_hashes(store, 0, 2), _patch_hashes(store, 1, 2)
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert not set(a) & set(b)
    assert _patch_hashes(store, 0, 2) == a  # and each shard is reproducible


def test_augmentations_keep_image_and_label_aligned(big_store):
    # Window 0..100 HU: body (~40 HU) -> ~0.4, node (70 HU) -> 0.7. Every augmentation on.
    cfg = LoaderConfig(patch_size=PATCH, batch_size=8, fg_fraction=1.0, intensity_scale=0.0, intensity_shift=0.0,
                       rotate_deg=20.0, tilt_deg=20.0, scale=0.15, spatial_p=1.0, hu_window=(0.0, 100.0))
    it = iter(make_loader([big_store], cfg, labels=True, shard_index=0, shard_count=1))
    for b in _take(it, 2):
        img, lab = b["image"][..., 0], b["label"]
        assert lab.sum() > 0
        assert (img[lab > 0] > 0.55).mean() > 0.7  # labelled voxels show the node
        assert (img[lab == 0] > 0.55).mean() < 0.05


def test_spatial_p_is_the_share_of_resampled_patches(tmp_path):
    """A body of exactly 40 HU and a 70 HU node: a patch read as stored holds just those two values;
    a rotated and zoomed one (linear interpolation) also holds values between them."""
    store = _store(tmp_path, [(48, 48, 48)], body_hu=40, node=3)

    def resampled(p: float) -> np.ndarray:
        cfg = LoaderConfig(patch_size=PATCH, batch_size=8, fg_fraction=1.0, flips=False, rot90=False,
                           intensity_scale=0.0, intensity_shift=0.0, rotate_deg=20.0, scale=0.15, spatial_p=p,
                           hu_window=(0.0, 100.0))
        images = np.concatenate([b["image"] for b in _take(iter(make_loader([store], cfg, labels=True,
                                                                            shard_index=0, shard_count=1)), 4)])
        return np.array([len(np.unique(x)) > 2 for x in images])

    assert not resampled(0.0).any()
    assert resampled(1.0).all()
    assert 0.2 < resampled(0.5).mean() < 0.8


def test_store_mixing_weights(tmp_path):
    a = _store(tmp_path / "a", [(24, 24, 24)], body_hu=40)
    b = _store(tmp_path / "b", [(24, 24, 24)], body_hu=900)
    for weights, expect_high in (([1.0, 0.0], False), ([0.0, 1.0], True)):
        it = iter(make_loader([a, b], PLAIN, weights=weights, shard_index=0, shard_count=1))
        top = np.concatenate([x["image"].reshape(4, -1).max(axis=1) for x in _take(it, 3)])
        assert np.all(top > 0.9) if expect_high else np.all(top < 0.6)
    it = iter(make_loader([a, b], PLAIN, weights=[1.0, 1.0], shard_index=0, shard_count=1))
    top = np.concatenate([x["image"].reshape(4, -1).max(axis=1) for x in _take(it, 8)])
    assert 0.2 < (top > 0.9).mean() < 0.8
    with pytest.raises(ValueError, match="no cases for split='val'"):
        make_loader([a], PLAIN, split="val", shard_index=0, shard_count=1)


def test_two_hosts_together_see_the_single_process_batches(big_store):
    one = iter(make_loader([big_store], dataclasses.replace(PLAIN, batch_size=4), shard_index=0, shard_count=1))
    hosts = [iter(make_loader([big_store], dataclasses.replace(PLAIN, batch_size=2), shard_index=k, shard_count=2))
             for k in range(2)]
    for _ in range(3):
        whole = next(one)["image"]
        halves = np.concatenate([next(h)["image"] for h in hosts])
        np.testing.assert_array_equal(halves, whole)


def _lookalike_store(root: Path) -> tuple[str, np.ndarray]:
    """One 48^3 case: air around a body of fat (about -100 HU), a 5^3 node of 70 HU (label 1), a 70 HU rod away
    from it (a vessel that looks like a node) and a 70 HU voxel 2 voxels from the node's face; returns the store
    and the rod's mask."""
    img = np.full((48, 48, 48), -1000.0, np.float32)
    img[3:45, 3:45, 3:45] = np.round(np.random.default_rng(0).normal(-100.0, 10.0, (42, 42, 42)))
    lab = np.zeros((48, 48, 48), np.uint8)
    img[22:27, 22:27, 22:27], lab[22:27, 22:27, 22:27] = 70.0, 1
    rod = np.zeros((48, 48, 48), bool)
    rod[10:38, 35:38, 11:14] = True
    img[rod] = 70.0
    img[28, 24, 24] = 70.0  # within 2 voxels of the node: part of its rim, never a look-alike
    aff = affine_lps(spacing=(1.0, 1.0, 1.0))
    row = {"case_id": "c0", "image": save(root / "i0.nii.gz", img, aff), "label": save(root / "l0.nii.gz", lab, aff),
           "split": "train"}
    res = prepare_dataset(str(write_csv(root / "cases.csv", [row])), str(root / "store"),
                          PrepareConfig(workers=0, crop_body=False, salt="t"), show_progress=False)
    assert res.ok, res.failures
    return str(root / "store"), rod


def test_hard_negative_patches_are_centred_on_node_look_alikes_away_from_the_nodes(tmp_path):
    """`hard_negative_fraction` centres that share of the non-node patches on a voxel whose CT value lies within
    the nodes' 10th-90th percentile and which is at least 2 voxels from every node: here only the rod qualifies."""
    from lnfm.data.loader import PatchSampler
    from lnfm.data.store import read_manifest

    store, rod = _lookalike_store(tmp_path)
    rec = read_manifest(store)[0]
    cfg = dataclasses.replace(PLAIN, fg_fraction=0.0, hard_negative_fraction=1.0, batch_size=8)
    found = PatchSampler([store], [[rec]], [1.0], cfg, labels=True)._lookalike_voxels(store, rec)
    shape = tuple(rec["shape"][:3])
    ct = read_box(open_array(store, rec["image_path"][0]), np.zeros(3, int), shape)
    label = read_box(open_array(store, rec["label_path"]), np.zeros(3, int), shape) > 0
    taxicab = ndimage.distance_transform_cdt(~label, metric="taxicab")  # steps to the nearest node voxel
    assert found.size == rod.sum() and np.all(ct.flat[found] == 70.0)  # the rod as stored, each voxel once
    assert taxicab.flat[found].min() > 2 and np.sum((ct == 70.0) & (taxicab <= 2) & ~label) == 1  # the rim voxel

    def centres(fraction):  # the patch centre voxel (patch_start keeps a centre 8 voxels from the border as is)
        it = iter(make_loader([store], dataclasses.replace(cfg, hard_negative_fraction=fraction), labels=True))
        return np.concatenate([b["image"][:, 8, 8, 8, 0] for b in _take(it, 6)])

    look_alike = normalize(np.array([[70.0]]), PLAIN)[0, 0]
    assert np.allclose(centres(1.0), look_alike)  # all 48 patches
    assert np.mean(np.isclose(centres(0.0), look_alike)) < 0.2  # uniform centres: the rod is 1.1 % of the volume
    assert all(not b["label"].any() for b in _take(iter(make_loader([store], cfg, labels=True)), 4))


def test_a_damaged_chunk_file_is_one_line_naming_the_case(tmp_path):
    """A store file damaged on disk (a copy cut short, a file lost) was a TensorStore traceback from inside the
    training loop; the loader and `read_case` now name the store and the case in one line, and what to do."""
    from lnfm.data.store import StoreError, read_case, read_manifest

    store = _store(tmp_path, [(24, 24, 24)])
    chunks = [f for f in (tmp_path / "store" / "cases" / "c0" / "image_0000").rglob("*") if f.is_file()
              and f.name != "zarr.json"]
    assert chunks
    for f in chunks:  # cut short (a missing file: the next test)
        f.write_bytes(b"\0" * 100)
    said = f"^{store}: case c0: a stored array cannot be read .*remove records/c0.json and the folder cases/c0"
    with pytest.raises(StoreError, match=said):
        _take(iter(make_loader([store], PLAIN, shard_index=0, shard_count=1)), 1)
    with pytest.raises(StoreError, match=said):
        read_case(store, read_manifest(store)[0])


def _whole_case_batch(store: str, shape) -> dict:
    cfg = dataclasses.replace(PLAIN, patch_size=shape, batch_size=1)  # every patch is the whole case
    return _take(iter(make_loader([store], cfg, labels=True, shard_index=0, shard_count=1)), 1)[0]


def test_a_missing_chunk_file_is_one_line_naming_the_case(tmp_path):
    """A chunk file missing altogether (a store copied in part, a file deleted) read as zeros: 0 HU patches and
    background labels that training and evaluation used with no word. prepare writes every chunk and marks its
    records so; the loader and `read_case` refuse a missing one in one line, and read an intact store as before."""
    from lnfm.data.store import EVERY_CHUNK, StoreError, read_case, read_manifest

    store = _store(tmp_path, [(40, 40, 40)], chunk=8, shard=16)  # 3 x 3 x 3 shard files per array
    rec = read_manifest(store)[0]
    assert rec[EVERY_CHUNK] is True
    label_files = [f for f in (tmp_path / "store/cases/c0/label/c").rglob("*") if f.is_file()]
    assert len(label_files) == 27  # the background-only ones too, which TensorStore left out before
    image, label = read_case(store, rec)
    assert image.shape == (40, 40, 40, 1) and (image[..., 0] == -1000).any() and label.sum() == 5 ** 3
    batch = _whole_case_batch(store, (40, 40, 40))
    np.testing.assert_array_equal(batch["label"][0], label)
    np.testing.assert_allclose(batch["image"][0], normalize(image, PLAIN))

    (tmp_path / "store/cases/c0/image_0000/c/0/0/0").unlink()  # a corner of air (-1000 HU), read as 0 HU before
    said = (f"^{store}: case c0: a stored array cannot be read \\(NOT_FOUND: cases/c0/image_0000 misses a file: a "
            f"store copied in part, or a file deleted\\); copy the store again, or remove records/c0.json and the "
            f"folder cases/c0, then rerun prepare to convert the case again")
    with pytest.raises(StoreError, match=said):  # grain adds a line of its own under it
        _whole_case_batch(store, (40, 40, 40))
    with pytest.raises(StoreError, match=f"{said}$"):
        read_case(store, rec)


def test_a_store_prepared_before_every_chunk_was_written_reads_as_before_with_a_warning(tmp_path, caplog):
    """A store the former prepare wrote has no chunk file where a chunk holds only the fill value (a label's
    background): its cases are read as before, a missing file as zeros, and the jobs' store check says so."""
    from lnfm.data.store import EVERY_CHUNK, check_stores, read_case, read_manifest

    store = _store(tmp_path, [(40, 40, 40)], chunk=8, shard=16)
    image, label = read_case(store, read_manifest(store)[0])
    for path in [tmp_path / "store/manifest.jsonl", *(tmp_path / "store/records").glob("*.json")]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != EVERY_CHUNK}) + "\n" for r in rows))
    (tmp_path / "store/cases/c0/label/c/0/0/0").unlink()  # background only: the former prepare wrote no file
    rec = read_manifest(store)[0]
    assert EVERY_CHUNK not in rec
    old_image, old_label = read_case(store, rec)
    np.testing.assert_array_equal(old_image, image)
    np.testing.assert_array_equal(old_label, label)
    np.testing.assert_array_equal(_whole_case_batch(store, (40, 40, 40))["label"][0], label)
    with caplog.at_level("WARNING", logger="lnfm.data"):
        assert [len(records) for records in check_stores([store])] == [1]
    assert (f"{store}: 1 of 1 cases were prepared before lnfm stored every chunk: a chunk file missing from them (a "
            f"store copied in part) reads as zeros without a word; prepare into a new store to have such a file "
            f"refused") in caplog.text
