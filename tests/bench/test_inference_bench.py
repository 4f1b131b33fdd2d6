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
