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


def unlabelled_store(tmp_path, count=3, seed=3):
    raw = tmp_path / "raw"
    write_spheres(raw, count, seed=seed)
    rows = "".join(f"s{i:02d},{raw / 'imagesTr' / f's{i:02d}_0000.nii.gz'},,pelvis,train\n" for i in range(count))
    (tmp_path / "cases.csv").write_text("case_id,image,label,site,split\n" + rows)
    out = str(tmp_path / "unlabelled")
    assert prepare_dataset(str(tmp_path / "cases.csv"), out, PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0,
                                                                         crop_body=False), show_progress=False).ok
    return out


def test_pseudo_store_holds_the_scans_with_the_predicted_masks(tmp_path):
    src, other = unlabelled_store(tmp_path / "a"), unlabelled_store(tmp_path / "b", count=2, seed=4)
    records, namesakes = st.read_manifest(src), st.read_manifest(other)  # two datasets, both naming s00, s01
    assert {r["case_id"] for r in namesakes} <= {r["case_id"] for r in records}
    manifest_before = json.dumps(records)
    empty_id = records[1]["case_id"]
    predicted = {}

    def predict(rec, image):  # a soft-tissue band: spheres (60 HU) in, fat (-100) and the slab (200) out
        mask = ((image[..., 0] > 20) & (image[..., 0] < 130)).astype(np.uint8)
        if rec in records and rec["case_id"] == empty_id:
            mask[:] = 0
        predicted[id(rec)] = mask
        return mask

    out = str(tmp_path / "pseudo")
    cases = [(src, r) for r in records] + [(other, r) for r in namesakes]
    kept = write_pseudo_store(out, cases, predict)
    expect = {f"pseudo-0-{r['case_id']}": (src, r) for r in records if r["case_id"] != empty_id}
    expect |= {f"pseudo-1-{r['case_id']}": (other, r) for r in namesakes}
    assert kept == list(expect)
    assert is_complete(out) and not is_complete(src)
    assert read_contract(out) == read_contract(src)
    written = st.read_manifest(out)
    assert sorted(r["case_id"] for r in written) == sorted(kept)
    for rec in written:
        source, source_rec = expect[rec["case_id"]]
        image, label = st.read_case(out, rec)
        source_image, source_label = st.read_case(source, source_rec)
        assert source_label is None
        np.testing.assert_array_equal(image, source_image)
        assert st.open_array(out, rec["image_path"][0]).dtype == st.open_array(source, source_rec
                                                                              ["image_path"][0]).dtype
        np.testing.assert_array_equal(label, predicted[id(source_rec)])
        assert 100 < label.sum() < label.size // 20  # three spheres of radius 2.5-4 voxels, not the background
        assert rec["split"] == "train" and rec["pseudo_label"] is True and rec["labelled"] is True
        assert rec[st.EVERY_CHUNK] is True  # written by create_array: a chunk file lost from it is refused
        assert rec["spacing"] == source_rec["spacing"] and rec["affine"] == source_rec["affine"]
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
    kept = write_pseudo_store(str(out), [(src, r) for r in st.read_manifest(src)], predict, write=False)
    assert kept == ["pseudo-0-" + c for c in calls] and calls == [r["case_id"] for r in st.read_manifest(src)]
    assert not out.exists() and not is_complete(str(out))
