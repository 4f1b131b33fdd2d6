"""The `head` section of a finetuning config, also model.json's `head` (`lnfm.jobs.export_meta`).

Here, below the jobs, so that an export's metadata is typed with the very class finetuning
trains with and both are read by the config system's own loader (`lnfm.config.from_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass
class HeadConfig:
    kind: Literal["unetr", "light", "fine", "linear"] = "light"  # decoder head (lnfm.models.heads)
    deep_supervision: bool = False  # also supervise the head's coarser outputs
    options: dict[str, Any] = dataclasses.field(  # extra head arguments, e.g. feature_size: 8 for unetr
        default_factory=dict)
