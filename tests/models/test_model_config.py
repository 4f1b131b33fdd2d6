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
