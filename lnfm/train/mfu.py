"""Model FLOPs utilisation: peak dense bf16 FLOP/s per device kind, and the MFU formula.

Model FLOPs per step follow the usual convention: 3 x the forward FLOPs (the backward
pass costs two forwards; rematerialisation and the optimizer are not counted), with the
forward counted by XLA's cost analysis of the lowered, uncompiled computation.

Peaks are the vendors' published dense (no sparsity) bf16 numbers per chip/GPU.
Device kinds are matched as lowercase substrings of `jax.Device.device_kind`,
most specific first. Unknown kinds and CPUs have no peak: MFU is then None (n/a).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax

from lnfm.models import onednn

# (substring of device_kind, peak bf16 dense FLOP/s), most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.4e12),
    ("h100 pcie", 756.0e12),
    ("h100 nvl", 835.0e12),
    ("h100", 989.4e12),  # SXM5
    ("a100", 312.0e12),
    ("tpu v6 lite", 918.0e12),  # v6e (Trillium)
    ("tpu v6e", 918.0e12),
    ("tpu v5 lite", 197.0e12),  # v5e
    ("tpu v5e", 197.0e12),
    ("tpu v5p", 459.0e12),
    ("tpu v5", 459.0e12),  # jax names v5p "TPU v5"
    ("tpu v4", 275.0e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, or None when unknown (CPU)."""
    kind = device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(flops_per_step: float | None, step_time_s: float, device_kind: str, num_devices: int) -> float | None:
    """Model FLOPs per step / (step time x peak FLOP/s of all devices); None when undefined."""
    peak = peak_flops(device_kind)
    if peak is None or not flops_per_step or step_time_s <= 0 or num_devices <= 0:
        return None
    return float(flops_per_step) / (step_time_s * peak * num_devices)


ASSUMED_MFU = 0.4  # the scale planner's default MFU for its step-time estimate


def expected_step_time(flops_per_step: float | None, device_kind: str, num_devices: int,
                       assumed_mfu: float = ASSUMED_MFU) -> float | None:
    """Step time the scale planner predicts: model FLOPs / (devices x peak x assumed MFU); None when unknown.
    An MFU outside (0, 1] is a caller's bug (the planner refuses it as --assumed-mfu): a step time from it
    would be negative, infinite or faster than the hardware."""
    if not 0.0 < assumed_mfu <= 1.0:  # NaN fails too
        raise ValueError(f"assumed_mfu must be in (0, 1], got {assumed_mfu}")
    peak = peak_flops(device_kind)
    if peak is None or not flops_per_step or num_devices <= 0:
        return None
    return float(flops_per_step) / (num_devices * peak * assumed_mfu)


def forward_flops(fn: Callable, *args: Any) -> float | None:
    """FLOPs of one call `fn(*args)` (args may be ShapeDtypeStructs); None if XLA reports none."""
    # XLA's own convolutions: it counts no FLOPs inside a custom call (oneDNN's, lnfm.models.onednn). A new
    # function, so that jit's trace cache cannot hand back a trace of `fn` made with oneDNN on.
    with onednn.disabled():
        cost = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def train_flops(forward: float | None) -> float | None:
    """Model FLOPs of a training step from its forward FLOPs (forward + backward = 3 forwards)."""
    return None if forward is None else 3.0 * forward
