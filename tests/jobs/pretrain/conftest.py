"""Phantom CT store for the pretraining-job tests (written once per test session and worker)."""

from __future__ import annotations

import pytest

from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.data.synth import SynthConfig, write_dataset

SPACING = (1.5, 1.5, 1.5)


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory) -> str:
    """Four small labelled pelvis phantoms prepared at 1.5 mm; pretraining ignores the labels."""
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(SynthConfig(site="pelvis", num_cases=4, seed=0, shape=(64, 64, 24), gallery=False,
                              use_real_shapes=False), root / "raw")
    store = str(root / "store")
    result = prepare_dataset(str(root / "raw"), store, PrepareConfig(workers=0, salt="test", spacing=SPACING),
                             show_progress=False)
    assert result.ok, result.failures
    return store
