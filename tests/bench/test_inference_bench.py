"""bench/inference.py's `--heads` entries become the finetuning config a user would write."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from inference import head_overrides  # noqa: E402

from lnfm.jobs.finetune import load_finetune_config  # noqa: E402
from lnfm.models.heads.config import HeadConfig  # noqa: E402


def test_a_heads_entry_sets_the_kind_and_its_options():
    assert head_overrides("") == []
    assert head_overrides("fine") == ["head.kind=fine"]
    cfg = load_finetune_config("pelvis", head_overrides("unetr:feature_size=8;num_aux=1"))
    assert cfg.head.kind == "unetr" and cfg.head.options == {"feature_size": 8, "num_aux": 1}
    assert load_finetune_config("head_neck", head_overrides("unetr")).head == HeadConfig(kind="unetr")


def test_the_siemens_ct_keeps_the_scanner_plane_and_resamples_its_slices(shared_data, tmp_path):
    """`write_ct(..., "siemens")`: the series' own 512 x 512 grid at 0.977 mm, its 20 slices zoomed to the
    asked count at the asked thickness; the end slices are the series' own (corner-aligned zoom)."""
    import nibabel as nib
    import numpy as np
    import pytest

    from inference import SIEMENS, write_ct
    from lnfm.io import read_image

    if not (REPO.parent / SIEMENS).is_dir():
        pytest.skip("bench/inference.py reads ../shared/data next to the repository")
    shape, spacing = write_ct(tmp_path / "ct.nii.gz", (512, 512, 30), (0.8, 0.8, 1.5), "siemens")
    assert shape == (512, 512, 30) and spacing == pytest.approx((0.9765625, 0.9765625, 1.5))
    img = nib.load(tmp_path / "ct.nii.gz")
    assert img.shape == shape and img.header.get_zooms() == pytest.approx(spacing)
    src = np.asarray(read_image(shared_data / "ct/totalsegmentator/example_ct_dicom").data, np.float32)
    src = src[..., 0] if src.ndim == 4 else src
    out = np.asarray(img.dataobj)
    np.testing.assert_array_equal(out[..., 0], np.round(src[..., 0]))
    np.testing.assert_array_equal(out[..., -1], np.round(src[..., -1]))
