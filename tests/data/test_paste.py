"""Node paste: the site rule, the blend and the labels, by hand; the loader's pasted patches."""

from __future__ import annotations

import numpy as np
import pytest
from test_loader import PLAIN, _store

from lnfm.data import store as st
from lnfm.data.loader import PatchSampler
from lnfm.data.paste import IGNORE_LABEL, augment_donor, paste_node, paste_site


def _ball(r: int) -> np.ndarray:
    g = np.indices((2 * r + 1,) * 3) - r
    return (g ** 2).sum(0) <= r * r


def test_site_is_in_fat_or_none():
    host = np.full((20, 20, 20), 50.0, np.float32)  # muscle
    host[12:, :, :] = -100.0  # fat in x >= 12
    mask = _ball(2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        at = paste_site(host, mask, rng, tries=50)
        assert at is not None
        under = host[at[0]:at[0] + 5, at[1]:at[1] + 5, at[2]:at[2] + 5][mask]
        assert np.mean(under == -100.0) >= 0.7
    assert paste_site(np.full((20, 20, 20), 50.0), mask, rng) is None  # no fat anywhere
    assert paste_site(host, np.ones((21, 5, 5), bool), rng) is None  # larger than the patch


def test_paste_blends_the_node_and_labels_a_shell():
    host = np.full((24, 24, 24, 1), -100.0, np.float32)
    donor = np.full((7, 7, 7, 1), 60.0, np.float32)
    donor_label = np.zeros((7, 7, 7), np.int32)
    donor_label[1:6, 1:6, 1:6] = _ball(2) * 2  # class 2
    at = np.array([8, 8, 8])
    image, label = paste_node(host, donor, donor_label, at, margin=3)
    node = np.zeros((24, 24, 24), bool)
    node[9:14, 9:14, 9:14] = _ball(2)
    np.testing.assert_array_equal(image[node, 0], 60.0)  # the node's voxels are the donor's
    assert image[0, 0, 0, 0] == -100.0  # far from the node: the host's
    edge = image[8, 11, 11, 0]  # one voxel outside the ball along x: feathered, between the two
    assert -100.0 <= edge < 60.0
    assert np.all(label[node] == 2) and np.sum(label == 2) == node.sum()
    # Shell: L1 distance <= 3 from the node (binary dilation with the 6-neighbourhood) is background.
    assert label[11, 11, 11 + 2 + 3] == 0 and label[11, 11, 11 + 2 + 4] == IGNORE_LABEL
    assert label[0, 0, 0] == IGNORE_LABEL and image.shape == host.shape


def test_paste_edge_is_a_gaussian_of_the_mask():
    from scipy import ndimage

    host = np.zeros((16, 16, 16, 1), np.float32)
    donor = np.ones((5, 5, 5, 1), np.float32)
    lab = np.zeros((5, 5, 5), np.int32)
    lab[1:4, 1:4, 1:4] = 1
    image, _ = paste_node(host, donor, lab, np.array([5, 5, 5]), margin=0)
    alpha = np.maximum(ndimage.gaussian_filter(lab.astype(np.float32), 0.7), lab)
    np.testing.assert_allclose(image[5:10, 5:10, 5:10, 0], alpha, atol=1e-6)
    assert np.all(image[:5] == 0) and np.all(image[10:] == 0)


def test_donor_flips_move_image_and_label_together():
    label = np.zeros((9, 7, 5), np.uint8)
    label[1:4, 1:3, 1:2] = 1  # a node in the low corner
    image = np.where(label, 70.0, -100.0).astype(np.float32)[..., None]
    seen = set()
    rng = np.random.default_rng(1)
    for _ in range(40):
        img, lab = augment_donor(image, label, rng, flip=True, zoom=0.0, max_size=np.array([16, 16, 16]))
        assert lab.shape == label.shape and lab.sum() == label.sum()
        np.testing.assert_array_equal(img[..., 0] == 70.0, lab == 1)
        corner = tuple(int(np.argwhere(lab)[:, a].min() == 1) for a in range(3))  # 1: still at the low end
        seen.add(corner)
    assert len(seen) == 8  # every combination of axis flips occurs


def test_donor_zoom_scales_the_node_within_the_range_and_crops_to_the_patch():
    label = np.zeros((21, 21, 21), np.uint8)
    label[2:19, 2:19, 2:19] = _ball(8)  # 2109 voxels
    image = np.where(label, 70.0, -100.0).astype(np.float32)[..., None]
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(30):
        img, lab = augment_donor(image, label, rng, flip=False, zoom=0.25, max_size=np.array([32, 32, 32]))
        ratio = lab.sum() / label.sum()
        edge = round(lab.shape[0] / 21, 2)  # the box's zoom, in whole voxels; the node's volume follows its cube
        assert 0.8 - 0.03 <= edge <= 1.25 + 0.03
        assert ratio == pytest.approx(edge ** 3, rel=0.1)
        inside = img[..., 0] > -15.0  # above the midpoint of linear interpolation
        assert (inside & (lab == 1)).sum() * 2 / (inside.sum() + lab.sum()) > 0.95  # image and label agree
        ratios.append(ratio)
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # both shrinking and growing occur
    _, lab = augment_donor(image, label, np.random.default_rng(0), flip=False, zoom=3.0,
                           max_size=np.array([12, 14, 24]))
    assert lab.shape[0] <= 12 and lab.shape[1] <= 14


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Donors: 48^3 cases with a 5^3 node of 70 HU; hosts: bodies of exactly -100 HU (fat), no labels used."""
    donors = _store(tmp_path_factory.mktemp("donor"), [(48, 48, 48)], node=2)
    hosts = _store(tmp_path_factory.mktemp("host"), [(48, 48, 48), (40, 44, 40)], body_hu=-100, node=0)
    return donors, hosts


def test_loader_pastes_labelled_nodes_into_fat(stores):
    donors, hosts = stores
    import dataclasses

    cfg = dataclasses.replace(PLAIN, paste_p=1.0, paste_margin=2)
    cases = [[r for r in st.read_manifest(donors) if r.get("label_path")]]
    host_recs = [(hosts, r) for r in st.read_manifest(hosts)]
    sampler = PatchSampler([donors], cases, [1.0], cfg, True, host_recs)
    lo, hi = cfg.hu_window
    node_value, fat_value = (70 - lo) / (hi - lo), (-100 - lo) / (hi - lo)
    for i in range(8):
        out = sampler.random_map(i, np.random.default_rng(i))
        image, label = out["image"][..., 0], out["label"]
        assert label.shape == cfg.patch_size and (label == 1).sum() == 125  # the whole 5^3 node
        np.testing.assert_allclose(image[label == 1], node_value, atol=1e-6)
        assert (label == IGNORE_LABEL).any() and (label == 0).any()
        # Away from the node every voxel is the host's: its fat body or the air around it.
        far = image[label == IGNORE_LABEL]
        # (the feathered edge's tail reaches past a 2-voxel shell at under 3 % of the node's contrast)
        assert np.all(np.isclose(far, fat_value, atol=0.03 * (node_value - fat_value)) | (far < 0.01))


def test_loader_without_hosts_draws_as_before(stores):
    donors, hosts = stores
    cases = [[r for r in st.read_manifest(donors) if r.get("label_path")]]
    plain = PatchSampler([donors], cases, [1.0], PLAIN, True)
    off = PatchSampler([donors], cases, [1.0], PLAIN, True, [])
    for i in range(4):
        a, b = plain.random_map(i, np.random.default_rng(i)), off.random_map(i, np.random.default_rng(i))
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
        assert (a["label"] >= 0).all()
