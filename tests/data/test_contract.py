"""The preprocessing contract prepare records in its store, and the refusal of a rerun that
would mix differently prepared cases into one store."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from lnfm.config import ConfigError, from_dict, to_dict
from lnfm.data import store as st
from lnfm.data.contract import (ContractError, PrepareContract, common_contract, read_contract, require_contract)
from lnfm.cli import run_job
from lnfm.data.prepare import PrepareConfig, prepare_dataset, preprocess_case, read_channels
from lnfm.io import read_image
from raw_cases import nnunet_folder


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_prepare_records_the_resolved_contract(tmp_path):
    raw = nnunet_folder(tmp_path / "raw", n=2, pet=True)
    out = str(tmp_path / "store")
    cfg = PrepareConfig(workers=0, site_preset="pelvis", label_map={1: 1}, body_threshold_hu=-400.0)
    assert prepare_dataset(str(raw), out, cfg, show_progress=False).converted == 2
    on_disk = json.loads((tmp_path / "store" / "contract.json").read_text())
    # Hand-written expectation: the pelvis preset's spacing replaces the unset one; nothing else is guessed.
    assert on_disk == {"version": 2, "spacing": [1.5, 1.5, 1.5], "orientation": "RAS", "crop_body": True,
                       "body_threshold_hu": -400.0, "channels": ["CT", "PET"], "ct_storage": "int16",
                       "label_map": {"1": 1}, "resample_channels": True}
    contract = read_contract(out)
    assert contract.spacing == (1.5, 1.5, 1.5) and contract.channels == ("CT", "PET")
    assert contract.label_map == {1: 1}
    # Every record agrees with the contract it was written under.
    for rec in st.read_manifest(out):
        assert np.allclose(rec["spacing"], contract.spacing) and rec["orientation"] == "RAS"
        assert rec["channels"] == list(contract.channels)


def test_rerun_with_other_settings_is_refused_before_anything_is_written(tmp_path, capsys):
    raw = nnunet_folder(tmp_path / "raw", n=2)
    store = tmp_path / "store"
    base = ["--input", str(raw), "--output", str(store), "--workers", "0", "--salt", "s"]
    assert run_job("prepare", base + ["--spacing", "1.5,1.5,1.5"]) == 0
    before = _tree_digest(store)
    capsys.readouterr()
    assert run_job("prepare", base + ["--spacing", "1.0,1.0,1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(store) in err and "spacing: [1.0, 1.0, 1.0] != [1.5, 1.5, 1.5]" in err
    assert run_job("prepare", base + ["--spacing", "1.5,1.5,1.5", "crop_body=false"]) == 2
    assert "crop_body: False != True" in capsys.readouterr().err
    assert _tree_digest(store) == before
    # The same settings again: nothing to redo, the store stays as it was.
    assert run_job("prepare", base + ["--spacing", "1.5,1.5,1.5"]) == 0
    assert "skipped 2" in capsys.readouterr().out
    assert _tree_digest(store) == before


def test_a_store_with_cases_but_no_contract_is_refused(tmp_path):
    raw = nnunet_folder(tmp_path / "raw", n=1)
    out = str(tmp_path / "store")
    prepare_dataset(str(raw), out, PrepareConfig(workers=0), show_progress=False)
    (tmp_path / "store" / "contract.json").unlink()  # as an older lnfm left it
    with pytest.raises(ContractError, match="records no preprocessing contract"):
        prepare_dataset(str(raw), out, PrepareConfig(workers=0), show_progress=False)
    with pytest.raises(ContractError, match="prepare it again"):
        require_contract(out)


def test_contract_loads_with_config_validation_and_stores_must_agree(tmp_path):
    good = {"version": 1, "spacing": None, "orientation": "RAS", "crop_body": False, "body_threshold_hu": -500,
            "channels": ["CT"], "ct_storage": "int16", "label_map": {}, "resample_channels": True}
    c = from_dict(PrepareContract, good)
    assert c.spacing is None and c.body_threshold_hu == -500.0 and to_dict(c)["channels"] == ["CT"]
    with pytest.raises(ConfigError, match="missing config key 'crop_body'"):
        from_dict(PrepareContract, {k: v for k, v in good.items() if k != "crop_body"})
    with pytest.raises(ConfigError, match="unknown config key 'spacing_mm'"):
        from_dict(PrepareContract, {**good, "spacing_mm": [1, 1, 1]})
    raw = nnunet_folder(tmp_path / "raw", n=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare_dataset(str(raw), a, PrepareConfig(workers=0, spacing=(1.5, 1.5, 1.5)), show_progress=False)
    prepare_dataset(str(raw), b, PrepareConfig(workers=0, spacing=(2.0, 2.0, 2.0)), show_progress=False)
    assert common_contract([a, a]).spacing == (1.5, 1.5, 1.5)
    with pytest.raises(ContractError, match="prepared differently.*spacing"):
        common_contract([a, b])



@pytest.mark.parametrize("field, value, says", [
    ("version", 3, "version 3 is not one this lnfm reads (1 to 2"),  # a newer lnfm's preprocessing
    ("version", 0, "version 0 is not one this lnfm reads"),
    ("ct_storage", "float32", "ct_storage 'float32' is not 'int16'"),  # predict would round what training did not
    ("orientation", "LPS", "orientation 'LPS' is not 'RAS'"),
    ("channels", ["PET", "CT"], "channels ['PET', 'CT'] does not start with 'CT'"),
])
def test_a_store_contract_this_lnfm_cannot_repeat_is_refused(tmp_path, field, value, says):
    raw = nnunet_folder(tmp_path / "raw", n=1)
    out = str(tmp_path / "store")
    prepare_dataset(str(raw), out, PrepareConfig(workers=0), show_progress=False)
    assert require_contract(out).version == 2  # what prepare writes reads back
    path = tmp_path / "store" / "contract.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, field: value}))
    with pytest.raises(ContractError, match=re.escape(f"contract.json: {says}")):
        require_contract(out)

def test_preprocess_case_reproduces_the_stored_arrays(tmp_path):
    """The function predict calls on a raw scan returns exactly what prepare stored (PET included)."""
    raw = nnunet_folder(tmp_path / "raw", n=1, pet=True)
    out = str(tmp_path / "store")
    prepare_dataset(str(raw), out, PrepareConfig(workers=0, spacing=(1.3, 1.1, 2.2)), show_progress=False)
    rec = st.read_manifest(out)[0]
    stored, _ = st.read_case(out, rec)
    image = read_channels(sorted(str(p) for p in (raw / "imagesTr").glob("case000_*")), True)
    assert image.data.shape[-1] == 2 and np.allclose(image.affine, read_image(str(raw / "imagesTr" /
                                                                                 "case000_0000.nii.gz")).affine)
    data, label, geometry = preprocess_case(image, read_contract(out))
    assert label is None and geometry["crop_start"] == rec["crop_start"] and geometry["shape"] == rec["shape"]
    np.testing.assert_array_equal(data, stored)


@pytest.mark.parametrize("window, says", [
    ([-160.0, 240.0], None),
    ([-1024.0, 3071.0], None),
    ([0.0, 1e-30], "is narrower than 1 HU"),  # a threshold, not a window: [0, 1] holds 0 or 1
    ([-3e38, 3e38], "reaches beyond the HU range CT is stored in"),  # overflowed float32 in normalise
    ([240.0, -160.0], "is not a window from a lower to a higher HU value"),
])
def test_hu_window_problem(window, says):
    from lnfm.data.contract import hu_window_problem

    problem = hu_window_problem(window, "w")
    assert problem is None if says is None else problem == f"w {window} {says}" + (
        " (CT numbers are whole HU)" if "narrower" in says else
        " ([-32768, 32767])" if "beyond" in says else "")
