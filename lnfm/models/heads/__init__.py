"""Segmentation heads over encoder features: shared blocks, linear probe, light decoder, UNETR decoder,
fine-stride decoder (image skips at strides 1, 2, 4)."""

from lnfm.models.heads.blocks import Stride, as_stride
from lnfm.models.heads.config import HeadConfig
from lnfm.models.heads.fine import FineHead
from lnfm.models.heads.light import LightHead
from lnfm.models.heads.linear import LinearProbe
from lnfm.models.heads.registry import HEADS, build_head, head_flops, head_param_count
from lnfm.models.heads.unetr import UNETRHead

__all__ = ["FineHead", "HEADS", "HeadConfig", "LightHead", "LinearProbe", "Stride", "UNETRHead", "as_stride",
           "build_head", "head_flops", "head_param_count"]
