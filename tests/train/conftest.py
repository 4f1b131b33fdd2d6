"""Fixtures for train-core tests."""

import pytest

from train_toy import make_mesh


@pytest.fixture
def mesh8():
    return make_mesh(8)
