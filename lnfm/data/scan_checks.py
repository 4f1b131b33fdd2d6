"""Checks that keep a scan that is not a usable body CT, a PET channel that is not a PET (or a
target spacing that is not a voxel size) from being converted or segmented without a word.

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
# A scan's size in the world: an affine in cm read as mm (every length /10), or x10, leaves the voxels within
# MIN/MAX_SPACING_MM, so the extent is what shows it. Measured across the two widest voxel axes (the field of
# view; a thin slab's few slices, in any orientation, are left out), with the pixel size (the middle voxel size:
# two of a CT's three are its pixel). The real CTs of ../shared/data span 180-500 mm across with 0.625-3 mm
# pixels (pydicom's 128x128 slice 85 mm); their affines /10 span 18.9-50 mm with 0.0625-0.3 mm pixels (x10:
# 1800-5000 mm, 6.25-30 mm pixels). A scanner reconstructs at most 50 cm across (a wide bore's extended field 80
# cm), so a scan under MIN_FOV_MM across is a crop, and a crop keeps its scan's pixels: 0.35 mm or more for a 512
# matrix over 18 cm or more (the smallest neck or child's body reconstruction). Under FINE_PIXEL_MM as well, it
# is an affine in cm (of a scan resampled to up to 3.4 mm) or, missed no more, a crop under 6 cm of an
# ultra-high-resolution scan. Both must hold to refuse: a 10 cm crop of any scan passes, and so do the project's
# phantoms, down to 14 mm across (synth's 24x24 test grids) but with pixels of 0.6 mm or more
# (SynthConfig.spacing_inplane; the benchmark's and demo's 96x96 grids span 57.6-125 mm). Over MAX_FOV_MM across,
# wider than any scanner's bore, with pixels over COARSE_PIXEL_MM (a field padded wider keeps its fine pixels):
# an affine x10.
MIN_FOV_MM = 60.0
FINE_PIXEL_MM = 0.35
MAX_FOV_MM = 1000.0
COARSE_PIXEL_MM = 2.0
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
# Air is -1000 HU and scanners reconstruct down to about -1024, so real voxels stop a little below it: the real
# CTs of ../shared/data reach -1207 (one voxel), all else lies at or above -1100. Padding outside the field of
# view is a constant (-1024, -2000, -2048, -3024, -32768): the minimum, and up to PADDING_CONSTANTS - 1 more (a FOV
# circle inside a padded slab, a slab added later by another tool). Over FAR_BELOW_AIR_FRACTION of the voxels below
# FAR_BELOW_AIR_HU besides those is not HU: x10 puts 36-40% of the voxels of each real CT there with 4 constants
# left out, and >= 1.48% even with its air clipped to -500 first (two of them, x10, also exceed the int16 limits
# and are refused for that first).
FAR_BELOW_AIR_HU = -1200.0
FAR_BELOW_AIR_FRACTION = 0.005
PADDING_CONSTANTS = 4
# A CT divided by 10 has no air (air lands at -100). Neither has a crop inside the body, and a narrow range does
# not tell them apart: the project's synthetic pelvis crops span as little as 168 HU (0.1th..99.9th percentile),
# the real CTs /10 147-324. Judged on a sample of at most SAMPLE_VOXELS, when nothing lies below NO_AIR_HU besides
# a padding constant below AIR_FLOOR_HU (the minimum, left out, scaled or not), what does:
# - The noise, of which /10 keeps a tenth. Neighbouring voxels of the real CTs of ../shared/data differ by a median
#   of 7 HU or more (every crop of 1000+ voxels without air), the same /10 by 0.4-9, 95% under 4.4: quiet, under
#   DIV10_NOISE_HU. Nothing under MIN_JUDGED_VOXELS is judged.
# - Air /10, one uniform material, piling up at the lowest values: over FLOOR_PILE_FRACTION of the voxels within
#   FLOOR_PILE_HU of the 0.1th percentile (1.9-37% in the real CTs /10) and a span under MIN_HU_SPAN (bone or
#   contrast widens a real crop). Counted from MIN_PILE_VOXELS in a quiet scan, from NOISY_PILE_VOXELS in any (a
#   CT of a sharp kernel or a low dose keeps 5-11 HU of noise /10): the few lowest voxels of a small crop are over
#   1% of it, which refused 3885 of 8721 boxes of 15-60 mm inside the real CTs' bodies, and 732 of 3876 no-air
#   crops of the synthetic phantoms.
# - Fat (-100 HU) at -10 in a quiet scan: over FAT_DIV10_FRACTION of the voxels in FAT_DIV10_HU, under
#   REAL_FAT_FRACTION below REAL_FAT_HU, where the fat of a real crop lies.
# No real crop is refused (those boxes, 938 random ones of 15-120 mm; smoothed first by a Gaussian of 0.7 / 1 /
# 1.5 voxels, noise down to 1-3 HU: 1 / 7 / 12 of 350 / 414 / 378). Of the same /10, all 351 boxes of fat and
# soft tissue are (315 before), and 340 of the 400 random crops of 30-120 mm (363 before, with 7 real ones). A
# crop of tissue or bone without fat, /10, passes: it is soft tissue, or water, in HU.
NO_AIR_HU = -500.0
AIR_FLOOR_HU = -1024.0
SAMPLE_VOXELS = 1 << 20
MIN_JUDGED_VOXELS = 500
MIN_PILE_VOXELS = 1000
NOISY_PILE_VOXELS = 20000
DIV10_NOISE_HU = 5.0
MIN_HU_SPAN = 400.0
FLOOR_PILE_HU = 5.0
FLOOR_PILE_FRACTION = 0.01
FAT_DIV10_HU = (-16.0, -5.0)
FAT_DIV10_FRACTION = 0.15
REAL_FAT_HU = -40.0
REAL_FAT_FRACTION = 0.1


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


def check_field_of_view(affine, shape, path: str) -> None:
    """A scan's extent in the world must be one of a body CT or a crop of one, not a scan whose affine is in cm
    (or tenths of a mm) read as mm (see MIN_FOV_MM). `affine` in mm; `shape` its grid (X, Y, Z, ...)."""
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    extent = np.asarray(shape[:3], float) * spacing
    across = float(np.sort(extent)[-2])  # the narrower of the two widest axes
    pixel = float(np.median(spacing))
    shown = f"{' x '.join(f'{e:.1f}' for e in extent)} mm, voxels {' x '.join(f'{s:.3g}' for s in spacing)} mm"
    if across < MIN_FOV_MM and pixel < FINE_PIXEL_MM:
        raise ScanError(f"{path}: field of view only {shown}: too small for a body CT, or a crop of one with voxels "
                        f"this fine: is its affine in cm, not mm?")
    if across > MAX_FOV_MM and pixel > COARSE_PIXEL_MM:
        raise ScanError(f"{path}: field of view {shown}: wider than any CT scanner reconstructs (over "
                        f"{MAX_FOV_MM / 1000:g} m across): is its affine scaled by 10?")


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
    check_hu_scale(data, path, lo)


def check_pet(data: np.ndarray, path: str) -> None:
    """A PET channel in SUV or Bq/mL: its activity is never negative, and the noise of a reconstruction that
    goes below 0 (filtered back-projection) is centred on 0, so its mean is not below 0 in any unit. A CT's
    mean is: air at -1000 HU outweighs bone (-201 to -360 HU for the real CTs of ../shared/data, -8 to -17
    HU for synthetic pelvis phantoms holding little air)."""
    mean = float(np.mean(data, dtype=np.float64))
    if mean < 0:
        # no slash in the reason: failures.jsonl and the log would take "Bq/mL" for a path and hide it
        raise ScanError(f"{path}: mean value {mean:.3g} is below 0 (values {float(data.min()):g}..{float(data.max()):g}"
                        f"): not a PET, whose activity (SUV, Bq per mL) is never negative beyond noise around 0 (a CT "
                        f"in HU, its air at -1000?)")


def check_hu_scale(data: np.ndarray, path: str, lo: float) -> None:
    """Refuse a CT in HU scaled by a wrong factor: x10 (FAR_BELOW_AIR_HU) or /10 (NO_AIR_HU)."""
    limit = FAR_BELOW_AIR_FRACTION * data.size
    if np.count_nonzero(data < FAR_BELOW_AIR_HU) > limit:
        rest = data[(data < FAR_BELOW_AIR_HU) & (data != lo)]  # padding: the minimum...
        if rest.size > limit:
            counts = np.sort(np.unique(rest, return_counts=True)[1])  # ...and maybe a few more constants
            n = rest.size - int(counts[-(PADDING_CONSTANTS - 1):].sum())
            if n > limit:
                raise ScanError(f"{path}: {n / data.size:.1%} of voxels lie below {FAR_BELOW_AIR_HU:g} HU, values "
                                f"down to {float(rest.min()):g} (air is -1000): not Hounsfield units (scaled by 10, "
                                f"or a wrong rescale slope?)")
    # A constant at or above -1024 (air's floor) is air, one below it is padding: the minimum, left out.
    padding = np.count_nonzero(data == lo) if lo < AIR_FLOOR_HU else 0
    if np.count_nonzero(data < NO_AIR_HU) > padding:
        return  # air or lung
    step = math.ceil((data.size / SAMPLE_VOXELS) ** (1 / data.ndim))
    sample = data[(slice(None, None, step),) * data.ndim]
    rest = sample[sample != lo]
    if rest.size < MIN_JUDGED_VOXELS:
        return
    noise = _noise_hu(data, lo)
    quiet = noise < DIV10_NOISE_HU
    floor, top = (float(v) for v in np.percentile(rest, [0.1, 99.9]))
    pile = np.count_nonzero(rest <= floor + FLOOR_PILE_HU) / rest.size
    if rest.size >= (MIN_PILE_VOXELS if quiet else NOISY_PILE_VOXELS) and top - floor < MIN_HU_SPAN and \
            pile > FLOOR_PILE_FRACTION:
        raise ScanError(f"{path}: no voxel below {NO_AIR_HU:g} HU (no air or lung), 99.8% of values within "
                        f"{floor:.1f}..{top:.1f} and {pile:.0%} of them piled at {floor:.1f}, as air (-1000 HU) "
                        f"would be: not Hounsfield units (divided by 10?)")
    fat = np.count_nonzero((rest >= FAT_DIV10_HU[0]) & (rest <= FAT_DIV10_HU[1])) / rest.size
    real_fat = np.count_nonzero(rest < REAL_FAT_HU) / rest.size
    if quiet and fat > FAT_DIV10_FRACTION and real_fat < REAL_FAT_FRACTION:
        raise ScanError(f"{path}: no voxel below {NO_AIR_HU:g} HU (no air or lung), {fat:.0%} of values within "
                        f"{FAT_DIV10_HU[0]:g}..{FAT_DIV10_HU[1]:g} as fat (-100 HU) divided by 10 would be, "
                        f"{real_fat:.1%} below {REAL_FAT_HU:g} and neighbouring voxels {noise:.1f} HU apart (a CT's "
                        f"differ by {DIV10_NOISE_HU:g} HU or more): not Hounsfield units (divided by 10?)")


def _noise_hu(data: np.ndarray, lo: float) -> float:
    """The median difference between neighbouring voxels along every axis, neither of them the minimum (padding),
    on every k-th line (at most about SAMPLE_VOXELS voxels per axis)."""
    step = max(1, math.ceil((data.size / SAMPLE_VOXELS) ** (1 / max(1, data.ndim - 1))))
    diffs = []
    for axis in range(data.ndim):
        lines = np.moveaxis(data, axis, 0)[(slice(None),) + (slice(None, None, step),) * (data.ndim - 1)]
        lines = lines.astype(np.float32)
        keep = (lines[1:] != lo) & (lines[:-1] != lo)
        diffs.append(np.abs(lines[1:] - lines[:-1])[keep])
    found = np.concatenate(diffs)
    return float(np.median(found)) if found.size else 0.0
