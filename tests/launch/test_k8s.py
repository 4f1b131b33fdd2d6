"""launch/k8s/render.py: manifests parse and validate, and the pod script wires the rendezvous."""

import importlib.util
import subprocess
import sys

import pytest
import yaml

from lnfm.train.distributed import JOBSET_PORT, detect

COMMAND = ["python", "pretrain/pretrain.py", "--config", "vit_l", "--data", "/gcs/store",
           "--workdir", "/gcs/runs/vit l"]


@pytest.fixture(scope="module")
def render(repo_root):
    spec = importlib.util.spec_from_file_location("lnfm_k8s_render", repo_root / "launch" / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(render, *flags):
    args = render.parse_args(["--name", "lnfm-run", "--image", "registry.example/lnfm:1", "--bucket", "gs://lnfm-b",
                              *flags, "--", *COMMAND])
    return yaml.safe_load(render.render(args))


def _container(doc):
    return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]


def test_gpu_manifest(render):
    doc = _render(render, "--accelerator", "gpu", "--nodes", "4", "--gpus-per-node", "8")
    rjob = doc["spec"]["replicatedJobs"][0]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    c = _container(doc)
    assert (doc["apiVersion"], doc["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert (rjob["replicas"], job["parallelism"], job["completions"], job["completionMode"]) == (1, 4, 4, "Indexed")
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert c["image"] == "registry.example/lnfm:1"
    assert c["args"][1:] == COMMAND  # args[0] is bash's $0
    env = {e["name"]: e for e in c["env"]}
    assert env["NUM_PROCESSES"]["value"] == "4" and env["RENDEZVOUS"]["value"] == "explicit"
    vol = pod["volumes"][0]["csi"]
    assert vol["driver"] == "gcsfuse.csi.storage.gke.io" and vol["volumeAttributes"]["bucketName"] == "lnfm-b"
    assert doc["spec"]["network"]["enableDNSHostnames"] is True


def test_tpu_multislice_manifest(render):
    doc = _render(render, "--accelerator", "tpu", "--tpu-type", "tpu-v5p-slice", "--topology", "4x4x4",
                  "--slices", "2", "--spot")
    rjob = doc["spec"]["replicatedJobs"][0]
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert rjob["replicas"] == 2 and rjob["template"]["spec"]["parallelism"] == 16  # 64 chips / 4 per host
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4", "cloud.google.com/gke-spot": "true"}
    assert _container(doc)["resources"]["limits"] == {"google.com/tpu": 4}
    annotations = doc["metadata"]["annotations"]
    assert annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"


def _run_pod_script(doc, **env):
    c = _container(doc)
    values = {e["name"]: e.get("value", "") for e in c["env"]}
    values.update(env)
    probe = ["env"]  # replaces the training command: print the environment it would see
    out = subprocess.run([*c["command"], c["args"][0], *probe], env={"PATH": "/usr/bin:/bin", **values},
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_pod_script_gives_each_pod_its_rank_and_the_head_address(render, monkeypatch):
    doc = _render(render, "--accelerator", "gpu", "--nodes", "3")
    seen = _run_pod_script(doc, JOBSET="lnfm-run", JOB_INDEX="0", POD_INDEX="2")
    assert seen["LNFM_COORDINATOR"] == f"lnfm-run-workers-0-0.lnfm-run:{JOBSET_PORT}"
    assert (seen["LNFM_NUM_PROCESSES"], seen["LNFM_PROCESS_ID"]) == ("3", "2")
    # What the training job then does with it.
    for k in ("LNFM_COORDINATOR", "LNFM_NUM_PROCESSES", "LNFM_PROCESS_ID"):
        monkeypatch.setenv(k, seen[k])
    spec = detect()
    assert (spec.source, spec.num_processes, spec.process_id) == ("env", 3, 2)


def test_pod_script_sets_megascale_for_tpu_multislice(render):
    doc = _render(render, "--accelerator", "tpu", "--topology", "2x2x2", "--slices", "3")
    seen = _run_pod_script(doc, JOBSET="lnfm-run", JOB_INDEX="2", POD_INDEX="1")
    assert seen["MEGASCALE_SLICE_ID"] == "2" and seen["MEGASCALE_NUM_SLICES"] == "3"
    assert "LNFM_COORDINATOR" not in seen


@pytest.mark.parametrize("flags,message", [
    (["--name", "Bad_Name"], "DNS label"),
    (["--accelerator", "tpu", "--topology", "2x3", "--chips-per-host", "4"], "multiple of"),
    # each rendered a manifest that schedules nothing or divided by zero (a traceback)
    (["--nodes", "0"], "--nodes must be at least 1, got 0"),
    (["--nodes", "-2"], "--nodes must be at least 1, got -2"),
    (["--max-restarts", "-5"], "--max-restarts must be at least 0"),
    (["--accelerator", "tpu", "--chips-per-host", "0"], "--chips-per-host must be at least 1"),
    (["--accelerator", "tpu", "--slices", "0"], "--slices must be at least 1"),
    (["--accelerator", "tpu", "--topology", "0x2x2"], "every side at least 1"),
    (["--accelerator", "gpu", "--slices", "4"], "apply to --accelerator tpu"),
])
def test_bad_values_give_one_line_errors(repo_root, flags, message):
    base = {"--name": "lnfm-run", "--accelerator": "gpu"}
    for k, v in zip(flags[::2], flags[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv]
    res = subprocess.run([sys.executable, str(repo_root / "launch" / "k8s" / "render.py"), *argv, "--image", "i",
                          "--bucket", "b", "--", "python", "x.py"], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1
    assert res.stdout == ""


def test_validate_rejects_a_broken_manifest(render):
    doc = _render(render, "--accelerator", "gpu", "--nodes", "2")
    doc["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] = 3
    with pytest.raises(render.RenderError, match="parallelism"):
        render.validate(doc)
    doc = _render(render, "--accelerator", "gpu", "--nodes", "2")
    del _container(doc)["image"]
    with pytest.raises(render.RenderError, match="image"):
        render.validate(doc)


def test_out_replaces_only_a_manifest_it_rendered(repo_root, tmp_path):
    """--out replaced any file (the template itself, after which every render failed), and a folder or a missing
    one was a traceback (a folder also left a temporary file beside it)."""
    script = repo_root / "launch" / "k8s" / "render.py"

    def run(out):
        return subprocess.run([sys.executable, str(script), "--name", "lnfm-run", "--accelerator", "gpu", "--image",
                               "i", "--bucket", "b", "--out", str(out), "--", "python", "x.py"],
                              capture_output=True, text=True)

    template = tmp_path / "jobset.yaml.tmpl"
    template.write_text((repo_root / "launch" / "k8s" / "jobset.yaml.tmpl").read_text())
    for out, says in ((template, "is not a manifest render.py wrote"), (tmp_path, "is a folder"),
                      (tmp_path / "nodir" / "x.yaml", "does not exist")):
        res = run(out)
        assert res.returncode == 2 and says in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert template.read_text() == (repo_root / "launch" / "k8s" / "jobset.yaml.tmpl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobset.yaml.tmpl"]
    assert run(tmp_path / "job.yaml").returncode == 0 and run(tmp_path / "job.yaml").returncode == 0  # its own
    assert yaml.safe_load((tmp_path / "job.yaml").read_text())["kind"] == "JobSet"
