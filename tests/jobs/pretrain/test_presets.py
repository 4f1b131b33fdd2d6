"""The packaged pretraining presets load and carry the literature defaults."""

import pytest

from lnfm.config import ConfigError
from lnfm.jobs.pretrain import load_pretrain_config


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "swin_b"])
def test_large_presets_follow_the_mae_recipe(name):
    cfg = load_pretrain_config(name)
    assert cfg.model.img_size in ((96, 96, 96), (128, 128, 128))
    assert cfg.data.spacing is not None and all(1.0 <= s <= 1.5 for s in cfg.data.spacing)
    assert (cfg.optim.weight_decay, cfg.optim.b2, cfg.optim.lr, cfg.optim.schedule) == (0.05, 0.95, None, "cosine")
    assert cfg.optim.warmup_steps > 0 and cfg.optim.clip_norm > 0 and cfg.model.dtype == "bfloat16"
    if cfg.model.arch == "vit":
        assert cfg.model.mask_ratio == 0.75
    assert cfg.data.hu_window[0] < cfg.data.hu_window[1]


def test_tiny_preset_and_overrides():
    cfg = load_pretrain_config("vit_tiny", ["train.steps=7", "checkpoint.every=3", "data.weights=[2,1]"])
    assert (cfg.train.steps, cfg.checkpoint.every, cfg.data.weights) == (7, 3, (2.0, 1.0))
    assert cfg.model.img_size == (32, 32, 32)
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        load_pretrain_config("vit_tiny", ["train.step=7"])
