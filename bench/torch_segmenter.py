"""LNFM's ViT + fine-head segmenter written in PyTorch, with the weights of an `nnx` Segmenter.

`from_lnfm(segmenter)` returns a `TorchSegmenter` that computes the same function as
`lnfm.models.segmenter.Segmenter` with a ViT encoder and the `fine` head
(`lnfm.models.heads.fine.FineHead`), on channel-first volumes (B, C, X, Y, Z) ->
logits (B, num_classes, X, Y, Z). It is the "same network" arm of
`bench/train_step.py --finetune SITE --same-net`, and `tests/bench/test_torch_segmenter.py`
checks it against JAX (logits and gradients).

Encoder: MONAI's `monai.networks.nets.ViT` computes our ViT block for block (pre-LN
blocks, exact GELU, LayerNorm eps 1e-5, qkv packed (3, heads, head_dim): the weights
come through `lnfm.models.interop.to_monai_vit`, which permutes our head-major qkv),
but its own forward is not ours in three ways, so only its submodules are used:
- MONAI's 3D sin-cos table needs a width divisible by 6 (ViT-tiny has 64); ours pads
  the table with zero features. The table is built as MONAI's 'learnable' parameter,
  holding `encoder.embed.position_table(grid)`, frozen when ours is fixed (sincos);
- `encoder.features` returns the block outputs named by `feature_layers` with the
  *last* one replaced by the final-LayerNorm-ed tokens, as (B, gx, gy, gz, D) grids;
  MONAI's forward returns every raw block output plus the normed tokens;
- with a class token MONAI's forward returns the classification head's output only.
MONAI's attention is its einsum path unless `sdpa=True` (the default), which switches
its `SABlock` to `F.scaled_dot_product_attention` (the same function, PyTorch's fast kernel).

Head: the FineHead's conv path at strides 1, 2, 4 (conv3x3x3 without bias ->
InstanceNorm(affine, eps 1e-5) -> LeakyReLU(0.01); `DownConv3D` = `Conv3d` with
kernel = stride; `UpConv3D` = `ConvTranspose3d` with kernel = stride, tap (i, j, k)
at block offset (i, j, k) as in PyTorch), the 1x1x1 fuse conv + IN + LeakyReLU of the
concatenated deepest features, the decoder blocks (upsample, concatenate the skip,
ConvNormAct; with `top_kernel=1` the full-resolution one is SkipAddNormAct) and the
1x1x1 out conv. Our kernels are (kx, ky, kz, cin, cout) and
transpose to PyTorch's (cout, cin, kx, ky, kz) (ConvTranspose3d: (cin, cout, ...)).
Padding: inputs are zero-padded at the far end to a multiple of the deepest stride
and the logits cropped back, as `Segmenter` does.

`TorchSegmenter.lnfm_params` maps each PyTorch parameter name to the path of the nnx
parameter it was copied from and its layout kind (`torch_layout`): the benchmark trains
the same parameter set with the same per-parameter LR scales and weight decay by it, the
test compares gradients by it. PyTorch parameters without an nnx twin (MONAI's unused
`norm_cross_attn`, a fixed sin-cos table) get requires_grad=False.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from lnfm.models import interop
from lnfm.models.heads.blocks import step_factor
from lnfm.models.heads.fine import FineHead
from lnfm.models.vit import ViT, token_grid

LRELU_SLOPE = 0.01
IN_EPS = 1e-5


def _instance_norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, eps=IN_EPS, affine=True, track_running_stats=False)


class ConvNormAct(nn.Module):
    """conv3x3x3 (no bias, 'SAME') -> instance norm -> LeakyReLU, as `lnfm.models.heads.fine.ConvNormAct`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm = _instance_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), LRELU_SLOPE)


class SkipAddNormAct(nn.Module):
    """x + conv1x1x1(skip) (no bias) -> instance norm -> LeakyReLU, as `lnfm.models.heads.fine.SkipAddNormAct`
    (the full-resolution step of a head with `top_kernel=1`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.skip = nn.Conv3d(channels, channels, 1, bias=False)
        self.norm = _instance_norm(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(x + self.skip(skip)), LRELU_SLOPE)


class TorchFineHead(nn.Module):
    """`FineHead` (ViT features, no deep supervision) on channel-first tensors; module names
    follow the nnx head's attribute paths (path, fuse, fuse_norm, ups, blocks, out)."""

    def __init__(self, levels: Sequence[tuple[int, int, int]], widths: Sequence[int], n_conv: int,
                 fused_channels: int, in_channels: int, num_classes: int, top_kernel: int = 3,
                 convs_per_level: int = 1):
        super().__init__()
        self.levels = [tuple(s) for s in levels]
        self.n_conv = n_conv
        depth = len(self.levels) - 1
        ch = list(widths)
        path: list[nn.Module] = [ConvNormAct(in_channels, ch[0])]
        for lvl in range(1, n_conv):
            f = step_factor(self.levels, lvl)
            path.append(nn.ModuleList([nn.Conv3d(ch[lvl - 1], ch[lvl], f, stride=f),
                                       *[ConvNormAct(ch[lvl], ch[lvl]) for _ in range(convs_per_level)]]))
        self.path = nn.ModuleList(path)
        self.fuse = nn.Conv3d(fused_channels, ch[depth], 1)
        self.fuse_norm = _instance_norm(ch[depth])
        ups = []
        for lvl in range(depth - 1, -1, -1):
            f = step_factor(self.levels, lvl + 1)
            ups.append(nn.ConvTranspose3d(ch[lvl + 1], ch[lvl], f, stride=f))
        self.ups = nn.ModuleList(ups)
        self.blocks = nn.ModuleList([SkipAddNormAct(ch[0]) if lvl == 0 and top_kernel == 1 else
                                     ConvNormAct(2 * ch[lvl] if lvl < n_conv else ch[lvl], ch[lvl])
                                     for lvl in range(depth - 1, -1, -1)])
        extra = convs_per_level - 1
        self.more = nn.ModuleList([nn.ModuleList([ConvNormAct(ch[lvl], ch[lvl]) for _ in range(extra if lvl else 0)])
                                   for lvl in range(depth - 1, -1, -1)]) if extra else None
        self.out = nn.Conv3d(ch[0], num_classes, 1)

    def forward(self, images: torch.Tensor, deepest: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = [self.path[0](images)]
        for down, *blocks in list(self.path)[1:]:
            y = down(skips[-1])
            for block in blocks:
                y = block(y)
            skips.append(y)
        x = F.leaky_relu(self.fuse_norm(self.fuse(torch.cat(list(deepest), dim=1))), LRELU_SLOPE)
        depth = len(self.levels) - 1
        more_blocks = self.more if self.more is not None else [()] * depth
        for up, block, more, lvl in zip(self.ups, self.blocks, more_blocks, range(depth - 1, -1, -1)):
            x = up(x)
            if isinstance(block, SkipAddNormAct):
                x = block(x, skips[0])
                continue
            if lvl < self.n_conv:
                x = torch.cat([x, skips[lvl]], dim=1)
            x = block(x)
            for extra_block in more:
                x = extra_block(x)
        return self.out(x)


class TorchSegmenter(nn.Module):
    """MONAI ViT submodules -> our `encoder.features` -> `TorchFineHead`, with `Segmenter`'s padding and crop.

    Built for one padded input size (`spatial`): the position table is fixed to its token grid."""

    def __init__(self, vit: nn.Module, head: TorchFineHead, *, spatial: tuple[int, int, int],
                 patch: tuple[int, int, int], feature_layers: Sequence[int], deepest: Sequence[int],
                 has_cls: bool):
        super().__init__()
        self.vit = vit
        self.head = head
        self.spatial = tuple(spatial)
        self.patch = tuple(patch)
        self.grid = token_grid(self.spatial, self.patch)
        self.feature_layers = tuple(feature_layers)
        self.deepest = tuple(deepest)
        self.has_cls = has_cls
        # PyTorch parameter name -> (path of the nnx parameter it holds, `torch_layout` kind)
        self.lnfm_params: dict[str, tuple[tuple, str]] = {}

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """`ViT.features`: (B, D, gx, gy, gz) grids of the feature-layer block outputs, the last block's normed."""
        x = self.vit.patch_embedding(images)
        if self.has_cls:
            x = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        depth = len(self.vit.blocks)
        hidden = []
        for i, block in enumerate(self.vit.blocks, start=1):
            x = block(x)
            if i in self.feature_layers:
                hidden.append(x)
        final = self.vit.norm(x)
        out = []
        for layer, h in zip(self.feature_layers, hidden):
            h = final if layer == depth else h
            if self.has_cls:
                h = h[:, 1:]
            out.append(h.transpose(1, 2).reshape(h.shape[0], h.shape[-1], *self.grid))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> logits (B, num_classes, X, Y, Z)."""
        spatial = tuple(images.shape[2:])
        mult = self.head.levels[-1]
        pad = [(-n) % m for n, m in zip(spatial, mult)]
        padded = F.pad(images, (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else images
        if tuple(padded.shape[2:]) != self.spatial:
            raise ValueError(f"built for padded inputs of {self.spatial}, got {tuple(padded.shape[2:])}")
        features = self.features(padded)
        logits = self.head(padded, [features[i] for i in self.deepest])
        return logits[:, :, :spatial[0], :spatial[1], :spatial[2]]


def _head_kind(module: nn.Module, leaf: str) -> str:
    """Layout kind of a head parameter: 'conv' / 'conv_transpose' kernels, 'vec' otherwise."""
    if leaf != "weight" or isinstance(module, nn.InstanceNorm3d):
        return "vec"
    return "conv_transpose" if isinstance(module, nn.ConvTranspose3d) else "conv"


def torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """An nnx parameter (or its gradient) in PyTorch's layout. Kinds are `lnfm.models.interop`'s
    ('conv': (kx, ky, kz, cin, cout) -> (cout, cin, kx, ky, kz), 'linear', 'qkv_linear:H', ...)
    plus 'conv_transpose': (kx, ky, kz, cin, cout) -> ConvTranspose3d's (cin, cout, kx, ky, kz),
    whose tap (i, j, k) fills block offset (i, j, k) as `UpConv3D`'s does."""
    if kind == "conv_transpose":
        return value.transpose(3, 4, 0, 1, 2)
    return interop.to_torch_layout(value, kind)


def _head_path(name: str, module: nn.Module) -> tuple:
    """'path.1.0.weight' (an nn.Conv3d) -> ('head', 'path', 1, 0, 'kernel')."""
    *parts, leaf = name.split(".")
    if leaf == "weight":
        leaf = "scale" if isinstance(module, nn.InstanceNorm3d) else "kernel"
    return ("head", *(int(p) if p.isdigit() else p for p in parts), leaf)


def from_lnfm(segmenter: nnx.Module, spatial: Sequence[int] | None = None, *, sdpa: bool = True
              ) -> TorchSegmenter:
    """A float32 `TorchSegmenter` carrying `segmenter`'s current weights (copies, not views).

    `segmenter` must hold a ViT encoder and a FineHead without deep supervision; `spatial`
    is the input size the module will see (default: the encoder's img_size)."""
    from monai.networks.nets import ViT as MonaiViT

    encoder, head = segmenter.encoder, segmenter.head
    if not isinstance(encoder, ViT):
        raise TypeError(f"only ViT encoders are supported, got {type(encoder).__name__}")
    if not isinstance(head, FineHead):
        raise TypeError(f"only the fine head is supported, got {type(head).__name__}")
    if head.deep_supervision or len(head.proj):
        raise ValueError("deep supervision and shallower-stride feature projections are not supported")
    spatial = tuple(int(n) for n in (spatial or encoder.img_size))
    spatial = tuple(n + (-n) % m for n, m in zip(spatial, segmenter.multiple))
    grid = token_grid(spatial, encoder.patch_size)
    dims = encoder.dims
    params = dict(nnx.to_flat_state(nnx.state(segmenter, nnx.Param)))

    # Encoder: MONAI's ViT modules, our weights through interop (qkv permuted, kernels transposed).
    vit = MonaiViT(in_channels=params[("encoder", "embed", "patch", "proj", "kernel")].shape[3], img_size=spatial,
                   patch_size=encoder.patch_size, hidden_size=dims.width, mlp_dim=dims.mlp_dim,
                   num_layers=dims.depth, num_heads=dims.heads, proj_type="conv", pos_embed_type="learnable",
                   classification=encoder.has_cls, qkv_bias=encoder.blocks[0].attn.qkv.bias is not None)
    if encoder.has_cls:
        del vit.classification_head
    for block in vit.blocks:
        block.attn.use_flash_attention = sdpa
    sd = interop.to_monai_vit(encoder)
    sd["patch_embedding.position_embeddings"] = np.asarray(encoder.embed.position_table(grid), np.float32)[None]
    vit.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
    learnable_pos = encoder.embed.pos_type == "learnable"
    if learnable_pos and tuple(grid) != tuple(encoder.embed.base_grid):
        raise ValueError(f"a learned position table is trained at grid {encoder.embed.base_grid}, not {grid}")
    vit.patch_embedding.position_embeddings.requires_grad_(learnable_pos)

    # Head: same structure and names as the nnx FineHead.
    fused = sum(head.feature_channels[i] for i in head.deepest)
    num_classes = params[("head", "out", "kernel")].shape[-1]
    in_channels = params[("head", "path", 0, "conv", "kernel")].shape[3]
    thead = TorchFineHead(head.levels, head.widths, head.n_conv, fused, in_channels, num_classes, head.top_kernel,
                          head.convs_per_level)
    modules = dict(thead.named_modules())
    head_params = {}
    with torch.no_grad():
        for name, p in thead.named_parameters():
            mod_name, leaf = name.rsplit(".", 1)
            path, kind = _head_path(name, modules[mod_name]), _head_kind(modules[mod_name], leaf)
            value = torch_layout(np.asarray(params[path][...], np.float32), kind)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"head.{name}: shape {value.shape} does not fit {tuple(p.shape)}")
            p.copy_(torch.tensor(value))
            head_params[f"head.{name}"] = (path, kind)

    model = TorchSegmenter(vit, thead, spatial=spatial, patch=encoder.patch_size,
                           feature_layers=encoder.feature_layers, deepest=head.deepest, has_cls=encoder.has_cls)
    pairs = interop.encoder_pairs(interop.encoder_config(encoder), ("encoder",), "norm")
    model.lnfm_params = {f"vit.{key}": (path, kind) for path, key, kind in pairs} | head_params
    for name, p in model.named_parameters():  # MONAI's unused norm_cross_attn, a fixed sin-cos table
        if name not in model.lnfm_params:
            p.requires_grad_(False)
    return model


def dice_ce_loss(loss_cfg) -> nn.Module:
    """MONAI `DiceCELoss` computing `lnfm.segmentation.losses.segmentation_loss` for a 'dice_ce'
    LossConfig on (B, C, X, Y, Z) logits and (B, 1, X, Y, Z) integer labels.

    Our soft Dice is (TP + s) / (TP + FP/2 + FN/2 + s) = (2 TP + 2s) / (|P| + |G| + 2s);
    MONAI's is (2 TP + s_nr) / (|P| + |G| + s_dr): s_nr = s_dr = 2s makes them equal."""
    from monai.losses import DiceCELoss

    if loss_cfg.name != "dice_ce":
        raise ValueError(f"only the dice_ce loss has a PyTorch twin here, got '{loss_cfg.name}'")
    s = 2.0 * loss_cfg.smooth
    return DiceCELoss(include_background=loss_cfg.include_background, to_onehot_y=True, softmax=True,
                      smooth_nr=s, smooth_dr=s, batch=loss_cfg.batch_dice, lambda_dice=loss_cfg.dice_weight,
                      lambda_ce=loss_cfg.ce_weight)


def channels_first(images: np.ndarray) -> torch.Tensor:
    """(B, X, Y, Z, C) array -> (B, C, X, Y, Z) float32 tensor (a copy)."""
    return torch.tensor(np.ascontiguousarray(np.moveaxis(np.asarray(images, np.float32), -1, 1)))


def label_tensor(labels: np.ndarray) -> torch.Tensor:
    """(B, X, Y, Z) integer labels -> (B, 1, X, Y, Z) int64 tensor."""
    return torch.tensor(np.asarray(labels, np.int64)[:, None])
