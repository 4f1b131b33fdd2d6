"""lnfm.data.benchmark: the phantom sets are disjoint, and the target pool is the held-out variant
without labels, never a test phantom."""

import json

import nibabel as nib
import numpy as np

from lnfm.data import benchmark as B
from lnfm.data import store as st


def _spec(target: int) -> B.BenchmarkSpec:
    return B.BenchmarkSpec(unlabelled=1, labelled=1, val=1, test=1, target=target, shape=(40, 40, 24))


def test_the_target_pool_is_unlabelled_held_out_variant_phantoms_apart_from_the_test_set(tmp_path):
    bench = B.build(_spec(target=2), tmp_path)
    assert bench.target_store == tmp_path / "store_target"
    rows = st.read_manifest(str(bench.target_store))
    assert len(rows) == 2 and all(r["case_id"].startswith("v_") for r in rows)
    assert not any(r["labelled"] or r["label_path"] for r in rows), "the target pool must hold no label"
    assert {r["split"] for r in rows} == {"train"}

    target = json.loads((tmp_path / "phantoms_target" / "dataset.json").read_text())
    test = json.loads((tmp_path / "phantoms_heldout" / "dataset.json").read_text())
    assert target["config"]["variant"] == test["config"]["variant"] == "heldout"
    assert target["seed"] == B.SEEDS["target"] != test["seed"]
    # Different seeds, different scans: no test phantom reappears in the pool.
    test_img = nib.load(bench.test[0].image).get_fdata()
    for c in target["cases"]:
        img = nib.load(tmp_path / "phantoms_target" / "imagesTr" / f"{c['case']}_0000.nii.gz").get_fdata()
        assert img.shape != test_img.shape or not np.array_equal(img, test_img)


def test_no_target_pool_unless_asked(tmp_path):
    bench = B.build(_spec(target=0), tmp_path)
    assert bench.target_store is None
    assert not (tmp_path / "phantoms_target").exists() and not (tmp_path / "store_target").exists()


def test_the_prepare_csvs_name_the_phantoms_relative_to_their_folder(tmp_path, monkeypatch):
    """The CSVs named every phantom by its absolute path: a benchmark folder moved (or copied to another host)
    prepared from files that were no longer there. prepare reads a CSV's relative paths from the CSV's folder."""
    import csv
    import shutil

    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    B.build(_spec(target=0), tmp_path / "bench")
    moved = shutil.move(tmp_path / "bench", tmp_path / "moved")
    for name in ("unlabelled.csv", "labelled.csv"):
        with open(moved / name, newline="") as f:
            rows = list(csv.DictReader(f))
        named = [r[k] for r in rows for k in ("image", "label") if r[k]]
        assert named and all(not p.startswith("/") and (moved / p).is_file() for p in named), named
    monkeypatch.chdir(tmp_path)  # another working directory: the paths are the CSV folder's, not the cwd's
    result = prepare_dataset(str(moved / "labelled.csv"), str(tmp_path / "again"), PrepareConfig(workers=0),
                             show_progress=False)
    assert result.ok and result.converted == len(rows)
