import pytest

from lnfm.train import distributed

CLUSTER_VARS = ["LNFM_COORDINATOR", "LNFM_NUM_PROCESSES", "LNFM_PROCESS_ID", "LNFM_LOCAL_DEVICE_IDS", "SLURM_JOB_ID",
                "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JOBSET_NAME",
                "JOB_COMPLETION_INDEX", "REPLICATED_JOB_NAME", "OMPI_MCA_orte_hnp_uri"]


@pytest.fixture
def clean_env(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_by_default(clean_env):
    spec = distributed.detect()
    assert spec.source == "single"
    assert distributed.initialize() == spec  # nothing to join, no JAX call


def test_flags_win_and_must_come_together(clean_env):
    clean_env.setenv("LNFM_COORDINATOR", "other:1")
    spec = distributed.detect("host:1234", 4, 2)
    assert (spec.source, spec.coordinator, spec.num_processes, spec.process_id) == ("flags", "host:1234", 4, 2)
    with pytest.raises(ValueError, match="together"):
        distributed.detect("host:1234", None, 0)


def test_lnfm_env_vars(clean_env):
    clean_env.setenv("LNFM_COORDINATOR", "localhost:5000")
    clean_env.setenv("LNFM_NUM_PROCESSES", "2")
    clean_env.setenv("LNFM_PROCESS_ID", "1")
    clean_env.setenv("LNFM_LOCAL_DEVICE_IDS", "2,3")
    spec = distributed.detect()
    assert (spec.source, spec.coordinator, spec.num_processes, spec.process_id, spec.local_device_ids) == (
        "env", "localhost:5000", 2, 1, (2, 3))
    clean_env.delenv("LNFM_PROCESS_ID")
    with pytest.raises(ValueError, match="LNFM_PROCESS_ID"):
        distributed.detect()


def test_cluster_detection(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "77")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed.detect().source == "single"  # a one-task SLURM job is a single process
    clean_env.setenv("SLURM_NTASKS", "8")
    assert distributed.detect().source == "slurm"
    clean_env.delenv("SLURM_JOB_ID")
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
    assert distributed.detect().source == "tpu"
    clean_env.delenv("TPU_WORKER_HOSTNAMES")
    clean_env.setenv("JOBSET_NAME", "lnfm")
    clean_env.setenv("JOB_COMPLETION_INDEX", "3")
    with pytest.raises(ValueError, match="LNFM_NUM_PROCESSES"):
        distributed.detect()
    clean_env.setenv("LNFM_NUM_PROCESSES", "4")
    spec = distributed.detect()
    assert (spec.source, spec.process_id, spec.num_processes) == ("jobset", 3, 4)
    assert spec.coordinator.startswith("lnfm-workers-0-0.lnfm:")
