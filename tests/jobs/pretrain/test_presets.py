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


def test_label_only_loader_keys_are_refused_and_a_run_s_own_config_loads(tmp_path):
    """Pretraining draws unlabelled patches: a label-only loader key would be recorded and never read. An
    override is refused whatever its value; a config file's value other than the default is refused; a run's
    own config.yaml (every key at its default) loads."""
    from lnfm.config import dump_yaml

    with pytest.raises(ConfigError, match=r"^data.fg_fraction, data.paste_p: the loader reads them only for "):
        load_pretrain_config("vit_tiny", ["data.fg_fraction=0.6", "data.paste_p=0.5"])  # 0.5 is the default
    own = tmp_path / "config.yaml"
    own.write_text(dump_yaml(load_pretrain_config("vit_tiny", ["train.steps=7"])))
    assert load_pretrain_config(str(own)).train.steps == 7
    own.write_text(own.read_text().replace("paste_zoom: 0.0", "paste_zoom: 0.25"))
    with pytest.raises(ConfigError, match=r"^data.paste_zoom: the loader reads it only for labelled patches"):
        load_pretrain_config(str(own))


def test_a_model_or_optim_key_the_arch_or_schedule_never_reads_is_refused(tmp_path):
    """model.patch_size is the ViT's (Swin's is model.swin_patch_size) and optim.min_lr_ratio is the cosine's: an
    override of one the run would not read is refused whatever its value; a run's own config.yaml (every key,
    patch_size at its default) loads, and a value other than the default in it is refused."""
    from lnfm.config import dump_yaml

    with pytest.raises(ConfigError, match=r"^model.patch_size: read only by the ViT backbone \(Swin's is "
                                          r"model.swin_patch_size\), and model.arch is swin \(the run would record a "
                                          r"value it never uses\); drop it$"):
        load_pretrain_config("swin_b", ["model.patch_size=[16,16,16]"])  # the default
    with pytest.raises(ConfigError, match=r"^optim.min_lr_ratio: read only with optim.schedule=cosine, and "
                                          r"optim.schedule is constant"):
        load_pretrain_config("vit_tiny", ["optim.schedule=constant", "optim.min_lr_ratio=0.0"])
    own = tmp_path / "config.yaml"
    own.write_text(dump_yaml(load_pretrain_config("swin_b", ["train.steps=7", "optim.schedule=constant"])))
    assert load_pretrain_config(str(own)).train.steps == 7
    own.write_text(own.read_text().replace("\n  patch_size: [16, 16, 16]", "\n  patch_size: [8, 8, 8]"))
    with pytest.raises(ConfigError, match=rf"^{own}: model.patch_size: read only by the ViT backbone"):
        load_pretrain_config(str(own))


def test_rot90_with_a_patch_whose_in_plane_sides_differ_is_refused():
    """The loader turns only a patch with equal in-plane sides (flip_rot90): data.rot90 the user set over another
    patch was recorded and never read. A preset's (vit_b sets rot90: true) is not the user's."""
    with pytest.raises(ConfigError, match=r"^data.rot90: read only for a patch with equal in-plane sides, and "
                                          r"model.img_size is \[32, 16, 32\] \(the run would record a value it "
                                          r"never uses\); drop it$"):
        load_pretrain_config("vit_tiny", ["model.img_size=[32,16,32]", "data.rot90=false"])
    assert load_pretrain_config("vit_b", ["model.img_size=[96,48,96]"]).data.rot90
    assert not load_pretrain_config("vit_tiny", ["model.img_size=[32,32,16]", "data.rot90=false"]).data.rot90
