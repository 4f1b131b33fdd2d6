"""Model configuration shared by the ViT/MAE and Swin/SimMIM builders."""

from __future__ import annotations

from dataclasses import dataclass

from lnfm.config import ConfigError

# Preset size names per architecture (the dimensions live in lnfm.models.vit.SIZES and
# lnfm.models.swin.SWIN_SIZES; tests/models/test_config.py keeps the lists equal).
SIZE_NAMES = {"vit": ("tiny", "s", "b", "l", "h"), "swin": ("tiny", "s", "b")}
# Compute and parameter dtypes the layers take, and lnfm.models.layers.REMAT_POLICIES's names (the same test keeps
# them equal).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
REMAT_NAMES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclass
class ModelConfig:
    """Backbone and self-supervised head settings (`model:` section)."""

    arch: str = "vit"  # backbone family: "vit" or "swin"
    size: str = "tiny"  # preset size; vit: tiny, s, b, l, h; swin: see lnfm.models.swin
    patch_size: tuple[int, int, int] = (16, 16, 16)  # ViT patch in voxels along (X, Y, Z); anisotropic allowed
    in_channels: int = 1  # input channels (1 for CT, 2 for CT+PET)
    img_size: tuple[int, int, int] = (96, 96, 96)  # training crop (X, Y, Z); sets stored position-embedding grids
    cls_token: bool = False  # prepend a learned class token (no position embedding on it)
    pos_embed: str = "sincos"  # ViT position embedding: "sincos" (fixed, any grid) or "learnable" (interpolated)
    qkv_bias: bool = True  # bias on the packed qkv projection (MONAI's default is False)
    width: int | None = None  # override the preset's embedding width
    depth: int | None = None  # override the preset's number of transformer blocks
    heads: int | None = None  # override the preset's number of attention heads
    mlp_dim: int | None = None  # override the preset's MLP hidden size (default 4 x width)
    dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision)
    param_dtype: str = "float32"  # parameter (master weight) dtype
    remat: str = "none"  # per-block rematerialisation: none, full, dots_saveable, dots_with_no_batch_dims_saveable
    mask_ratio: float = 0.75  # fraction of patches hidden from the MAE/SimMIM encoder
    norm_pix: bool = True  # MAE target: per-patch normalised voxels
    decoder_width: int | None = None  # MAE decoder width (default: 64 for tiny, 512 otherwise)
    decoder_depth: int | None = None  # MAE decoder blocks (default: 1 for tiny, 8 otherwise)
    decoder_heads: int | None = None  # MAE decoder heads (default: 4 for tiny, 16 otherwise)
    decoder_mlp_dim: int | None = None  # MAE decoder MLP hidden size (default 4 x decoder width)
    feature_layers: tuple[int, ...] | None = None  # 1-based blocks whose outputs feed heads (default: 4 evenly spaced)
    window_size: tuple[int, int, int] = (7, 7, 7)  # Swin attention window (tokens)
    swin_patch_size: tuple[int, int, int] = (2, 2, 2)  # Swin patch embedding stride (voxels)

    def __post_init__(self) -> None:
        # Checked here so a bad `model.arch` or `model.size` is a config error when the config
        # loads, not a traceback when the model is first built.
        if self.arch not in SIZE_NAMES:
            raise ConfigError(f"model.arch: '{self.arch}' is not one of {list(SIZE_NAMES)}")
        if self.size not in SIZE_NAMES[self.arch]:
            raise ConfigError(f"model.size: '{self.size}' is not a {self.arch} size (choices: "
                              f"{', '.join(SIZE_NAMES[self.arch])})")
        for name, choices in (("dtype", DTYPE_NAMES), ("param_dtype", DTYPE_NAMES), ("remat", REMAT_NAMES),
                              ("pos_embed", ("sincos", "learnable"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}: '{getattr(self, name)}' is not one of {list(choices)}")
        for name in ("patch_size", "img_size", "window_size", "swin_patch_size", "feature_layers"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ConfigError(f"model.{name} {list(values)} must hold sizes (or block numbers) of at least 1")
        for name in ("in_channels", "width", "depth", "heads", "mlp_dim", "decoder_width", "decoder_depth",
                     "decoder_heads", "decoder_mlp_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {value}")
        if not 0.0 < self.mask_ratio < 1.0:  # NaN fails too
            raise ConfigError(f"model.mask_ratio must be in (0, 1) (the share of patches hidden from the encoder), "
                              f"got {self.mask_ratio:g}")
