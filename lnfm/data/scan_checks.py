"""Checks that keep a scan that is not a usable body CT (or a target spacing that is not a
voxel size) from being converted or segmented without a word.

prepare and `lnfm predict` apply the same checks, so a scan one accepts the other accepts too.
Every failure is a `ScanError` whose message is one line, 'PATH: reason'.
"""

from __future__ import annotations

import math

import numpy as np

from lnfm.config import ConfigError
from lnfm.errors import LnfmError

# Voxels coarser than this are not a diagnostic CT; finer than MIN_SPACING_MM would make a
# volume too large to hold (a 0.01 mm grid of a 30 cm body is 3e13 voxels).
MAX_SPACING_MM = 20.0
MIN_SPACING_MM = 0.05
# A 3D scan has at least this many voxels along every axis.
MIN_EXTENT = 2
# The store holds CT as int16 HU: values at or beyond these ends cannot be stored faithfully.
# -32768 itself is a common padding value outside the field of view, so only values below it count.
INT16_MAX, INT16_MIN = 32767, -32768
# A CT spans at least fat to soft tissue (about -100..50 HU); a label map or mask spans a few values.
MIN_CT_RANGE_HU = 16
# A body CT holds air, lung or fat (about -1000, -800, -100 HU) somewhere, and lymph nodes sit in fat;
# values that never go below 0 are not HU (an unsigned store without the rescale intercept: HU + 1024).
MIN_CT_LOWEST_HU = 0.0


class ScanError(LnfmError, ValueError):
    """A scan that cannot be used; the message is one line naming the file."""


def check_target_spacing(spacing, where: str = "spacing") -> tuple[float, float, float] | None:
    """A configured target spacing (mm, X Y Z) as floats, or ConfigError: three finite values in
    [MIN_SPACING_MM, MAX_SPACING_MM]. None (keep each case's own spacing) passes through."""
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in values):
        raise ConfigError(f"{where}: {list(values)} is not a voxel size (three values from {MIN_SPACING_MM:g} to "
                          f"{MAX_SPACING_MM:g} mm)")
    return values  # type: ignore[return-value]


def check_source_spacing(spacing, path: str) -> None:
    """The voxel size a scan's affine gives must be one of a CT."""
    if not all(np.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise ScanError(f"{path}: absurd voxel spacing {tuple(round(float(s), 4) for s in spacing)} mm (expected "
                        f"{MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm)")


def check_ct(data: np.ndarray, path: str, body_threshold_hu: float) -> None:
    """A CT channel (X, Y, Z) in HU: 3D, finite, not all air, not beyond the int16 range."""
    if data.ndim != 3 or min(data.shape) < MIN_EXTENT:
        raise ScanError(f"{path}: image has shape {tuple(data.shape)}; a 3D scan needs at least {MIN_EXTENT} "
                        f"voxels along each axis")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise ScanError(f"{path}: image has NaN or Inf voxels")
    lo, hi = float(data.min()), float(data.max())
    if hi >= INT16_MAX or lo < INT16_MIN:
        raise ScanError(f"{path}: CT values {lo:g}..{hi:g} HU reach the limits of the int16 range the store holds "
                        f"({INT16_MIN}..{INT16_MAX - 1}): saturated, or a wrong rescale slope or intercept")
    if hi <= body_threshold_hu:
        raise ScanError(f"{path}: no voxel above {body_threshold_hu:g} HU (all air, max {hi:g} HU): no body to "
                        f"segment")
    if hi - lo < MIN_CT_RANGE_HU:
        raise ScanError(f"{path}: values span only {lo:g}..{hi:g}: a label map or mask, not a CT in HU")
    if lo >= MIN_CT_LOWEST_HU:
        raise ScanError(f"{path}: no voxel below {MIN_CT_LOWEST_HU:g} HU (no air, lung or fat; values {lo:g}..{hi:g}): "
                        f"not HU, e.g. stored without its rescale intercept (HU + 1024)")
