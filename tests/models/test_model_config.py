"""ModelConfig rejects an unknown architecture or size when it is built (a config error)."""

from __future__ import annotations

import pytest

from lnfm.config import ConfigError, from_dict
from lnfm.models.config import SIZE_NAMES, ModelConfig
from lnfm.models.swin import SWIN_SIZES
from lnfm.models.vit import SIZES


def test_size_names_are_the_builders_presets():
    assert SIZE_NAMES == {"vit": tuple(SIZES), "swin": tuple(SWIN_SIZES)}


@pytest.mark.parametrize("data,message", [({"size": "huge9"}, "model.size: 'huge9' is not a vit size (choices: "
                                                                 "tiny, s, b, l, h)"),
                                          ({"arch": "swin", "size": "l"}, "model.size: 'l' is not a swin size"),
                                          ({"arch": "resnet"}, "model.arch: 'resnet' is not one of")])
def test_unknown_arch_or_size_is_a_config_error(data, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(ModelConfig, data, "model")
