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
