"""Deterministic few-shot subsets of the training split, and the split-disjointness check.

A subset depends only on the set of training case ids, N and the seed: the ids are
sorted first, so manifest order, filesystem order or the host do not change it.
For one seed, smaller subsets are prefixes of larger ones, so a learning curve
over N adds cases instead of redrawing them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from lnfm.config import ConfigError
from lnfm.errors import DataError


def select_subset(train_ids: Iterable[str], num_labeled: int | None, seed: int) -> list[str]:
    """`num_labeled` ids drawn without replacement from `train_ids` (all of them, shuffled
    by `seed`, when None or >= the split size). The result is sorted."""
    ids = sorted(set(train_ids))
    if not ids:
        raise DataError("the training split is empty: no labelled case to draw a few-shot subset from")
    if num_labeled is None or num_labeled >= len(ids):
        return ids
    if num_labeled < 1:
        raise ConfigError(f"--num-labeled must be at least 1, got {num_labeled}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x4C4E])).permutation(len(ids))
    return sorted(ids[i] for i in order[:num_labeled])


def check_disjoint(train: Sequence[str], **others: Sequence[str]) -> None:
    """Raise if any evaluation split (val=..., test=...) shares a case with training."""
    train_set = set(train)
    for name, ids in others.items():
        shared = sorted(train_set.intersection(ids))
        if shared:
            raise ValueError(f"the {name} split shares {len(shared)} case(s) with training (first: {shared[0]})")
