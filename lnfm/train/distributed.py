"""Multi-process start-up: `jax.distributed.initialize` from flags, env vars or the cluster.

`initialize()` must run before any other JAX call (jax refuses to join a
cluster once a backend exists). Sources, first match wins:

1. Explicit arguments (the `--coordinator --num-processes --process-id` flags).
2. Environment variables set by `launch/local.sh` or any launcher:
   - `LNFM_COORDINATOR`    host:port of process 0 (e.g. `localhost:12355`)
   - `LNFM_NUM_PROCESSES`  total number of processes
   - `LNFM_PROCESS_ID`     rank of this process, 0 .. N-1
   - `LNFM_LOCAL_DEVICE_IDS` optional comma list of the devices this process owns
3. Cluster auto-detection, handed to jax's own detectors:
   - SLURM (`SLURM_JOB_ID` with more than one task in `SLURM_NTASKS`)
   - Cloud TPU pods (`TPU_WORKER_HOSTNAMES` naming several hosts, or `MEGASCALE_COORDINATOR_ADDRESS`)
   - Kubernetes JobSet (`JOBSET_NAME` + `JOB_COMPLETION_INDEX`): the coordinator is pod 0 of
     the first replicated job, the rank is the completion index, and the process count comes
     from `LNFM_NUM_PROCESSES` (JobSet does not export it).
   - Open MPI (`OMPI_MCA_orte_hnp_uri`).

With none of these a single process runs and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from lnfm.errors import LnfmError

log = logging.getLogger("lnfm.train")

JOBSET_PORT = 8476


class DistributedConfigError(LnfmError, ValueError):
    """Inconsistent multi-process settings (flags or environment)."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How this process joins the job (all None = let jax detect the cluster)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    source: str = "single"  # flags | env | slurm | tpu | jobset | mpi | single


def add_arguments(ap) -> None:
    """The explicit multi-process flags every job takes (clusters are detected without them)."""
    ap.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process runs)")
    ap.add_argument("--num-processes", type=int, default=None, help="total processes (multi-process runs)")
    ap.add_argument("--process-id", type=int, default=None, help="rank of this process (multi-process runs)")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _device_ids(value: str) -> tuple[int, ...]:
    ids = value.split(",")
    if not all(i.strip().isdigit() for i in ids):
        raise DistributedConfigError(
            f"environment variable LNFM_LOCAL_DEVICE_IDS={value!r} is not a comma list of device numbers (e.g. 0,1)")
    return tuple(int(i) for i in ids)


def _checked(spec: ProcessSpec, names: tuple[str, str, str]) -> ProcessSpec:
    """`spec` when its coordinator, count and rank can form a job; else one line naming the option or
    variable (`names`: coordinator, count, rank). Plain checks only: no JAX call may precede `initialize`."""
    coord, count, rank = names
    host, _, port = (spec.coordinator or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"{coord}={spec.coordinator!r} is not host:port (e.g. localhost:12355)")
    if spec.num_processes < 1:
        raise DistributedConfigError(f"{count}={spec.num_processes}: the job needs at least 1 process")
    if not 0 <= spec.process_id < spec.num_processes:
        raise DistributedConfigError(f"{rank}={spec.process_id} is not a rank of a {spec.num_processes}-process "
                                     f"job (0 to {spec.num_processes - 1}, from {count})")
    return spec


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> ProcessSpec:
    """Decide how (and whether) to join a multi-process job, without touching JAX."""
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        if None in (coordinator, num_processes, process_id):
            raise DistributedConfigError("--coordinator, --num-processes and --process-id must be given together")
        return _checked(ProcessSpec(coordinator, int(num_processes), int(process_id), None, "flags"),
                        ("--coordinator", "--num-processes", "--process-id"))
    env = os.environ
    if env.get("LNFM_COORDINATOR") or env.get("LNFM_PROCESS_ID"):  # LNFM_NUM_PROCESSES alone serves JobSet
        n, pid = _int_env("LNFM_NUM_PROCESSES"), _int_env("LNFM_PROCESS_ID")
        if not env.get("LNFM_COORDINATOR") or n is None or pid is None:
            raise DistributedConfigError(
                "LNFM_COORDINATOR, LNFM_NUM_PROCESSES and LNFM_PROCESS_ID must be set together")
        ids = env.get("LNFM_LOCAL_DEVICE_IDS")
        local = _device_ids(ids) if ids else None
        return _checked(ProcessSpec(env["LNFM_COORDINATOR"], n, pid, local, "env"),
                        ("LNFM_COORDINATOR", "LNFM_NUM_PROCESSES", "LNFM_PROCESS_ID"))
    if "SLURM_JOB_ID" in env and (_int_env("SLURM_NTASKS") or 1) > 1:
        return ProcessSpec(source="slurm")
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return ProcessSpec(source="tpu")
    if env.get("JOBSET_NAME") and env.get("JOB_COMPLETION_INDEX") not in (None, ""):
        n = _int_env("LNFM_NUM_PROCESSES")
        if n is None:
            raise DistributedConfigError("Kubernetes JobSet detected: set LNFM_NUM_PROCESSES to the number of pods")
        job, rjob = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "workers")
        coord = f"{job}-{rjob}-0-0.{job}:{JOBSET_PORT}"
        rank = _int_env("JOB_COMPLETION_INDEX")
        return _checked(ProcessSpec(coord, n, rank, None, "jobset"),
                        ("JOBSET_NAME", "LNFM_NUM_PROCESSES", "JOB_COMPLETION_INDEX"))
    if "OMPI_MCA_orte_hnp_uri" in env:
        return ProcessSpec(source="mpi")
    return ProcessSpec()


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> ProcessSpec:
    """Join the multi-process job if there is one; returns what was detected."""
    spec = detect(coordinator, num_processes, process_id)
    if spec.source == "single":
        return spec
    import jax

    if jax.distributed.is_initialized():
        return spec
    if spec.source in ("slurm", "tpu", "mpi"):
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                   local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None)
    log.info("joined %s job as process %d of %d", spec.source, jax.process_index(), jax.process_count())
    return spec
