"""Per-case lymph-node evaluation and its summary over cases.

`evaluate_case` gives the segmentation metrics (Dice, HD95, ASSD, NSD; see
`lnfm.eval.surface`) and the lesion-wise detection counts (see
`lnfm.eval.detection`) of one volume; `summarize` averages them over cases.
Empty-mask conventions: both empty -> Dice 1, NSD 1, distances 0; exactly one
empty -> Dice 0, NSD 0, distances inf.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal
from collections.abc import Sequence

import numpy as np

from lnfm.config import ConfigError, check_in, unread_in_mode
from lnfm.eval.detection import Detection, Node, axial_diameters, detect_nodes
from lnfm.eval.froc import Froc, froc
from lnfm.eval.surface import (
    assd,
    assd_from_distances,
    dice,
    directed_distances,
    hd95,
    hd95_from_distances,
    surface_dice,
)

__all__ = [
    "Detection",
    "Froc",
    "Node",
    "assd",
    "axial_diameters",
    "detect_nodes",
    "dice",
    "directed_distances",
    "evaluate_case",
    "froc",
    "hd95",
    "summarize",
    "surface_dice",
    "CASE_KEYS",
    "EvalConfig",
    "check_metrics",
    "unread_keys",
]

@dataclass
class EvalConfig:
    """Metric settings (keyword arguments of `evaluate_case`)."""

    tolerance_mm: float = 2.0  # surface Dice tolerance
    criterion: Literal["overlap", "centroid"] = "overlap"  # how a predicted component matches a node
    min_overlap: float = 0.1  # IoU needed for an overlap match
    max_distance_mm: float = 10.0  # centroid distance allowed for a centroid match
    connectivity: int = 26  # voxel connectivity of components (6, 18 or 26)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `evaluate_case`."""
        return asdict(self)


def unread_keys(cfg: EvalConfig) -> dict[str, str]:
    """The metrics keys cfg.criterion never reads -> why (`lnfm.config.refuse_unread`)."""
    return unread_in_mode("metrics", "criterion", cfg.criterion,
                          {"min_overlap": ("overlap",), "max_distance_mm": ("centroid",)})


def check_metrics(cfg: EvalConfig) -> None:
    """The metrics section's ranges, before anything is written (the test metrics come after training:
    a bad value was a traceback or a sensitivity of 0 then). Each refusal names the key and its range."""
    check_in("metrics", cfg, "tolerance_mm", lambda v: v >= 0, "[0, inf)")
    check_in("metrics", cfg, "max_distance_mm", lambda v: v >= 0, "[0, inf)")
    check_in("metrics", cfg, "min_overlap", lambda v: 0 <= v <= 1, "[0, 1] (an IoU)")
    if cfg.connectivity not in (6, 18, 26):
        raise ConfigError(f"metrics.connectivity must be 6, 18 or 26 (the voxels sharing a face, or also an edge, "
                          f"or also a corner join one node), got {cfg.connectivity}")


CASE_KEYS = ("dice", "hd95", "assd", "nsd", "node_sensitivity", "fp_per_volume", "tp", "fp", "fn",
             "sens_lt5", "sens_5to10", "sens_ge10")
_DISTANCES = ("hd95", "assd")


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing, tolerance_mm: float = 2.0,
                  **detect_kwargs: Any) -> dict[str, float | int | None]:
    """Metrics of one volume; keys are CASE_KEYS. None marks an undefined value
    (node sensitivity without ground-truth nodes, a size stratum without nodes).
    `detect_kwargs` go to `detect_nodes` (criterion, min_overlap, ...)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    det = detect_nodes(pred, gt, spacing, **detect_kwargs)
    distances = directed_distances(pred, gt, spacing)
    return {
        "dice": dice(pred, gt),
        "hd95": hd95_from_distances(*distances),
        "assd": assd_from_distances(*distances),
        "nsd": surface_dice(pred, gt, spacing, tolerance_mm),
        "node_sensitivity": det.sensitivity,
        "fp_per_volume": det.fp_per_volume,
        "tp": det.tp,
        "fp": det.fp,
        "fn": det.fn,
        "sens_lt5": det.sensitivity_by_size["lt5"],
        "sens_5to10": det.sensitivity_by_size["5to10"],
        "sens_ge10": det.sensitivity_by_size["ge10"],
    }


def summarize(cases: Sequence[dict]) -> dict[str, float | int | None]:
    """Mean of each key over cases, skipping None; distances average finite values only
    and `<key>_n_inf` counts the infinite ones. Also `n_cases`, summed `tp`/`fp`/`fn`
    as `tp_total`/`fp_total`/`fn_total`, and `node_sensitivity_pooled` (all nodes pooled)."""
    out: dict[str, float | int | None] = {"n_cases": len(cases)}
    keys = list(dict.fromkeys(k for case in cases for k in case))
    for key in keys:
        values = [float(c[key]) for c in cases if c.get(key) is not None]
        if key in _DISTANCES:
            out[f"{key}_n_inf"] = sum(1 for v in values if math.isinf(v))
            values = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(values)) if values else None
    for key in ("tp", "fp", "fn"):
        if key in keys:
            out[f"{key}_total"] = int(sum(int(c[key]) for c in cases if c.get(key) is not None))
    if "tp" in keys and "fn" in keys:
        nodes = out["tp_total"] + out["fn_total"]
        out["node_sensitivity_pooled"] = out["tp_total"] / nodes if nodes else None
    return out
