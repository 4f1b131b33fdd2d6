"""Test harness: 8 virtual CPU devices, absl flags parsed, shared-data fixtures.

XLA_FLAGS must be set before JAX initialises its backend, so this runs first.
Tests that read the shared data folder (`lnfm.data.shared`: ../shared/data, or
LNFM_SHARED_DATA) or whose phantoms change with it carry the `shared` marker;
`make test` runs them a second time with the folder hidden (LNFM_SHARED_DATA=),
as on a user's fresh clone.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Many tests, and the jobs they start in subprocesses, compile the same programs (a segmenter's step,
# an export): one compilation cache for the whole run compiles each once. xdist's workers and every
# subprocess inherit it from the first process, which removes it at exit. A cache set by the caller is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lnfm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# The small test models compile in under JAX's default 1 s threshold, and many tests rebuild the same ones:
# caching programs from 0.2 s took tests/models and tests/segmentation from 174 to 159 s on 2 cores.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags; mark them parsed so they do not abort.
flags.FLAGS.mark_as_parsed()

from lnfm.data.shared import ENV, shared_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests that need its real files skip when it is absent or hidden."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(f"needs the real files of ../shared/data (absent, or hidden by {ENV})")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
