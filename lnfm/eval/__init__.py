"""Evaluation: segmentation and lesion-wise detection metrics, FROC, sliding-window
inference and post-processing of predicted lymph-node masks."""

from lnfm.eval.inference import sliding_window_inference
from lnfm.eval.metrics import (
    assd,
    detect_nodes,
    dice,
    evaluate_case,
    froc,
    hd95,
    summarize,
    surface_dice,
)
from lnfm.eval.postprocess import body_mask_from_ct, remove_small_components, restrict_to_body

__all__ = [
    "assd",
    "body_mask_from_ct",
    "detect_nodes",
    "dice",
    "evaluate_case",
    "froc",
    "hd95",
    "remove_small_components",
    "restrict_to_body",
    "sliding_window_inference",
    "summarize",
    "surface_dice",
]
