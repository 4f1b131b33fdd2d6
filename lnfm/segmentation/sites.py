"""Anatomical site presets: spacing, patch, intensity window, labels, default head and strategy.

A preset is a partial finetuning config in `lnfm/configs/sites/<site>.yaml`
(shipped in the wheel); the YAML comments give the rationale of each value.
The `site` section is described by `SiteConfig`.
"""

from __future__ import annotations

import dataclasses

from lnfm.config import CONFIG_DIR

SITES = ("head_neck", "axilla", "mediastinum", "abdomen", "pelvis")


@dataclasses.dataclass
class SiteConfig:
    name: str = "pelvis"  # anatomical site of the preset
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # voxel spacing (mm, X Y Z) the store is prepared at
    patch: tuple[int, int, int] = (96, 96, 96)  # training patch and sliding-window ROI in voxels (X, Y, Z)
    window: tuple[float, float] = (-160.0, 240.0)  # CT HU window (lo, hi) mapped to [0, 1]
    labels: list[str] = dataclasses.field(  # class names; index = label value
        default_factory=lambda: ["background", "lymph_node"])
    stations: list[str] = dataclasses.field(  # nodal stations of the region (documentation and reports)
        default_factory=list)


def site_names() -> list[str]:
    """Packaged site presets."""
    return sorted(p.stem for p in (CONFIG_DIR / "sites").glob("*.yaml"))
