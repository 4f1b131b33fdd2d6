"""Weight exchange with MONAI's ViT, UNETR(...).vit and MaskedAutoEncoderViT (PyTorch state dicts).

Import accepts a state dict of torch tensors or numpy arrays; export returns
numpy arrays keyed by MONAI names (no torch needed), ready for
`torch_module.load_state_dict({k: torch.from_numpy(v) ...})`.

Layout notes: MONAI's Linear weights are (out, in) (ours (in, out)); its conv
kernel is (out, C, kx, ky, kz) (ours (kx, ky, kz, C, out)); it packs qkv as
(3, heads, head_dim) along the output axis, ours is head-major (heads, 3, head_dim)
so tensor parallelism splits whole heads; its cls token carries no
position embedding; the MAE keeps its final norms as the last entry of
`blocks` / `decoder_blocks`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from lnfm.errors import WeightsMismatch
from lnfm.models.config import ModelConfig
from lnfm.models.layers import sincos_3d
from lnfm.models.mae import MAE, decoder_dims
from lnfm.models.vit import ViT, token_grid, vit_dims

# MONAI parameters with no counterpart here: the cross-attention LayerNorm every
# TransformerBlock holds (unused by ViT/MAE) and an optional classifier head.
_IGNORED = ("norm_cross_attn.", "classification_head.")
_SINCOS_ATOL = 1e-4


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def _block_pairs(ours: tuple, theirs: str, qkv_bias: bool, heads: int) -> list[tuple[tuple, str, str]]:
    pairs = [(ours + ("norm1", "scale"), f"{theirs}.norm1.weight", "vec"),
             (ours + ("norm1", "bias"), f"{theirs}.norm1.bias", "vec"),
             (ours + ("attn", "qkv", "kernel"), f"{theirs}.attn.qkv.weight", f"qkv_linear:{heads}"),
             (ours + ("attn", "proj", "kernel"), f"{theirs}.attn.out_proj.weight", "linear"),
             (ours + ("attn", "proj", "bias"), f"{theirs}.attn.out_proj.bias", "vec"),
             (ours + ("norm2", "scale"), f"{theirs}.norm2.weight", "vec"),
             (ours + ("norm2", "bias"), f"{theirs}.norm2.bias", "vec"),
             (ours + ("mlp", "fc1", "kernel"), f"{theirs}.mlp.linear1.weight", "linear"),
             (ours + ("mlp", "fc1", "bias"), f"{theirs}.mlp.linear1.bias", "vec"),
             (ours + ("mlp", "fc2", "kernel"), f"{theirs}.mlp.linear2.weight", "linear"),
             (ours + ("mlp", "fc2", "bias"), f"{theirs}.mlp.linear2.bias", "vec")]
    if qkv_bias:
        pairs.append((ours + ("attn", "qkv", "bias"), f"{theirs}.attn.qkv.bias", f"qkv_vec:{heads}"))
    return pairs


def encoder_pairs(cfg: ModelConfig, ours: tuple, final_norm: str) -> list[tuple[tuple, str, str]]:
    """(our parameter path under `ours`, MONAI state-dict key, layout kind for `to_torch_layout`)
    for every encoder parameter; `final_norm` names MONAI's final LayerNorm."""
    depth, heads = vit_dims(cfg).depth, vit_dims(cfg).heads
    pairs = [(ours + ("embed", "patch", "proj", "kernel"), "patch_embedding.patch_embeddings.weight", "conv"),
             (ours + ("embed", "patch", "proj", "bias"), "patch_embedding.patch_embeddings.bias", "vec")]
    if cfg.pos_embed == "learnable":
        pairs.append((ours + ("embed", "pos_table"), "patch_embedding.position_embeddings", "table"))
    if cfg.cls_token:
        pairs.append((ours + ("embed", "cls_token"), "cls_token", "vec"))
    for i in range(depth):
        pairs += _block_pairs(ours + ("blocks", i), f"blocks.{i}", cfg.qkv_bias, heads)
    pairs += [(ours + ("norm", "scale"), f"{final_norm}.weight", "vec"),
              (ours + ("norm", "bias"), f"{final_norm}.bias", "vec")]
    return pairs


def _mae_pairs(cfg: ModelConfig) -> list[tuple[tuple, str, str]]:
    depth = vit_dims(cfg).depth
    _, dec_depth, dec_heads, _ = decoder_dims(cfg)
    pairs = encoder_pairs(cfg, ("encoder",), f"blocks.{depth}")
    pairs += [(("decoder_embed", "kernel"), "decoder_embed.weight", "linear"),
              (("decoder_embed", "bias"), "decoder_embed.bias", "vec"),
              (("mask_token",), "mask_tokens", "vec"),
              (("decoder_norm", "scale"), f"decoder_blocks.{dec_depth}.weight", "vec"),
              (("decoder_norm", "bias"), f"decoder_blocks.{dec_depth}.bias", "vec"),
              (("decoder_pred", "kernel"), "decoder_pred.weight", "linear"),
              (("decoder_pred", "bias"), "decoder_pred.bias", "vec")]
    for i in range(dec_depth):
        pairs += _block_pairs(("decoder_blocks", i), f"decoder_blocks.{i}", cfg.qkv_bias, dec_heads)
    return pairs


def _swap_qkv_heads(value: np.ndarray, a: int, b: int) -> np.ndarray:
    """Permute the packed qkv axis (the last) from an (a, b, head_dim) to a (b, a, head_dim) layout."""
    lead = value.shape[:-1]
    return value.reshape(*lead, a, b, -1).swapaxes(-3, -2).reshape(*lead, -1)


def _from_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind.startswith("qkv_"):  # MONAI (3, heads, hd) -> ours (heads, 3, hd)
        base, heads = kind.split(":")
        value = value.T if base == "qkv_linear" else value
        return _swap_qkv_heads(value, 3, int(heads))
    if kind == "linear":
        return value.T
    if kind == "conv":
        return value.transpose(2, 3, 4, 1, 0)
    if kind == "table":
        return value[0]
    return value


def to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """One of our arrays in MONAI's layout; `kind` is `encoder_pairs`' third field."""
    if kind.startswith("qkv_"):  # ours (heads, 3, hd) -> MONAI (3, heads, hd)
        base, heads = kind.split(":")
        value = _swap_qkv_heads(value, int(heads), 3)
        return value.T if base == "qkv_linear" else value
    if kind == "linear":
        return value.T
    if kind == "conv":
        return value.transpose(4, 3, 0, 1, 2)
    if kind == "table":
        return value[None]
    return value


def _strip_prefix(state_dict: dict, prefix: str | None) -> dict:
    if prefix is None:
        prefix = "vit." if "vit.patch_embedding.patch_embeddings.weight" in state_dict else ""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _check_sincos(sd: dict, key: str, grid: tuple, width: int, cfg_hint: str) -> None:
    if key not in sd:
        return
    table = _to_numpy(sd[key])[0]
    ours = sincos_3d(grid, width)
    if table.shape != ours.shape or not np.allclose(table, ours, atol=_SINCOS_ATOL):
        raise WeightsMismatch(f"MONAI state dict: '{key}' is not the fixed sin-cos table for grid {grid}; {cfg_hint}")


def _load(model: nnx.Module, sd: dict, pairs: list, handled: set) -> nnx.Module:
    state = nnx.state(model, nnx.Param)
    flat = dict(state.flat_state())
    used = set(handled)
    for path, key, kind in pairs:
        if key not in sd:
            raise WeightsMismatch(f"MONAI state dict: missing '{key}' (check the config: depth, cls_token, qkv_bias, "
                             f"pos_embed)")
        value = _from_torch_layout(_to_numpy(sd[key]), kind)
        var = flat[path]
        if value.shape != var.shape:
            raise WeightsMismatch(f"MONAI state dict: '{key}' has shape {tuple(_to_numpy(sd[key]).shape)}, the config "
                             f"expects {tuple(to_torch_layout(np.zeros(var.shape), kind).shape)}")
        var.set_value(np.asarray(value, dtype=var.dtype))
        used.add(key)
    extra = sorted(k for k in sd if k not in used and not any(tag in k for tag in _IGNORED))
    if extra:
        raise WeightsMismatch(f"MONAI state dict: {len(extra)} unexpected keys, e.g. '{extra[0]}' "
                         f"(check the config: depth, cls_token, qkv_bias, pos_embed)")
    nnx.update(model, state)
    return model


def _export(model: nnx.Module, pairs: list) -> dict[str, np.ndarray]:
    flat = dict(nnx.state(model, nnx.Param).flat_state())
    return {key: np.asarray(to_torch_layout(np.asarray(flat[path][...], np.float32), kind))
            for path, key, kind in pairs}


def _norm_cross_attn(out: dict, prefix: str, depth: int, width: int) -> None:
    for i in range(depth):
        out[f"{prefix}.{i}.norm_cross_attn.weight"] = np.ones(width, np.float32)
        out[f"{prefix}.{i}.norm_cross_attn.bias"] = np.zeros(width, np.float32)


def encoder_config(model: ViT) -> ModelConfig:
    """The ModelConfig that rebuilds `model`'s ViT (sizes, patch, position table, class token)."""
    d = model.dims
    return ModelConfig(img_size=model.img_size, patch_size=model.patch_size, cls_token=model.has_cls,
                       pos_embed=model.embed.pos_type, qkv_bias=model.blocks[0].attn.qkv.bias is not None,
                       width=d.width, depth=d.depth, heads=d.heads, mlp_dim=d.mlp_dim)


def from_monai_vit(state_dict: dict, cfg: ModelConfig, prefix: str | None = None) -> ViT:
    """ViT encoder carrying the weights of a MONAI `ViT` (or a whole `UNETR`, read under 'vit.').

    `cfg` must describe the same network (width/depth/heads/mlp_dim, patch and
    image size, cls_token, qkv_bias, pos_embed); mismatches raise a one-line error.
    """
    sd = _strip_prefix(state_dict, prefix)
    model = ViT(cfg, nnx.Rngs(0))
    handled = set()
    if cfg.pos_embed == "sincos":
        key = "patch_embedding.position_embeddings"
        _check_sincos(sd, key, token_grid(cfg.img_size, cfg.patch_size), vit_dims(cfg).width,
                      "load it with pos_embed='learnable'")
        handled.add(key)
    return _load(model, sd, encoder_pairs(cfg, (), "norm"), handled)


def to_monai_vit(model: ViT) -> dict[str, np.ndarray]:
    """MONAI `ViT` state dict (numpy) of an encoder; a class token needs MONAI's `classification=True`."""
    cfg = encoder_config(model)
    out = _export(model, encoder_pairs(cfg, (), "norm"))
    if cfg.pos_embed == "sincos":
        out["patch_embedding.position_embeddings"] = sincos_3d(token_grid(cfg.img_size, cfg.patch_size),
                                                               cfg.width)[None]
    _norm_cross_attn(out, "blocks", cfg.depth, cfg.width)
    return out


def from_monai_mae(state_dict: dict, cfg: ModelConfig) -> MAE:
    """MAE carrying the weights of a MONAI `MaskedAutoEncoderViT` (cfg.cls_token must be True, as in MONAI)."""
    if not cfg.cls_token:
        raise ValueError("MONAI's MaskedAutoEncoderViT always has a class token: set cls_token=True")
    model = MAE(cfg, nnx.Rngs(0))
    grid = token_grid(cfg.img_size, cfg.patch_size)
    handled = {"decoder_pos_embedding"}
    _check_sincos(state_dict, "decoder_pos_embedding", grid, decoder_dims(cfg)[0],
                  "only sin-cos decoder position embeddings are supported")
    if cfg.pos_embed == "sincos":
        _check_sincos(state_dict, "patch_embedding.position_embeddings", grid, vit_dims(cfg).width,
                      "load it with pos_embed='learnable'")
        handled.add("patch_embedding.position_embeddings")
    return _load(model, dict(state_dict), _mae_pairs(cfg), handled)


def to_monai_mae(model: MAE) -> dict[str, np.ndarray]:
    """MONAI `MaskedAutoEncoderViT` state dict (numpy) of an MAE built with cls_token=True."""
    enc = encoder_config(model.encoder)
    if not enc.cls_token:
        raise ValueError("MONAI's MaskedAutoEncoderViT needs a class token: this MAE was built without one")
    dec_depth = len(model.decoder_blocks)
    cfg = ModelConfig(**{**enc.__dict__, "decoder_width": model.dec_width, "decoder_depth": dec_depth,
                         "decoder_heads": model.decoder_blocks[0].attn.heads,
                         "decoder_mlp_dim": model.decoder_blocks[0].mlp.fc1.kernel.shape[1]})
    out = _export(model, _mae_pairs(cfg))
    grid = token_grid(enc.img_size, enc.patch_size)
    if enc.pos_embed == "sincos":
        out["patch_embedding.position_embeddings"] = sincos_3d(grid, enc.width)[None]
    out["decoder_pos_embedding"] = sincos_3d(grid, model.dec_width)[None]
    _norm_cross_attn(out, "blocks", enc.depth, enc.width)
    _norm_cross_attn(out, "decoder_blocks", dec_depth, model.dec_width)
    return out

