"""`make demo`'s data split: what pretraining, node paste, finetuning and the test each see."""

from __future__ import annotations

import json

from lnfm.jobs.demo import demo_rows


def _phantoms(folder, names):
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"cases": [{"case": n} for n in names]}))
    return folder


def test_validation_phantoms_are_out_of_the_pools_training_split(tmp_path):
    phantoms = _phantoms(tmp_path / "p", [f"pelvis_{i:03d}" for i in range(6)])
    heldout = _phantoms(tmp_path / "h", ["pelvis_000", "pelvis_001"])
    pool, labelled, test = demo_rows(phantoms, heldout)
    assert [(r[0], r[3]) for r in labelled] == [("p_pelvis_000", "train"), ("p_pelvis_001", "train"),
                                                ("p_pelvis_002", "train"), ("p_pelvis_003", "train"),
                                                ("p_pelvis_004", "val"), ("p_pelvis_005", "val")]
    assert [(r[0], r[3]) for r in pool] == [(r[0], r[3]) for r in labelled]  # the same scans, the same splits
    assert all(r[2] == "" for r in pool) and all(r[2].endswith("labelsTr/" + r[0][2:] + ".nii.gz") for r in labelled)
    assert [(r[0], r[3]) for r in test] == [("h_pelvis_000", "test"), ("h_pelvis_001", "test")]
    assert not {r[1] for r in test} & {r[1] for r in pool}  # no held-out scan reaches pretraining or paste
