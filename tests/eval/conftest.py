"""Fixtures of the evaluation tests."""

import pytest

from eval_inputs import read_node_mask


@pytest.fixture(scope="session")
def real_nodes(shared_data):
    """Four real node masks (two mediastinal, two abdominal), cropped for speed."""
    paths = sorted((shared_data / "ln_masks" / "NIH_LN_MED").glob("*.zip"))[:2]
    paths += sorted((shared_data / "ln_masks" / "NIH_LN_ABD").glob("*.zip"))[:2]
    if len(paths) < 4:
        pytest.skip("real node masks not found")
    return [read_node_mask(p) for p in paths]
