"""Fixtures of the hostile-input suite; the harness itself (cases, the world, the checks) is
`harness.py`, which the test modules import by a name no other test folder uses."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))  # export_helpers: the tiny model

from export_helpers import tiny  # noqa: E402,F401  (session fixture, shared with tests/jobs)
from harness import SHARED, World  # noqa: E402
from inputs import labelled_store  # noqa: E402


@pytest.fixture(scope="session")
def world(tiny, tmp_path_factory) -> World:  # noqa: F811
    from lnfm.jobs.export import export_model

    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    root = tmp_path_factory.mktemp("hostile_world")
    safetensors = export_model(tiny.workdir, root / "export_safetensors", "safetensors")
    stablehlo = export_model(tiny.workdir, root / "export_stablehlo", "stablehlo")
    scan = root / "scan.nii.gz"
    shutil.copy(tiny.raw / "imagesTr" / f"{tiny.records[0]['case_id']}_0000.nii.gz", scan)
    ft_store = _finetune_store(root)
    tiny_root = Path(tiny.store).parent
    return World(root, tiny.raw, tiny.store, ft_store, tiny.workdir, tiny.orbax, safetensors, stablehlo, scan,
                 [root, tiny_root])


def _finetune_store(root: Path) -> str:
    return labelled_store(root / "ft_raw", root / "ft_store")
