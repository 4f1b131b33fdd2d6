"""Fixtures shared by the finetuning jobs' tests."""

import numpy as np
import pytest
from sphere_cases import unlabelled_store, write_spheres

from lnfm.data.prepare import PrepareConfig, prepare_dataset


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A labelled sphere store (train / val / test) and an unlabelled one of other sphere scans,
    with those scans' true masks kept aside to score the pseudo-labels against."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("selftrain")
    write_spheres(root / "lab", 10, seed=7)
    labelled = str(root / "labelled")
    prepare_dataset(str(root / "lab"), labelled, PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0, crop_body=False,
                                                               split_fractions=(0.6, 0.2, 0.2)), show_progress=False)
    unlabelled = str(root / "unlabelled")
    images = unlabelled_store(root / "unl", unlabelled, 6, seed=11)
    truths = [(np.asarray(nib.load(p).dataobj), np.asarray(nib.load(str(p).replace("imagesTr", "labelsTr")
                                                                   .replace("_0000", "")).dataobj)) for p in images]
    return labelled, unlabelled, truths
