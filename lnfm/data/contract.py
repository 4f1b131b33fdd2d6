"""The preprocessing contract: what prepare did to every case of a store, recorded once.

prepare resolves its settings into a `PrepareContract` and writes it to
STORE/contract.json before the first case; a rerun into the same store must
resolve to the same contract. Pretraining and finetuning read the contracts of
their stores, add the intensity `Normalization` they trained with, and the
export writes both into model.json, from which `lnfm predict` repeats the
preprocessing through the same code (`lnfm.data.prepare.preprocess_case`).
No field has a default: every value is the resolved one, never a guess.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lnfm.errors import LnfmError
from lnfm.config import ConfigError, from_dict, to_dict
from lnfm.data import store as st
from lnfm.workdir import atomic_write_text

CONTRACT = "contract.json"
CONTRACT_VERSION = 2  # 2: the crop box comes from the image alone (1 widened it to keep labelled voxels)
ORIENTATION = "RAS"  # prepare reorients every case to the closest RAS+ axis order
CT_STORAGE = "int16"  # CT channels are rounded to whole HU and stored as int16


class ContractError(LnfmError, ValueError):
    """A store or run whose recorded preprocessing contract is missing, unreadable or conflicting."""


@dataclasses.dataclass(frozen=True)
class PrepareContract:
    """The resolved preprocessing of one store (STORE/contract.json)."""

    version: int  # CONTRACT_VERSION of the writer
    spacing: tuple[float, float, float] | None  # target voxel size (mm, X Y Z); null: each case kept its own
    orientation: str  # array axis order of every case (ORIENTATION)
    crop_body: bool  # cropped to the body bounding box (channel 0 above body_threshold_hu)
    body_threshold_hu: float  # HU above which voxels count as body (crop and intensity statistics)
    channels: tuple[str, ...]  # channel names in array order, e.g. ("CT",) or ("CT", "PET")
    ct_storage: str  # voxel type of stored CT channels (CT_STORAGE)
    label_map: dict[int, int]  # source label -> stored label applied to labels (empty: kept as read)
    resample_channels: bool  # channels on another grid (PET) were resampled linearly onto channel 0's grid

    def differences(self, other: PrepareContract) -> list[str]:
        """'field: mine != theirs' for every field that differs."""
        a, b = to_dict(self), to_dict(other)
        return [f"{k}: {a[k]} != {b[k]}" for k in a if a[k] != b[k]]


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How raw intensities become model input (`normalize`)."""

    hu_window: tuple[float, float]  # CT HU (lo, hi) mapped linearly to [0, 1], clipped
    pet_scale: float  # non-CT channels (PET SUV) are divided by this


def hu_window_problem(window, name: str) -> str | None:
    """Why `window` is not a CT window (two finite HU values, the lower first), in one line naming the
    key `name`, or None: the one owner of this check (site, loader and model.json windows)."""
    values = [float(v) for v in window]
    if len(values) != 2 or not all(np.isfinite(values)) or values[0] >= values[1]:
        return f"{name} {values} is not a window from a lower to a higher HU value"
    if values[1] - values[0] < 1:  # CT is stored in whole HU: a narrower window is a threshold, not a window
        return f"{name} {values} is narrower than 1 HU (CT numbers are whole HU)"
    if values[0] < -32768 or values[1] > 32767:  # beyond int16 storage nothing changes, and float32 overflows
        return f"{name} {values} reaches beyond the HU range CT is stored in ([-32768, 32767])"
    return None


def normalize(image: np.ndarray, cfg, channels: list[str] | None = None) -> np.ndarray:
    """Raw (..., C) intensities -> model input: CT through the HU window `cfg.hu_window` to [0, 1],
    other channels (PET SUV) divided by `cfg.pet_scale` (`cfg`: a `Normalization` or the loader's
    config). Training and inference both use this."""
    image = np.asarray(image, np.float32)
    names = channels or ["CT"] + ["PET"] * (image.shape[-1] - 1)
    lo, hi = cfg.hu_window
    out = np.empty_like(image)
    for c, name in enumerate(names):
        if name.upper() == "CT":
            out[..., c] = np.clip((image[..., c] - lo) / (hi - lo), 0.0, 1.0)
        else:
            out[..., c] = image[..., c] / cfg.pet_scale
    return out


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What a scan goes through before the network: the stores' contract, the intensity
    normalisation and the window the network sees. Runs record it (preprocessing.json) and
    exports copy it into model.json."""

    contract: PrepareContract  # spacing: the training spacing (null only for an encoder pretrained at native spacing)
    normalization: Normalization
    patch_size: tuple[int, int, int]  # training patch = sliding-window ROI (voxels, X Y Z)


def read_preprocessing(path: Path) -> Preprocessing | None:
    """A run's recorded preprocessing, or None when the run records none."""
    if not path.is_file():
        return None
    try:
        return from_dict(Preprocessing, json.loads(path.read_text()))
    except (ValueError, ConfigError) as e:
        raise ContractError(f"{path}: {str(e).splitlines()[0]}") from None


def write_preprocessing(path: Path, prep: Preprocessing) -> None:
    atomic_write_text(path, json.dumps(to_dict(prep), indent=1) + "\n")


def contract_problem(contract: PrepareContract, key: str = "") -> str | None:
    """Why this lnfm cannot repeat `contract` (a store's contract.json, or model.json's under `key`), in one line
    naming the field, or None: the values prepare never writes. The one owner of these checks."""
    if not 1 <= contract.version <= CONTRACT_VERSION:  # a newer writer may preprocess in a way this one does not
        return (f"{key}version {contract.version} is not one this lnfm reads (1 to {CONTRACT_VERSION}: a newer lnfm "
                f"wrote it; update lnfm)")
    if contract.orientation != ORIENTATION:
        return f"{key}orientation '{contract.orientation}' is not '{ORIENTATION}' (the only one)"
    if contract.ct_storage != CT_STORAGE:  # predict rounds CT to int16 as prepare stored it
        return f"{key}ct_storage '{contract.ct_storage}' is not '{CT_STORAGE}' (the only one)"
    if not contract.channels or str(contract.channels[0]).upper() != "CT":
        return f"{key}channels {list(contract.channels)} does not start with 'CT'"
    if not np.isfinite(contract.body_threshold_hu):
        return f"{key}body_threshold_hu {contract.body_threshold_hu} is not a HU value"
    return None


def contract_from_dict(data: dict, where: str) -> PrepareContract:
    try:
        contract = from_dict(PrepareContract, data)
    except ConfigError as e:
        raise ContractError(f"{where}: {e}") from None
    problem = contract_problem(contract)
    if problem:
        raise ContractError(f"{where}: {problem}")
    return contract


def read_contract(store: str) -> PrepareContract | None:
    """The store's recorded contract, or None for a store that has none."""
    text = st.read_text(store, CONTRACT)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ContractError(f"{store}/{CONTRACT}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ContractError(f"{store}/{CONTRACT}: expected a JSON object")
    return contract_from_dict(data, f"{store}/{CONTRACT}")


def write_contract(store: str, contract: PrepareContract) -> None:
    st.write_text(store, CONTRACT, json.dumps(to_dict(contract), indent=1) + "\n")


def require_contract(store: str) -> PrepareContract:
    """The contract of a store that training reads; a store without one is a one-line error."""
    contract = read_contract(store)
    if contract is None:
        raise ContractError(f"{store}: the store records no preprocessing contract ({CONTRACT}); prepare it again "
                            f"with data_prep/prepare.py")
    return contract


def common_contract(stores: list[str]) -> PrepareContract:
    """The one contract shared by every store (label maps may differ); conflicting stores are an error."""
    contracts = [require_contract(s) for s in stores]
    first = contracts[0]
    for store, c in zip(stores[1:], contracts[1:]):
        diff = [d for d in first.differences(c) if not d.startswith("label_map")]
        if diff:
            raise ContractError(f"{store}: prepared differently from {stores[0]} ({'; '.join(diff)}); prepare "
                                f"both with the same settings")
    return first
