"""What a training run records: the stores' contract at the training spacing, and the refusal
of a case stored at another spacing (one line naming the store and --spacing)."""

import json

import pytest

from lnfm.data.contract import ContractError, Normalization, read_preprocessing, write_preprocessing
from lnfm.jobs.preprocessing import check_spacing, training_preprocessing

CONTRACT = {"version": 1, "spacing": None, "orientation": "RAS", "crop_body": True, "body_threshold_hu": -500.0,
            "channels": ["CT"], "ct_storage": "int16", "label_map": {}, "resample_channels": True}


def _store(root, name: str) -> str:
    (root / name).mkdir()
    (root / name / "contract.json").write_text(json.dumps(CONTRACT))
    return str(root / name)


def test_spacing_within_one_percent_passes_and_beyond_is_refused():
    recs = [("s", {"spacing": [0.8, 0.8, 2.5]}), ("s", {"spacing": [0.805, 0.8, 2.52]})]  # 0.6% and 0.8% off
    check_spacing(recs, (0.8, 0.8, 2.5), "--spacing")
    recs.append(("s", {"spacing": [0.8, 0.8, 2.53]}))  # 1.2% off in z
    with pytest.raises(ContractError) as e:
        check_spacing(recs, (0.8, 0.8, 2.5), "--spacing")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("s: 1 of 3 cases") and "[0.8, 0.8, 2.53]" in msg
    assert msg.endswith("prepare the store with --spacing 0.8,0.8,2.5")


def test_training_preprocessing_records_the_training_spacing(tmp_path):
    store = _store(tmp_path, "a")
    prep = training_preprocessing([store], [(store, {"spacing": [1.5, 1.5, 1.5]})], (1.5, 1.5, 1.5),
                                  Normalization((-160.0, 240.0), 10.0), (32, 32, 32))
    assert prep.contract.spacing == (1.5, 1.5, 1.5) and prep.contract.channels == ("CT",)
    write_preprocessing(tmp_path / "preprocessing.json", prep)
    assert read_preprocessing(tmp_path / "preprocessing.json") == prep
    on_disk = json.loads((tmp_path / "preprocessing.json").read_text())
    assert on_disk["normalization"] == {"hu_window": [-160.0, 240.0], "pet_scale": 10.0}
    assert on_disk["contract"] == {**CONTRACT, "spacing": [1.5, 1.5, 1.5]} and on_disk["patch_size"] == [32, 32, 32]
    with pytest.raises(ContractError, match="records no preprocessing contract"):
        training_preprocessing([str(tmp_path / "none")], [], (1.5, 1.5, 1.5), prep.normalization, (32, 32, 32))
