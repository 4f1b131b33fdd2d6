"""Segmentation heads over encoder features: shared blocks, linear probe, light decoder, UNETR decoder,
fine-stride decoder (image skips at strides 1, 2, 4).

Everything but `HeadConfig` is resolved on first use (PEP 562): reading model.json needs the
config, not Flax."""

from __future__ import annotations

import importlib

from lnfm.models.heads.config import HeadConfig

_WHERE = {"Stride": "blocks", "as_stride": "blocks", "FineHead": "fine", "LightHead": "light",
          "LinearProbe": "linear", "UNETRHead": "unetr", "HEADS": "registry", "build_head": "registry",
          "head_flops": "registry", "head_param_count": "registry"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"lnfm.models.heads.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HeadConfig", *_WHERE]
