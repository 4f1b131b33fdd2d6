"""Bright spheres in noisy fat beside a bright slab: a segmentation task a tiny model learns in a
few hundred steps (shared by the finetuning and self-training tests)."""

import json
import shutil
from pathlib import Path

import numpy as np

SHAPE = (32, 32, 24)
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])  # RAS at the stores' 1.5 mm: prepare keeps the arrays as written
# A finetuning recipe that learns the spheres in a few hundred steps on a tiny ViT.
TINY_FINETUNE = ["site.patch=[16,16,16]", "model.img_size=[16,16,16]", "model.patch_size=[4,4,4]", "model.depth=1",
        "train.global_batch=8", "head.kind=linear", "strategy.freeze=none", "checkpoint.every=0",
        "inference.sw_batch_size=8", "inference.overlap=0.25", "optim.warmup_steps=10", "train.log_every=50",
        "train.steps=200", "optim.lr=3e-3", "train.eval_every=100"]


def write_spheres(raw: Path, count: int, seed: int, prefix: str = "s") -> None:
    """`count` nnU-Net-style cases (imagesTr/, labelsTr/, dataset.json) of 60 HU spheres in -100 HU fat."""
    import nibabel as nib

    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                  "site": "pelvis"}))
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    for i in range(count):
        img = rng.normal(-100, 15, SHAPE)
        img[:, :4] = rng.normal(200, 20, (SHAPE[0], 4, SHAPE[2]))  # a bright slab the model must not call a node
        lab = np.zeros(SHAPE, np.uint8)
        for _ in range(3):
            c, r = rng.uniform([8, 10, 6], [24, 24, 18]), rng.uniform(2.5, 4.0)
            inside = np.linalg.norm(grid - c, axis=-1) <= r
            img[inside] = rng.normal(60, 15, int(inside.sum()))
            lab[inside] = 1
        nib.save(nib.Nifti1Image(img.astype(np.int16), AFFINE), raw / "imagesTr" / f"{prefix}{i:02d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, AFFINE), raw / "labelsTr" / f"{prefix}{i:02d}.nii.gz")


def unlabelled_store(raw: Path, store: str, count: int, seed: int) -> list[Path]:
    """`count` sphere scans (ids u00, u01, ...) written under `raw`, listed without labels in `raw`.csv beside it
    and prepared at 1.5 mm into `store`, which is made anew (another seed: other scans under the same ids).
    Returns the scans' image paths."""
    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    write_spheres(raw, count, seed=seed, prefix="u")
    images = [raw / "imagesTr" / f"u{i:02d}_0000.nii.gz" for i in range(count)]
    csv = raw.parent / f"{raw.name}.csv"
    csv.write_text("case_id,image,label,site,split\n" + "".join(f"u{i:02d},{p},,pelvis,train\n"
                                                               for i, p in enumerate(images)))
    shutil.rmtree(store, ignore_errors=True)
    prep = PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0, crop_body=False)
    assert prepare_dataset(str(csv), store, prep, show_progress=False).ok
    return images
