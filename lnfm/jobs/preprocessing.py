"""The preprocessing a training run records: its stores' contract, the spacing it trains at,
the intensity normalisation, and the normalisation of the encoder it starts from."""

from __future__ import annotations

import dataclasses

import numpy as np

from lnfm.config import ConfigError, read_yaml
from lnfm.data.contract import (ContractError, Normalization, Preprocessing, common_contract, read_preprocessing)
from lnfm.jobs.export_meta import read_meta
from lnfm.runs import ExportFolder, PretrainRun

SPACING_RTOL = 0.01  # a stored case within 1% of the training spacing counts as at that spacing


def encoder_normalization(init: str) -> Normalization | None:
    """How the encoder named by finetuning's `--init` was pretrained to see intensities
    (None for scratch). Read from the run's preprocessing.json, from an older pretraining run's
    recorded config (data.hu_window, data.pet_scale), or from an export's model.json."""
    if init == "scratch":
        return None
    export = ExportFolder.detect(init)
    if export is not None:
        return read_meta(export.root).preprocessing.normalization
    run = PretrainRun.detect(init)
    if run is None:
        return None  # resolve_init reports what --init should be
    prep = read_preprocessing(run.preprocessing)
    if prep is not None:
        return prep.normalization
    data = read_yaml(run.config).get("data") or {}
    if "hu_window" not in data or "pet_scale" not in data:
        raise ContractError(f"{run.config}: records no intensity normalisation (data.hu_window, data.pet_scale)")
    try:
        lo, hi = (float(v) for v in data["hu_window"])
        return Normalization((lo, hi), float(data["pet_scale"]))
    except (TypeError, ValueError):
        raise ConfigError(f"{run.config}: data.hu_window must be two numbers, got {data['hu_window']!r}") from None


def check_spacing(records: list[tuple[str, dict]], spacing: tuple[float, ...], flag: str) -> None:
    """Every (store, record) at `spacing` (within SPACING_RTOL), else one line naming the store,
    the case count and `flag`, the setting that fixes it."""
    for store in dict.fromkeys(s for s, _ in records):
        mine = [r for s, r in records if s == store]
        off = [r for r in mine if not np.allclose(r["spacing"], spacing, rtol=SPACING_RTOL, atol=0)]
        if off:
            example = [round(float(s), 4) for s in off[0]["spacing"]]
            raise ContractError(f"{store}: {len(off)} of {len(mine)} cases are stored at a spacing other than "
                                f"{[float(s) for s in spacing]} mm (e.g. {example}); prepare the store with "
                                f"{flag} {','.join(f'{s:g}' for s in spacing)}")


def training_preprocessing(stores: list[str], records: list[tuple[str, dict]], spacing: tuple[float, float, float],
                           normalization: Normalization, patch: tuple[int, int, int]) -> Preprocessing:
    """The preprocessing of a run that trains on `records` of `stores` at `spacing`; the stores
    must share one contract and every record must be at `spacing` (no resampling on the fly)."""
    contract = common_contract(stores)
    check_spacing(records, spacing, "--spacing")
    return Preprocessing(dataclasses.replace(contract, spacing=tuple(float(s) for s in spacing)), normalization,
                         tuple(int(p) for p in patch))
