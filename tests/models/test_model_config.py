"""ModelConfig rejects an unknown architecture or size when it is built (a config error)."""

from __future__ import annotations

import pytest

from lnfm.config import ConfigError, from_dict
from lnfm.models.config import REMAT_NAMES, SIZE_NAMES, ModelConfig
from lnfm.models.layers import REMAT_POLICIES
from lnfm.models.swin import SWIN_SIZES
from lnfm.models.vit import SIZES


def test_size_names_are_the_builders_presets():
    assert SIZE_NAMES == {"vit": tuple(SIZES), "swin": tuple(SWIN_SIZES)}
    assert REMAT_NAMES == tuple(REMAT_POLICIES)


@pytest.mark.parametrize("data,message", [({"size": "huge9"}, "model.size: 'huge9' is not a vit size (choices: "
                                                                 "tiny, s, b, l, h)"),
                                          ({"arch": "swin", "size": "l"}, "model.size: 'l' is not a swin size"),
                                          ({"arch": "resnet"}, "model.arch: 'resnet' is not one of")])
def test_unknown_arch_or_size_is_a_config_error(data, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(ModelConfig, data, "model")


@pytest.mark.parametrize("data,message", [({"dtype": "float17"}, "model.dtype: 'float17' is not one of"),
                                          ({"remat": "some"}, "model.remat: 'some' is not one of"),
                                          ({"width": 0}, "model.width must be at least 1, got 0"),
                                          ({"patch_size": [0, 8, 8]}, "model.patch_size [0, 8, 8] must hold"),
                                          ({"mask_ratio": 1.0}, "model.mask_ratio must be in (0, 1)"),
                                          ({"mask_ratio": float("nan")}, "model.mask_ratio must be in (0, 1)")])
def test_values_no_model_can_have_are_config_errors(data, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        from_dict(ModelConfig, data, "model")


@pytest.mark.parametrize("data,message", [
    ({"width": 66}, "model.width 66 is not divisible by model.heads 4"),
    ({"depth": 2, "feature_layers": [2, 3]}, "model.feature_layers [2, 3]: block(s) [3] beyond the 2 blocks"),
    ({"decoder_heads": 5}, "model.decoder_width 64 is not divisible by model.decoder_heads 5"),
    ({"arch": "swin", "width": 20}, "model.width 20 is not divisible by Swin stage 1's heads 3"),
    ({"depth": 2, "feature_layers": [1, 2], "width": 48, "heads": 6}, None),
    ({"arch": "swin", "width": 24}, None)])
def test_check_model_refuses_what_the_builders_cannot_build(data, message):
    """`check_model` (both training jobs, before anything is written) refuses exactly the values the SSL
    builder fails on, naming the key."""
    from flax import nnx

    from lnfm.models.build import build_ssl_model, check_model

    cfg = from_dict(ModelConfig, {"img_size": [32, 32, 32], "patch_size": [8, 8, 8], **data}, "model")
    if message is None:
        check_model(cfg)
        nnx.eval_shape(lambda: build_ssl_model(cfg, nnx.Rngs(0)))
        return
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        check_model(cfg)
    with pytest.raises(ValueError):
        nnx.eval_shape(lambda: build_ssl_model(cfg, nnx.Rngs(0)))


@pytest.mark.parametrize("arch,data,unread", [
    ("swin", {"depth": 6}, "model.depth"),
    ("swin", {"feature_layers": [2, 4], "decoder_width": 32}, "model.decoder_width, model.feature_layers"),
    ("vit", {"window_size": [4, 4, 4]}, "model.window_size"),
])
def test_check_model_refuses_a_key_only_the_other_backbone_reads(arch, data, unread):
    """The Swin encoder reads no ViT depth, heads, MAE decoder or feature blocks (and the ViT no Swin window): such a
    value was recorded in config.yaml and never used. The defaults, which every run's config.yaml records, pass."""
    from lnfm.models.build import check_model

    check_model(from_dict(ModelConfig, {"arch": arch, "img_size": [32, 32, 32]}, "model"))
    with pytest.raises(ConfigError, match=f"^{unread}: only the (Swin|ViT) backbone reads this"):
        check_model(from_dict(ModelConfig, {"arch": arch, "img_size": [32, 32, 32], **data}, "model"))
