"""Which parameters train: frozen-layer strategies for finetuning a pretrained encoder.

The model is a segmenter with `.encoder` (whose `units()` lists its freezable
units in input-to-output order: embedding, then blocks or stages) and `.head`.

- `all`: the encoder is frozen; only the head trains.
- `first_k`: the first `k` units are frozen; later units, leftover encoder
  parameters (e.g. the final norm) and the head train. The embedding is unit 1,
  so k=2 freezes the embedding plus block 1 (Swin: stage 1).
- `none`: everything trains, with layer-wise LR decay: unit i of n gets
  lr * llrd ** (n - i), the head gets lr.
- `lora`: the encoder's weights are frozen; low-rank adapters on the attention
  projections (added by `lnfm.models.lora.apply_lora`) and the head train.

The result is an NNX filter for `lnfm.train.state.split_model`: frozen leaves go
to the `frozen` pytree and never meet the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal
from collections.abc import Callable

import jax
from flax import nnx

from lnfm.config import ConfigError, unread_in_mode
from lnfm.models.lora import LoRAParam


@dataclasses.dataclass
class StrategyConfig:
    freeze: Literal["all", "first_k", "none", "lora"] = "all"  # what the optimizer may change (see docs/finetuning.md)
    k: int = 2  # leading encoder units frozen with freeze=first_k (the embedding counts: k=2 = embedding + block 1)
    llrd: float = 1.0  # layer-wise LR decay for trainable encoder units (1.0 = off; 0.75 is typical with freeze=none)
    lora_rank: int = 8  # LoRA adapter rank with freeze=lora
    lora_alpha: float = 16.0  # LoRA scaling numerator (update scale = alpha / rank)


Path = tuple

# The strategy keys one freeze mode reads -> those modes (the layer-wise decay scales trainable encoder units).
READ_BY = {"k": ("first_k",), "llrd": ("first_k", "none"), "lora_rank": ("lora",), "lora_alpha": ("lora",)}


def unread_keys(cfg: StrategyConfig) -> dict[str, str]:
    """The strategy keys cfg.freeze never reads -> why (`lnfm.config.refuse_unread`)."""
    return unread_in_mode("strategy", "freeze", cfg.freeze, READ_BY)


def check_strategy(cfg: StrategyConfig, num_units: int | None = None) -> None:
    """The strategy section's ranges, before anything is written (`num_units`: the encoder's freezable
    units when known, the upper bound of strategy.k). Each refusal names the key and its valid range."""
    if cfg.freeze == "first_k" and cfg.k < 0:
        raise ConfigError(f"strategy.k={cfg.k} must be at least 0 (the leading encoder units frozen)")
    if num_units is not None:
        check_units(cfg, num_units)
    if not (math.isfinite(cfg.llrd) and 0.0 < cfg.llrd <= 1.0):
        raise ConfigError(f"strategy.llrd must be in (0, 1] (layer-wise LR decay; 1 = off), got {cfg.llrd:g}")
    if cfg.freeze == "lora" and cfg.lora_rank < 1:
        raise ConfigError(f"strategy.lora_rank must be at least 1, got {cfg.lora_rank}")
    if cfg.freeze == "lora" and not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise ConfigError(f"strategy.lora_alpha must be in (0, inf) (update scale alpha / rank), got "
                          f"{cfg.lora_alpha:g}")


def check_units(cfg: StrategyConfig, num_units: int) -> None:
    """strategy.k's upper bound, the encoder's `num_units` freezable units (the rest of the section is
    `check_strategy`'s): for a job that checked the section before the encoder was known."""
    if cfg.freeze == "first_k" and cfg.k > num_units:
        raise ConfigError(f"strategy.k={cfg.k} is outside 0..{num_units} (the encoder has {num_units} units)")


def module_paths(model: nnx.Module) -> dict[int, Path]:
    """id(submodule) -> its path inside `model`."""
    return {id(node): tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}


def unit_paths(model: nnx.Module) -> list[Path]:
    """Paths of `model.encoder.units()`, in order."""
    where = module_paths(model)
    paths = []
    for i, unit in enumerate(model.encoder.units()):
        if id(unit) not in where:
            raise ValueError(f"encoder unit {i} ({type(unit).__name__}) is not part of the model graph")
        paths.append(where[id(unit)])
    return paths


def _under(path: Path, prefix: Path) -> bool:
    return tuple(path[:len(prefix)]) == tuple(prefix)


def _is_lora(value: Any) -> bool:
    return isinstance(value, LoRAParam) or (isinstance(value, type) and issubclass(value, LoRAParam))


def trainable_filter(model: nnx.Module, cfg: StrategyConfig) -> Callable[[Path, Any], bool]:
    """NNX filter `(path, variable) -> bool`, True for parameters the optimizer updates."""
    encoder = module_paths(model)[id(model.encoder)]
    if cfg.freeze == "none":
        return lambda path, value: True
    if cfg.freeze == "all":
        return lambda path, value: not _under(path, encoder)
    if cfg.freeze == "lora":
        return lambda path, value: not _under(path, encoder) or _is_lora(value)
    if cfg.freeze == "first_k":
        units = unit_paths(model)
        check_strategy(cfg, len(units))
        frozen = units[:cfg.k]
        return lambda path, value: not any(_under(path, p) for p in frozen)
    raise ConfigError(f"unknown strategy.freeze '{cfg.freeze}'")


def layer_index_fn(model: nnx.Module) -> tuple[Callable[[str], int], int]:
    """(layer_of, n) for `lnfm.train.optim.layer_lr_scales`: a parameter path string
    ('encoder/blocks/3/attn/kernel/value') -> 0..n-1 for encoder unit i, n-1 for
    encoder parameters outside every unit (they sit after the last unit), n for the head."""
    units = ["/".join(str(p) for p in path) + "/" for path in unit_paths(model)]
    encoder = "/".join(str(p) for p in module_paths(model)[id(model.encoder)]) + "/"
    n = len(units)

    def layer_of(name: str) -> int:
        for i, prefix in enumerate(units):
            if name.startswith(prefix):
                return i
        return n - 1 if name.startswith(encoder) else n

    return layer_of, n


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
