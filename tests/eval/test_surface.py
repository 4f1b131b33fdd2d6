"""Dice, HD95, ASSD and surface Dice against MONAI, medpy and DeepMind's surface-distance."""

import math
import warnings

import numpy as np
import pytest
import surface_distance as deepmind
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from medpy.metric import binary as medpy_binary
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)

from lnfm.eval import surface
from lnfm.eval.surface import assd, dice, directed_distances, hd95, surface_dice, surfel_area_table

from eval_inputs import SPACING, blob, perturbations

# MONAI returns float32 distances and quantiles (relative rounding ~1e-7 per value, a few
# 1e-6 after interpolation); ours are float64 and match the float64 references to 1e-9.
F32_RTOL = 1e-6


def _t(mask):
    return torch.from_numpy(np.asarray(mask, np.float32)[None, None])


def monai_hd95(p, g, sp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_hausdorff_distance(_t(p), _t(g), percentile=95, spacing=list(sp)).item()


def monai_assd(p, g, sp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_average_surface_distance(_t(p), _t(g), symmetric=True, spacing=list(sp)).item()


def deepmind_nsd(p, g, sp, tol):
    d = deepmind.compute_surface_distances(np.asarray(g, bool), np.asarray(p, bool), sp)
    return deepmind.compute_surface_dice_at_tolerance(d, tol)


def blob_pairs():
    shape = (36, 30, 16)
    return [(blob(shape, s), blob(shape, s + 100), SPACING) for s in range(3)] + [
        (blob(shape, 7), np.roll(blob(shape, 7), 2, axis=0), (1.0, 1.0, 1.0)),
    ]


def real_pairs(real_nodes):
    return [(pred, gt, sp) for gt, sp in real_nodes for pred in perturbations(gt).values()]


def _check_against_references(pairs):
    for p, g, sp in pairs:
        assert p.any() and g.any()
        assert hd95(p, g, sp) == pytest.approx(monai_hd95(p, g, sp), rel=F32_RTOL * 4)
        assert assd(p, g, sp) == pytest.approx(monai_assd(p, g, sp), rel=F32_RTOL * 4)
        assert assd(p, g, sp) == pytest.approx(medpy_binary.assd(p, g, voxelspacing=sp), rel=1e-9)
        # medpy's hd95 pools both directions before the percentile: check ours on that too.
        d_pg, d_gp = directed_distances(p, g, sp)
        pooled = np.percentile(np.concatenate([d_pg, d_gp]), 95)
        assert pooled == pytest.approx(medpy_binary.hd95(p, g, voxelspacing=sp), rel=1e-9)
        for tol in (1.0, 2.0, 3.5):
            assert surface_dice(p, g, sp, tol) == pytest.approx(deepmind_nsd(p, g, sp, tol), rel=1e-9)
        assert dice(p, g) == pytest.approx(compute_dice(_t(p), _t(g)).item(), rel=F32_RTOL)
        assert dice(p, g) == pytest.approx(medpy_binary.dc(p, g), rel=1e-12)


def test_random_blobs_match_monai_medpy_deepmind():
    _check_against_references(blob_pairs())


def test_real_node_masks_match_monai_medpy_deepmind(real_nodes):
    _check_against_references(real_pairs(real_nodes))


def test_surfel_area_table_matches_deepmind():
    for sp in [(1.0, 1.0, 1.0), (0.7, 0.9, 2.5), (3.0, 0.5, 1.25)]:
        ref = deepmind.lookup_tables.create_table_neighbour_code_to_surface_area(sp)
        np.testing.assert_allclose(surfel_area_table(sp), ref, rtol=1e-12, atol=1e-12)


def test_hd95_is_not_medpy_definition_on_asymmetric_case():
    # Truth: a 14^3 cube; prediction: the cube plus a far 4^3 false positive holding ~5%
    # of the prediction's surface. MONAI's max of directed 95th percentiles sees the false
    # positive; medpy's percentile of both directions pooled does not.
    g = np.zeros((40, 30, 30), bool)
    g[3:17, 3:17, 3:17] = True
    p = g.copy()
    p[30:34, 20:24, 20:24] = True
    sp = (1.0, 1.0, 1.0)
    assert hd95(p, g, sp) == pytest.approx(monai_hd95(p, g, sp), rel=F32_RTOL)
    assert hd95(p, g, sp) > 10.0
    assert medpy_binary.hd95(p, g, voxelspacing=sp) == 0.0


def test_hand_computed_distances():
    # Two single voxels 3 voxels apart along z at 2 mm: every distance is 6 mm.
    a = np.zeros((5, 5, 8), bool)
    b = np.zeros_like(a)
    a[2, 2, 1] = b[2, 2, 4] = True
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(6.0)
    assert assd(a, b, (1, 1, 2)) == pytest.approx(6.0)
    assert dice(a, b) == 0.0
    # Identical masks: zero distance, perfect overlap at any tolerance.
    m = blob((20, 20, 10), 3)
    assert hd95(m, m, SPACING) == 0.0 and assd(m, m, SPACING) == 0.0
    assert surface_dice(m, m, SPACING, 0.0) == pytest.approx(1.0)
    assert dice(m, m) == 1.0


def test_masks_touching_the_volume_edge_match_monai():
    g = np.zeros((12, 12, 8), bool)
    g[0:6, 3:9, 0:8] = True  # touches three faces of the volume
    p = np.roll(g, 1, axis=1)
    sp = (0.8, 0.8, 3.0)
    assert hd95(p, g, sp) == pytest.approx(monai_hd95(p, g, sp), rel=F32_RTOL)
    assert assd(p, g, sp) == pytest.approx(monai_assd(p, g, sp), rel=F32_RTOL)
    assert surface_dice(p, g, sp, 1.0) == pytest.approx(deepmind_nsd(p, g, sp, 1.0), rel=1e-9)


def test_empty_mask_conventions_and_monai_values():
    z = np.zeros((10, 10, 10), bool)
    m = z.copy()
    m[3:6, 3:6, 3:6] = True
    sp = (1.0, 1.0, 2.0)
    # Both empty: ours Dice 1, distances 0, NSD 1; MONAI gives nan distances.
    assert (dice(z, z), hd95(z, z, sp), assd(z, z, sp), surface_dice(z, z, sp, 2.0)) == (1.0, 0.0, 0.0, 1.0)
    assert np.isnan(monai_hd95(z, z, sp)) and np.isnan(monai_assd(z, z, sp))
    # Exactly one empty: ours Dice 0, distances inf, NSD 0. MONAI gives inf for ASSD but nan
    # for HD95 (torch.quantile interpolates between infinities).
    for p, g in ((m, z), (z, m)):
        assert dice(p, g) == 0.0 and surface_dice(p, g, sp, 2.0) == 0.0
        assert hd95(p, g, sp) == np.inf and assd(p, g, sp) == np.inf
        assert np.isnan(monai_hd95(p, g, sp)) and monai_assd(p, g, sp) == np.inf


def test_components_far_apart_equal_full_volume_reference():
    # Several separate components spread over a larger grid exercise the per-box path.
    g = np.zeros((60, 50, 24), bool)
    p = np.zeros_like(g)
    g[5:12, 5:12, 2:6] = g[40:50, 30:44, 10:20] = g[20:24, 40:45, 18:22] = True
    p[6:12, 5:13, 2:6] = p[41:50, 31:44, 11:20] = p[50:53, 5:8, 3:5] = True
    for sp in ((0.7, 0.9, 2.5), (1.0, 1.0, 1.0)):
        assert hd95(p, g, sp) == pytest.approx(monai_hd95(p, g, sp), rel=F32_RTOL)
        assert assd(p, g, sp) == pytest.approx(monai_assd(p, g, sp), rel=F32_RTOL)
        assert surface_dice(p, g, sp, 2.0) == pytest.approx(deepmind_nsd(p, g, sp, 2.0), rel=1e-9)


def test_bad_inputs_raise_clear_errors():
    m = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        hd95(m, np.ones((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        assd(m, m, (1, 1))
    with pytest.raises(ValueError, match="3D"):
        surface.surface_dice(np.ones((4, 4), bool), np.ones((4, 4), bool), (1, 1, 1), 1.0)


masks = st.integers(0, 2**31 - 1).map(lambda s: blob((14, 12, 8), s, level=0.6, smooth=1.5))
spacings = st.tuples(*[st.floats(0.3, 4.0)] * 3)


@settings(max_examples=10, deadline=None)
@given(masks, masks)
def test_dice_symmetric_and_bounded(a, b):
    d = dice(a, b)
    assert 0.0 <= d <= 1.0
    assert d == dice(b, a)


@settings(max_examples=8, deadline=None)
@given(masks, masks, spacings, st.floats(0.5, 3.0))
@example(blob((14, 12, 8), 0, level=0.6, smooth=1.5), blob((14, 12, 8), 1, level=0.6, smooth=1.5),
         (1.0, 1.0, 0.30000000000000004), 0.8125)  # once failed: a surfel 5 x 0.3 mm from the other at 1.5 mm
def test_distances_translation_invariant_and_scale_with_spacing(a, b, sp, factor):
    big = (24, 22, 16)
    pa, pb = np.zeros(big, bool), np.zeros(big, bool)
    pa[:14, :12, :8], pb[:14, :12, :8] = a, b
    shifted_a, shifted_b = np.roll(pa, (5, 7, 3), (0, 1, 2)), np.roll(pb, (5, 7, 3), (0, 1, 2))
    scaled = tuple(s * factor for s in sp)
    for fn in (hd95, assd):
        v = fn(pa, pb, sp)
        assert fn(shifted_a, shifted_b, sp) == pytest.approx(v, rel=1e-12)
        assert fn(pb, pa, sp) == pytest.approx(v, rel=1e-12)  # both are symmetric
        if np.isfinite(v):
            assert fn(pa, pb, scaled) == pytest.approx(v * factor, rel=1e-9)
    # A tolerance no voxel distance can equal: at an exact tie (e.g. 5 x 0.3 mm against 1.5 mm) scaling
    # both by `factor` may round the two sides differently, and the surfel flips in or out.
    tol = math.pi / 2
    nsd = surface_dice(pa, pb, sp, tol)
    assert surface_dice(shifted_a, shifted_b, sp, tol) == pytest.approx(nsd, rel=1e-12)
    assert surface_dice(pa, pb, scaled, tol * factor) == pytest.approx(nsd, rel=1e-9)
