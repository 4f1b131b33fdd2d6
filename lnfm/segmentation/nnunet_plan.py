"""The network topology nnU-Net's 3d_fullres planner would choose, as MONAI DynUNet arguments.

nnU-Net (Isensee et al., Nature Methods 2021; planner `ExperimentPlanner` of nnU-Net v2)
derives the U-Net from the target spacing and the patch size with these rules:

1. Downsample (stride 2) only the axes whose current spacing is less than twice the
   finest current spacing, and only while the feature map stays at least 4 voxels on
   that axis after halving (a lone axis needs room for one more halving, 3 * 4 voxels).
2. An axis gets a 3-wide kernel once its current spacing is within a factor 2 of the
   finest; before that (a coarse, anisotropic axis) its kernel is 1 wide. The
   bottleneck uses 3 on every axis.
3. Features start at 32 and double per stage, capped at 320.
4. Deep supervision: the decoder has an output at every resolution but the bottleneck's;
   all but the coarsest of them are supervised, with weights halving per stage
   (1, 1/2, 1/4, ...) normalised to sum to 1 (nnU-Net gives the coarsest weight 0).

The patch size is an input here (the benchmark fixes it so every arm sees the same
patches); nnU-Net would also pick it from the median image shape and GPU memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

MIN_FEATURE_MAP = 4
BASE_FEATURES = 32
MAX_FEATURES = 320


@dataclasses.dataclass
class Plan:
    kernel_size: list[list[int]]  # per stage, encoder order (first stage at full resolution)
    strides: list[list[int]]  # per stage; the first is [1, 1, 1]
    filters: list[int]
    deep_supr_num: int  # extra supervised decoder outputs (DynUNet deep_supr_num)
    ds_weights: list[float]  # loss weight of the full-resolution output, then of each extra one

    def dynunet_kwargs(self) -> dict:
        return {"kernel_size": self.kernel_size, "strides": self.strides, "upsample_kernel_size": self.strides[1:],
                "filters": self.filters, "norm_name": ("INSTANCE", {"affine": True}),
                "act_name": ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                "deep_supervision": self.deep_supr_num > 0, "deep_supr_num": max(self.deep_supr_num, 1),
                "res_block": False}


def plan_3d_fullres(spacing: Sequence[float], patch: Sequence[int]) -> Plan:
    """nnU-Net's topology for `spacing` (mm per axis) and `patch` (voxels per axis)."""
    cur_spacing, cur_size = [float(s) for s in spacing], [int(p) for p in patch]
    dims = len(cur_spacing)
    kernel = [1] * dims
    kernels, strides = [], [[1] * dims]
    while True:
        room = [d for d in range(dims) if cur_size[d] >= 2 * MIN_FEATURE_MAP]
        if not room:
            break
        finest = min(cur_spacing[d] for d in room)
        axes = [d for d in room if cur_spacing[d] / finest < 2]
        if len(axes) == 1 and cur_size[axes[0]] < 3 * MIN_FEATURE_MAP:
            break
        finest_all = min(cur_spacing)
        kernel = [3 if (k == 3 or cur_spacing[d] / finest_all < 2) else 1 for d, k in enumerate(kernel)]
        kernels.append(list(kernel))
        strides.append([2 if d in axes else 1 for d in range(dims)])
        for d in axes:
            cur_spacing[d] *= 2
            cur_size[d] = -(-cur_size[d] // 2)
    kernels.append([3] * dims)
    stages = len(strides)
    filters = [min(BASE_FEATURES * 2 ** i, MAX_FEATURES) for i in range(stages)]
    n_ds = max(stages - 3, 0)  # decoder outputs: stages - 1, the coarsest unsupervised, the first is the main one
    w = [1 / 2 ** i for i in range(n_ds + 1)]
    return Plan(kernels, strides, filters, n_ds, [x / sum(w) for x in w])
