"""The pseudo-label store: the source scans copied exactly, the predicted masks as labels,
empty predictions left out, the source contract, and nothing written for other hosts."""

import json

import numpy as np
from scipy import ndimage
from sphere_cases import write_spheres

from lnfm.data import store as st
from lnfm.data.contract import read_contract
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.pseudo_labels import is_complete, write_pseudo_store


def unlabelled_store(tmp_path, count=3):
    raw = tmp_path / "raw"
    write_spheres(raw, count, seed=3)
    rows = "".join(f"s{i:02d},{raw / 'imagesTr' / f's{i:02d}_0000.nii.gz'},,pelvis,train\n" for i in range(count))
    (tmp_path / "cases.csv").write_text("case_id,image,label,site,split\n" + rows)
    out = str(tmp_path / "unlabelled")
    assert prepare_dataset(str(tmp_path / "cases.csv"), out, PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0,
                                                                         crop_body=False), show_progress=False).ok
    return out


def test_pseudo_store_holds_the_scans_with_the_predicted_masks(tmp_path):
    src = unlabelled_store(tmp_path)
    records = st.read_manifest(src)
    manifest_before = json.dumps(records)
    empty_id = records[1]["case_id"]
    predicted = {}

    def predict(rec, image):  # a soft-tissue band: spheres (60 HU) in, fat (-100) and the slab (200) out
        mask = ((image[..., 0] > 20) & (image[..., 0] < 130)).astype(np.uint8)
        predicted[rec["case_id"]] = mask if rec["case_id"] != empty_id else np.zeros_like(mask)
        return predicted[rec["case_id"]]

    out = str(tmp_path / "pseudo")
    kept = write_pseudo_store(out, src, records, predict)
    assert kept == ["pseudo-" + r["case_id"] for r in records if r["case_id"] != empty_id]
    assert is_complete(out) and not is_complete(src)
    assert read_contract(out) == read_contract(src)
    by_id = {"pseudo-" + r["case_id"]: r for r in records}
    written = st.read_manifest(out)
    assert [r["case_id"] for r in written] == kept
    for rec in written:
        image, label = st.read_case(out, rec)
        source_image, source_label = st.read_case(src, by_id[rec["case_id"]])
        assert source_label is None
        np.testing.assert_array_equal(image, source_image)
        assert st.open_array(out, rec["image_path"][0]).dtype == st.open_array(src, by_id[rec["case_id"]]
                                                                              ["image_path"][0]).dtype
        np.testing.assert_array_equal(label, predicted[rec["case_id"].removeprefix("pseudo-")])
        assert 100 < label.sum() < label.size // 20  # three spheres of radius 2.5-4 voxels, not the background
        assert rec["split"] == "train" and rec["pseudo_label"] is True and rec["labelled"] is True
        assert rec["spacing"] == by_id[rec["case_id"]]["spacing"] and rec["affine"] == by_id[rec["case_id"]]["affine"]
        n_components = ndimage.label(label, structure=np.ones((3, 3, 3)))[1]
        assert len(rec["nodes"]) == n_components >= 1
    assert json.dumps(st.read_manifest(src)) == manifest_before  # the source is only read


def test_other_hosts_predict_but_write_nothing(tmp_path):
    src = unlabelled_store(tmp_path, count=2)
    calls = []

    def predict(rec, image):
        calls.append(rec["case_id"])
        return (image[..., 0] > 20).astype(np.uint8)

    out = tmp_path / "pseudo"
    kept = write_pseudo_store(str(out), src, st.read_manifest(src), predict, write=False)
    assert kept == ["pseudo-" + c for c in calls] and calls == [r["case_id"] for r in st.read_manifest(src)]
    assert not out.exists() and not is_complete(str(out))
