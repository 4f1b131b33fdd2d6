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


@pytest.mark.parametrize("flags, says", [
    (("localhost:12356", 2, 5), "--process-id=5 is not a rank of a 2-process job (0 to 1, from --num-processes)"),
    (("localhost:12356", 0, 0), "--num-processes=0: the job needs at least 1 process"),
    (("localhost:12356", 2, -1), "--process-id=-1 is not a rank"),
    (("nonsense", 1, 0), "--coordinator='nonsense' is not host:port"),
    ((":12355", 1, 0), "--coordinator=':12355' is not host:port"),
    (("localhost:port", 1, 0), "--coordinator='localhost:port' is not host:port"),
    (("localhost:70000", 1, 0), "--coordinator='localhost:70000' is not host:port"),
])
def test_flags_that_form_no_job_are_refused_naming_the_flag(clean_env, flags, says):
    # each was jax's ValueError or IndexError (a traceback) from jax.distributed.initialize
    with pytest.raises(distributed.DistributedConfigError) as e:
        distributed.initialize(*flags)
    assert says in str(e.value)


@pytest.mark.parametrize("env, says", [
    ({"LNFM_LOCAL_DEVICE_IDS": "gpu0"}, "LNFM_LOCAL_DEVICE_IDS='gpu0' is not a comma list of device numbers"),
    ({"LNFM_LOCAL_DEVICE_IDS": "0,,1"}, "LNFM_LOCAL_DEVICE_IDS='0,,1'"),
    ({"LNFM_PROCESS_ID": "2"}, "LNFM_PROCESS_ID=2 is not a rank of a 2-process job (0 to 1, from LNFM_NUM_PROCESSES)"),
    ({"LNFM_NUM_PROCESSES": "0"}, "LNFM_NUM_PROCESSES=0: the job needs at least 1 process"),
    ({"LNFM_COORDINATOR": "localhost"}, "LNFM_COORDINATOR='localhost' is not host:port"),
])
def test_env_that_forms_no_job_is_refused_naming_the_variable(clean_env, env, says):
    for name, value in {"LNFM_COORDINATOR": "localhost:5000", "LNFM_NUM_PROCESSES": "2", "LNFM_PROCESS_ID": "1",
                        **env}.items():
        clean_env.setenv(name, value)
    with pytest.raises(distributed.DistributedConfigError) as e:
        distributed.initialize()
    assert says in str(e.value)


def test_jobset_rank_beyond_the_pods_is_refused(clean_env):
    clean_env.setenv("JOBSET_NAME", "lnfm")
    clean_env.setenv("JOB_COMPLETION_INDEX", "4")
    clean_env.setenv("LNFM_NUM_PROCESSES", "4")
    with pytest.raises(distributed.DistributedConfigError, match="JOB_COMPLETION_INDEX=4 is not a rank"):
        distributed.detect()


def test_ipv6_coordinator_is_accepted(clean_env):
    assert distributed.detect("[::1]:12355", 2, 1).coordinator == "[::1]:12355"
