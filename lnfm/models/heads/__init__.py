"""Segmentation heads over encoder features: shared blocks, linear probe, light decoder, UNETR decoder."""

from lnfm.models.heads.blocks import Stride, as_stride
from lnfm.models.heads.light import LightHead
from lnfm.models.heads.linear import LinearProbe
from lnfm.models.heads.registry import HEADS, build_head, head_flops, head_param_count
from lnfm.models.heads.unetr import UNETRHead

__all__ = ["HEADS", "LightHead", "LinearProbe", "Stride", "UNETRHead", "as_stride", "build_head", "head_flops",
           "head_param_count"]
