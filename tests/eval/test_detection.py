"""Lesion-wise detection, node sizes, FROC, evaluate_case and summarize on hand-built cases."""

import math

import numpy as np
import pytest

from lnfm.eval.detection import detect_nodes
from lnfm.eval.froc import froc
from lnfm.config import ConfigError
from lnfm.eval.metrics import CASE_KEYS, EvalConfig, check_metrics, evaluate_case, summarize

SP = (0.5, 0.5, 1.0)


def box(mask, lo, hi):
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def empty(shape=(60, 60, 20)):
    return np.zeros(shape, bool)


def test_counts_tp_fp_fn():
    gt = box(box(empty(), (5, 5, 5), (15, 15, 10)), (30, 30, 5), (40, 40, 10))
    pred = box(box(empty(), (6, 6, 5), (15, 15, 10)), (50, 50, 2), (55, 55, 4))  # one hit, one FP
    det = detect_nodes(pred, gt, SP)
    assert (det.tp, det.fp, det.fn) == (1, 1, 1)
    assert det.sensitivity == 0.5 and det.fp_per_volume == 1.0
    assert [n.matched for n in det.gt_nodes] == [True, False]
    assert [n.matched for n in det.pred_nodes] == [True, False]


def test_touching_nodes_depend_on_connectivity():
    # Two cubes that touch only along an edge: one node with 26-/18-connectivity, two with 6.
    gt = box(box(empty(), (5, 5, 5), (10, 10, 10)), (10, 10, 5), (15, 15, 10))
    pred = gt.copy()
    assert detect_nodes(pred, gt, SP).tp == 1
    assert detect_nodes(pred, gt, SP, connectivity=18).tp == 1
    det6 = detect_nodes(pred, gt, SP, connectivity=6)
    assert (det6.tp, det6.fp, det6.fn) == (2, 0, 0)
    with pytest.raises(ValueError, match="connectivity"):
        detect_nodes(pred, gt, SP, connectivity=8)


def test_one_prediction_bridging_two_nodes_detects_both():
    gt = box(box(empty(), (5, 5, 5), (12, 12, 10)), (16, 5, 5), (23, 12, 10))
    pred = box(empty(), (5, 5, 5), (23, 12, 10))  # covers both and the gap
    det = detect_nodes(pred, gt, SP)
    assert (det.tp, det.fp, det.fn) == (2, 0, 0)


def test_node_predicted_in_two_pieces_is_one_tp_no_fp():
    gt = box(empty(), (5, 5, 5), (25, 12, 10))
    pred = box(box(empty(), (5, 5, 5), (14, 12, 10)), (16, 5, 5), (25, 12, 10))
    det = detect_nodes(pred, gt, SP)
    assert (det.tp, det.fp, det.fn) == (1, 0, 0)
    assert len(det.pred_nodes) == 2


def test_overlap_threshold_and_centroid_criterion():
    gt = box(empty(), (10, 10, 5), (30, 30, 15))  # 4000 voxels
    tiny = box(empty(), (18, 18, 9), (20, 20, 11))  # 8 voxels inside: IoU 0.002
    det = detect_nodes(tiny, gt, SP, min_overlap=0.1)
    assert (det.tp, det.fp, det.fn) == (0, 1, 1)
    assert detect_nodes(tiny, gt, SP, min_overlap=0.001).tp == 1
    # The same node shifted 22 voxels (11 mm) in x, no longer overlapping.
    shifted = np.roll(gt, 22, axis=0)
    assert not (shifted & gt).any()
    assert detect_nodes(shifted, gt, SP).tp == 0
    det_c = detect_nodes(shifted, gt, SP, criterion="centroid", max_distance_mm=12.0)
    assert (det_c.tp, det_c.fp) == (1, 0)  # 22 voxels * 0.5 mm = 11 mm
    assert detect_nodes(shifted, gt, SP, criterion="centroid", max_distance_mm=10.0).tp == 0
    with pytest.raises(ValueError, match="criterion"):
        detect_nodes(shifted, gt, SP, criterion="iou")


def test_nodes_at_the_volume_edge():
    gt = box(box(empty(), (0, 0, 0), (6, 8, 4)), (54, 52, 16), (60, 60, 20))
    pred = box(empty(), (0, 0, 0), (5, 8, 4))
    det = detect_nodes(pred, gt, SP)
    assert (det.tp, det.fp, det.fn) == (1, 0, 1)
    node = det.gt_nodes[0]
    assert node.volume_ml == pytest.approx(6 * 8 * 4 * 0.25 / 1000)
    assert node.centroid_mm == pytest.approx((2.5 * 0.5, 3.5 * 0.5, 1.5))


def test_diameters_of_axial_rectangle_and_ellipse():
    sp = (0.6, 0.9, 2.0)
    rect = box(empty((40, 40, 6)), (10, 10, 2), (30, 16, 4))  # 20 x 6 pixels -> 12 x 5.4 mm
    node = detect_nodes(rect, rect, sp).gt_nodes[0]
    a, b = 20 * 0.6, 6 * 0.9
    assert node.long_axis_mm == pytest.approx(math.hypot(a, b))  # Feret diameter: the diagonal
    assert node.short_axis_mm == pytest.approx(2 * a * b / math.hypot(a, b))  # width across it
    assert node.volume_ml == pytest.approx(20 * 6 * 2 * 0.6 * 0.9 * 2.0 / 1000)
    # Ellipse with semi-axes 10 mm (x) and 6 mm (y) at 0.25 mm pixels, 3 slices thick.
    s = 0.25
    x, y = np.meshgrid((np.arange(100) - 49.5) * s, (np.arange(80) - 39.5) * s, indexing="ij")
    ell = np.repeat(((x / 10) ** 2 + (y / 6) ** 2 <= 1)[:, :, None], 3, axis=2)
    node = detect_nodes(ell, ell, (s, s, 1.0)).gt_nodes[0]
    assert node.long_axis_mm == pytest.approx(20.0, abs=2 * s)
    assert node.short_axis_mm == pytest.approx(12.0, abs=2 * s)
    assert node.volume_ml == pytest.approx(math.pi * 10 * 6 * 3 / 1000, rel=0.02)


def test_sensitivity_by_short_axis():
    sp = (1.0, 1.0, 1.0)
    gt = empty((80, 30, 10))
    # Square cross-sections: the long axis is the diagonal and the width across it is too.
    box(gt, (2, 2, 2), (5, 5, 5))  # side 3 mm -> short axis 4.2 mm
    box(gt, (20, 2, 2), (26, 8, 5))  # side 6 mm -> 8.5 mm
    box(gt, (50, 2, 2), (58, 10, 5))  # side 8 mm -> 11.3 mm
    pred = box(empty((80, 30, 10)), (20, 2, 2), (26, 8, 5))
    det = detect_nodes(pred, gt, sp)
    assert [n.short_axis_mm for n in det.gt_nodes] == pytest.approx([3 * 2**0.5, 6 * 2**0.5, 8 * 2**0.5])
    assert det.sensitivity_by_size == {"lt5": 0.0, "5to10": 1.0, "ge10": 0.0}
    none = detect_nodes(pred, pred, sp)
    assert none.sensitivity_by_size == {"lt5": None, "5to10": 1.0, "ge10": None}


def test_froc_hand_built():
    sp = (1.0, 1.0, 1.0)
    shape = (40, 40, 10)
    # Volume 1: two nodes; candidates: node A at 0.9, node B at 0.4, FPs at 0.8 and 0.3.
    gt1 = box(box(np.zeros(shape, bool), (2, 2, 2), (8, 8, 6)), (20, 20, 2), (26, 26, 6))
    p1 = np.zeros(shape)
    p1[2:8, 2:8, 2:6] = 0.9
    p1[20:26, 20:26, 2:6] = 0.4
    p1[32:35, 2:5, 2:4] = 0.8
    p1[2:5, 32:35, 2:4] = 0.3
    # Volume 2: one node found at 0.6, no false positive.
    gt2 = box(np.zeros(shape, bool), (10, 10, 2), (16, 16, 6))
    p2 = np.where(gt2, 0.6, 0.0)
    res = froc([p1, p2], [gt1, gt2], sp, thresholds=[0.2, 0.35, 0.5, 0.7, 0.85])
    np.testing.assert_allclose(res.sensitivity, [1.0, 1.0, 2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(res.fp_per_volume, [1.0, 0.5, 0.5, 0.5, 0.0])
    assert res.sensitivity_at == {0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    # With only the high thresholds, 0.5 FP/volume reaches 2/3 and 0 FP gives 1/3.
    res2 = froc([p1, p2], [gt1, gt2], sp, thresholds=[0.5, 0.7, 0.85], fp_rates=[0.25, 0.5])
    assert res2.sensitivity_at == {0.25: pytest.approx(1 / 3), 0.5: pytest.approx(2 / 3)}
    assert res2.cpm == pytest.approx(0.5)
    assert res.n_nodes == 3 and res.n_volumes == 2


def test_evaluate_case_and_summarize():
    sp = (0.5, 0.5, 1.0)
    gt = box(empty(), (5, 5, 5), (25, 25, 12))
    pred = box(empty(), (6, 5, 5), (25, 25, 12))
    case = evaluate_case(pred, gt, sp)
    assert tuple(case) == CASE_KEYS
    assert case["dice"] == pytest.approx(2 * 19 / 39)
    assert case["hd95"] == pytest.approx(0.5) and 0 < case["assd"] < 0.5
    assert case["nsd"] == pytest.approx(1.0)
    assert (case["tp"], case["fp"], case["fn"], case["node_sensitivity"]) == (1, 0, 0, 1.0)
    assert case["sens_ge10"] == 1.0 and case["sens_lt5"] is None
    no_gt = evaluate_case(pred, empty(), sp)
    assert no_gt["node_sensitivity"] is None and no_gt["hd95"] == math.inf and no_gt["fp"] == 1
    summary = summarize([case, no_gt])
    assert summary["n_cases"] == 2
    assert summary["hd95"] == pytest.approx(0.5) and summary["hd95_n_inf"] == 1
    assert summary["dice"] == pytest.approx(case["dice"] / 2)
    assert summary["node_sensitivity"] == 1.0 and summary["fp_per_volume"] == 0.5
    assert (summary["tp_total"], summary["fp_total"], summary["fn_total"]) == (1, 1, 0)
    assert summary["node_sensitivity_pooled"] == 1.0
    assert summary["sens_lt5"] is None


def test_eval_config_drives_evaluate_case():
    from lnfm.eval.metrics import EvalConfig

    gt = box(empty(), (10, 10, 5), (30, 30, 15))
    shifted = np.roll(gt, 22, axis=0)
    assert evaluate_case(shifted, gt, SP, **EvalConfig().kwargs())["tp"] == 0
    cfg = EvalConfig(criterion="centroid", max_distance_mm=12.0, tolerance_mm=1.0)
    assert evaluate_case(shifted, gt, SP, **cfg.kwargs())["tp"] == 1


def test_block_labelling_equals_scipy_label():
    from eval_inputs import blob
    from scipy import ndimage

    from lnfm.eval.detection import connectivity_structure, label_components

    for seed, shape in [(0, (37, 29, 21)), (1, (64, 40, 17)), (2, (9, 9, 9))]:
        mask = blob(shape, seed, level=1.2, smooth=1.2)
        for conn in (6, 18, 26):
            for block in (2, 3, 8):
                labels, n = label_components(mask, conn, block=block)
                ref, n_ref = ndimage.label(mask, connectivity_structure(conn))
                assert n == n_ref > 3
                np.testing.assert_array_equal(labels, ref)


@pytest.mark.parametrize("changes, says", [
    ({"connectivity": 5}, "metrics.connectivity must be 6, 18 or 26"),
    ({"connectivity": 1}, "metrics.connectivity must be 6, 18 or 26"),
    ({"tolerance_mm": -1.0}, "metrics.tolerance_mm must be in [0, inf)"),
    ({"max_distance_mm": float("inf")}, "metrics.max_distance_mm must be in [0, inf)"),
    ({"min_overlap": 1.5}, "metrics.min_overlap must be in [0, 1]"),
])
def test_check_metrics_refuses_what_detection_cannot_use(changes, says):
    with pytest.raises(ConfigError) as e:
        check_metrics(EvalConfig(**changes))
    assert says in str(e.value)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_check_metrics_accepts_the_connectivities_detection_uses(connectivity):
    cfg = EvalConfig(connectivity=connectivity, tolerance_mm=0.0, min_overlap=1.0, max_distance_mm=0.0)
    check_metrics(cfg)
    gt = box(empty(), (5, 5, 5), (10, 10, 10))
    assert evaluate_case(gt, gt, SP, **cfg.kwargs())["tp"] == 1  # an IoU of 1 meets min_overlap 1
