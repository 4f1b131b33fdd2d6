"""The two kinds of expected failure; anything else raised is a bug and keeps its traceback.

`python -m lnfm <job>` (lnfm/cli.py) is the one place that turns them into exit codes:
an `LnfmError` prints its one-line message and exits 2, a `NonFiniteLoss` exits 3.
"""

from __future__ import annotations


class LnfmError(Exception):
    """A user error (bad input file, option or folder). The message is one line that names the
    file or option and the problem, e.g. 'scan.nii.gz: not a 3-D image'."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or Inf; the job stops and keeps its last good checkpoint."""


class DataError(LnfmError, ValueError):
    """A dataset (store, manifest, mask folder) that is missing, empty, unreadable or unfit for the job."""


class WeightsMismatch(LnfmError, ValueError):
    """Saved weights (an export, a MONAI state dict) that do not fit the architecture they are loaded into."""
