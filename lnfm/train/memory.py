"""Memory of a training step on a CPU host, and the one-line refusal of a step the host cannot hold.

On a CPU backend a step larger than the machine does not fail: the loader and XLA fill the memory until
the kernel kills the job (exit 137, no message). The jobs estimate a step's memory before the workdir is
written and refuse it here. Accelerators report their own out-of-memory when the step compiles.
"""

from __future__ import annotations

import logging

from lnfm.config import ConfigError
from lnfm.io.host_memory import GIB, host_memory

log = logging.getLogger("lnfm")

# XLA temporaries per voxel of a patch, forward and backward, above every step measured on a CPU (2026-12-06):
# finetuning at 2 x 32^3, ViT-tiny with the linear head 73 B, fine 1092 B, UNETR 2544 B, light 6756 B, Swin-tiny
# with UNETR 14333 B; pretraining, vit_tiny 62 B, vit_b 266 B, swin_b 6639 B. A step below half the free memory
# at this figure is not compiled to check (5-30 s); its batches are always counted.
HEAVIEST_PER_VOXEL = 16 * 1024


def cpu_host_memory(memory: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """`memory` or the host's (total, available) when the step runs on a CPU; None on an accelerator (it reports
    its own out-of-memory) or where the host's memory cannot be read: no check then."""
    import jax  # here, not at the top: predict reads host_memory and must start without JAX

    if jax.default_backend() != "cpu":
        return None
    return memory or host_memory()


def worth_compiling(batches: int, micro_voxels: int, memory: tuple[int, int]) -> bool:
    """Whether to compile the step to count its activations: its batches alone fit the host, and at the
    heaviest figure per voxel it could need half the free memory."""
    return batches <= memory[0] and micro_voxels * HEAVIEST_PER_VOXEL > memory[1] / 2


def memory_figures(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled executable, in bytes."""
    m = compiled.memory_analysis()
    fig = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    # Donated state: outputs reuse the argument buffers (alias), so only the rest is extra.
    fig["peak"] = fig["argument"] + fig["output"] - fig["alias"] + fig["temp"] + fig["generated_code"]
    return fig


def judge_host_memory(need: dict[str, int], memory: tuple[int, int], what: str, advice: str) -> None:
    """Refuse (ConfigError, one line) when the parts of `need` add up to more than the host's total memory;
    warn when they exceed what was free at the start. `what` names the setting, `advice` what to lower."""
    total, available = memory
    size = (f"{what}: a step needs about {sum(need.values()) / GIB:.1f} GiB on this host ("
            + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in need.items()) + ")")
    if sum(need.values()) > total:
        raise ConfigError(f"{size}, more than its {total / GIB:.1f} GiB: {advice}")
    if sum(need.values()) > available:
        log.warning("%s, more than the %.1f GiB free now: it may be killed for memory", size, available / GIB)
