"""Where the optional shared data folder (real CTs, a DICOM series, real lymph-node masks) lives.

By default it is `../shared/data` beside the repository, as on the project's
machines. `LNFM_SHARED_DATA` overrides it: a folder path, or an empty value (or
`none`) to hide it, which is how CI runs the tests of a user's fresh clone
that has no such folder.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "LNFM_SHARED_DATA"
DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_data_dir() -> Path | None:
    """The shared data folder, or None when it is absent or hidden through LNFM_SHARED_DATA."""
    value = os.environ.get(ENV)
    if value is None:
        path = DEFAULT
    elif value.strip().lower() in ("", "none"):
        return None
    else:
        path = Path(value).expanduser()
    return path if path.is_dir() else None
