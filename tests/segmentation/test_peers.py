"""lnfm.segmentation.peers and nnunet_plan: nnU-Net's planning rules and the MONAI peers built from them."""

import pytest

from lnfm.segmentation.nnunet_plan import plan_3d_fullres

pytest.importorskip("monai")


def test_isotropic_plan_pools_every_axis_down_to_four_voxels():
    plan = plan_3d_fullres((1.5, 1.5, 1.5), (96, 96, 96))  # 96 -> 48 -> 24 -> 12 -> 6 (>= 4, no further halving)
    assert plan.strides == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert plan.kernel_size == [[3, 3, 3]] * 5
    assert plan.filters == [32, 64, 128, 256, 320]
    # 4 decoder outputs (1, 1/2, 1/4, 1/8); the coarsest is unsupervised: weights 1, 1/2, 1/4 normalised.
    assert plan.deep_supr_num == 2
    assert plan.ds_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_anisotropic_plan_keeps_the_thick_axis_until_it_is_within_factor_two():
    # 0.8 x 0.8 x 3 mm: z is 3.75x coarser, so stage 1 pools x, y only with a 3x3x1 kernel; after one
    # halving x, y are 1.6 mm (z 3.0 < 2 x 1.6), so from then on all three are pooled with 3x3x3.
    # z: 48 -> 24 -> 12 -> 6, then too small; x, y: 160 -> 80 -> 40 -> 20 -> 10 -> 5.
    plan = plan_3d_fullres((0.8, 0.8, 3.0), (160, 160, 48))
    assert plan.kernel_size == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plan.strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert plan.filters == [32, 64, 128, 256, 320, 320]


def test_dynunet_from_the_plan_trains_with_deep_supervision():
    import torch

    from lnfm.segmentation.peers import Budget, build_peer, probability_fn, train_peer

    peer = build_peer("dynunet", 1, 2, (1.5, 1.5, 1.5), (32, 32, 32), seed=0)
    assert peer.ds_weights == pytest.approx([2 / 3, 1 / 3])  # 32 -> 16 -> 8 -> 4: 4 stages
    out = peer.net(torch.zeros(1, 1, 32, 32, 32))
    assert tuple(out.shape) == (1, 2, 2, 32, 32, 32)  # main output + 1 supervised one, at full size
    rng = torch.Generator().manual_seed(0)

    def batches():
        while True:
            label = (torch.rand(2, 32, 32, 32, generator=rng) > 0.7).numpy().astype("int32")
            yield {"image": label[..., None].astype("float32"), "label": label}

    before = [p.detach().clone() for p in peer.net.parameters()]
    done = train_peer(peer, batches(), Budget(steps=2))
    assert done["steps"] == 2 and done["final_loss"] == done["final_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, peer.net.parameters()))
    probs = probability_fn(peer)(label_patch := batches().__next__()["image"])
    assert probs.shape == (*label_patch.shape[:4], 2) and abs(float(probs.sum(-1).mean()) - 1) < 1e-5


def test_the_peers_loss_leaves_out_ignored_voxels_as_if_they_were_cropped_away():
    """With node paste, labels outside a shell around the pasted node are IGNORE_LABEL. The peers' Dice + CE
    over the rest must equal MONAI's DiceCELoss on a batch cropped to the scored box, and the logits at
    ignored voxels must neither change the loss nor get a gradient."""
    import torch
    from monai.losses import DiceCELoss

    from lnfm.data.paste import IGNORE_LABEL
    from lnfm.segmentation.peers import DiceCE

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, 8, generator=gen, requires_grad=True)
    y = (torch.rand(2, 1, 8, 8, 8, generator=gen) > 0.7).long()
    box = (slice(None), slice(None), slice(2, 6), slice(1, 7), slice(3, 8))
    masked = torch.full_like(y, IGNORE_LABEL)
    masked[box] = y[box]
    loss = DiceCE()(logits, masked)
    reference = DiceCELoss(to_onehot_y=True, softmax=True)(logits[box], y[box])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    outside = torch.ones_like(logits, dtype=torch.bool)
    outside[box] = False
    assert float(logits.grad[outside].abs().max()) == 0.0 and float(logits.grad[box].abs().max()) > 0
    changed = logits.detach().clone()
    changed[outside] = 50.0
    assert float(DiceCE()(changed, masked)) == pytest.approx(float(loss), rel=1e-6)
    # Without ignored voxels it is MONAI's loss on the whole batch.
    assert float(DiceCE()(logits, y)) == pytest.approx(float(DiceCELoss(to_onehot_y=True, softmax=True)(logits, y)))
