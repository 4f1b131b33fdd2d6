"""Render launch/k8s/jobset.yaml.tmpl into a JobSet manifest for GKE GPU or TPU node pools.

    python launch/k8s/render.py --name lnfm-vit-l --image REGISTRY/lnfm:TAG --bucket my-bucket \\
        --accelerator gpu --gpu-type nvidia-h100-80gb --nodes 4 --gpus-per-node 8 \\
        -- python pretrain/pretrain.py --config vit_l --data /gcs/store --workdir /gcs/runs/vit_l > jobset.yaml
    kubectl apply -f jobset.yaml

GPU: one pod per node, one process per pod driving all its GPUs; the rendezvous is
explicit (LNFM_COORDINATOR = pod 0's headless-service name, LNFM_PROCESS_ID = job
index x pods per job + completion index). TPU: one pod per TPU VM host of each
slice; GKE injects the TPU topology variables and jax finds the slice itself.
The bucket is mounted at /gcs by the GCS FUSE CSI driver: put data and workdirs there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from string import Template

import yaml

TEMPLATE = Path(__file__).with_name("jobset.yaml.tmpl")
MARK = "# rendered by launch/k8s/render.py"  # a manifest's first line: --out replaces only such a file
COORDINATOR_PORT = 8476  # lnfm.train.distributed.JOBSET_PORT

# Runs in each container before the command. GPUs: explicit rendezvous through the
# LNFM_* variables. TPU multislice: the slices find each other through pod 0 of job 0
# (MEGASCALE_*); within a slice jax reads the topology GKE injects.
POD_SCRIPT = """set -euo pipefail
head="${JOBSET}-workers-0-0.${JOBSET}"
if [ "$RENDEZVOUS" = explicit ]; then
  export LNFM_COORDINATOR="${head}:%d"
  export LNFM_NUM_PROCESSES="$NUM_PROCESSES"
  export LNFM_PROCESS_ID=$(( JOB_INDEX * PODS_PER_JOB + POD_INDEX ))
elif [ "$NUM_SLICES" -gt 1 ]; then
  export MEGASCALE_COORDINATOR_ADDRESS="$head" MEGASCALE_NUM_SLICES="$NUM_SLICES" MEGASCALE_SLICE_ID="$JOB_INDEX"
fi
exec "$@"
""" % COORDINATOR_PORT  # noqa: UP031  (a shell script full of ${...}: str.format would need every brace doubled)

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # DNS label short enough for pod host names


class RenderError(ValueError):
    """Values that cannot make a valid manifest."""


def tpu_hosts(topology: str, chips_per_host: int) -> int:
    """TPU VM hosts in one slice: chips in the topology / chips per host."""
    try:
        dims = [int(d) for d in topology.lower().split("x")]
    except ValueError:
        raise RenderError(f"--topology '{topology}' is not like 2x2x2 or 4x4") from None
    if not dims or min(dims) < 1:
        raise RenderError(f"--topology '{topology}' is not like 2x2x2 or 4x4 (every side at least 1)")
    chips = math.prod(dims)
    if chips % chips_per_host:
        raise RenderError(f"topology {topology} ({chips} chips) is not a multiple of {chips_per_host} chips per host")
    return max(1, chips // chips_per_host)


def values(args: argparse.Namespace) -> dict:
    """Template values from the command line, validated."""
    if not NAME_RE.match(args.name):
        raise RenderError(f"--name '{args.name}' must be a lowercase DNS label of at most 40 characters")
    if not args.command:
        raise RenderError("no command given after --")
    if args.bucket.startswith("gs://"):
        args.bucket = args.bucket[len("gs://"):]
    if not args.bucket.strip("/"):
        raise RenderError("--bucket names no bucket")
    for flag, value, least in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 1),
                               ("--chips-per-host", args.chips_per_host, 1), ("--slices", args.slices, 1),
                               ("--max-restarts", args.max_restarts, 0)):
        if value < least:  # a manifest with 0 or -2 pods renders, and schedules nothing
            raise RenderError(f"{flag} must be at least {least}, got {value}")
    if args.accelerator == "gpu" and (args.slices != 1 or args.topology != "2x2x2" or args.chips_per_host != 4):
        raise RenderError("--slices, --topology and --chips-per-host apply to --accelerator tpu")
    if args.accelerator == "gpu":
        slices, pods = 1, args.nodes
        selector = {"cloud.google.com/gke-accelerator": args.gpu_type}
        limits = {"nvidia.com/gpu": args.gpus_per_node}
        tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        annotations, rendezvous = {}, "explicit"
    else:
        slices, pods = args.slices, tpu_hosts(args.topology, args.chips_per_host)
        selector = {"cloud.google.com/gke-tpu-accelerator": args.tpu_type,
                    "cloud.google.com/gke-tpu-topology": args.topology}
        limits = {"google.com/tpu": args.chips_per_host}
        tolerations = [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
        # One slice per node pool: each job of the set lands on its own slice.
        annotations = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
        rendezvous = "auto"
    if args.spot:
        selector["cloud.google.com/gke-spot"] = "true"
    flow = json.dumps  # JSON is valid YAML flow syntax: safe quoting for every value
    return {
        "name": args.name, "image": flow(args.image), "bucket": flow(args.bucket),
        "slices": slices, "pods": pods, "processes": slices * pods, "max_restarts": args.max_restarts,
        "node_selector": flow(selector), "limits": flow(limits), "tolerations": flow(tolerations),
        "jobset_annotations": flow(annotations), "rendezvous": rendezvous,
        "script": flow(POD_SCRIPT), "command": flow(["lnfm", *args.command]),
    }


def render(args: argparse.Namespace) -> str:
    text = f"{MARK}\n" + Template(TEMPLATE.read_text()).substitute(values(args))
    validate(yaml.safe_load(text))
    return text


def _require(doc: dict, path: str):
    node = doc
    for key in path.split("."):
        if isinstance(node, list):
            node = node[0] if node else None
        if not isinstance(node, dict) or key not in node:
            raise RenderError(f"manifest lacks {path}")
        node = node[key]
    return node


def validate(doc: dict) -> None:
    """Check the fields a JobSet controller needs, and that the rendezvous matches the pod layout."""
    if doc.get("apiVersion") != "jobset.x-k8s.io/v1alpha2" or doc.get("kind") != "JobSet":
        raise RenderError("manifest is not a jobset.x-k8s.io/v1alpha2 JobSet")
    _require(doc, "metadata.name")
    rjobs = _require(doc, "spec.replicatedJobs")
    if not rjobs or any("name" not in r or "template" not in r for r in rjobs):
        raise RenderError("every replicatedJob needs a name and a template")
    job = _require(doc, "spec.replicatedJobs.template.spec")
    if job.get("completionMode") != "Indexed" or job.get("parallelism") != job.get("completions"):
        raise RenderError("the workers job must be Indexed with parallelism == completions")
    pod = _require(doc, "spec.replicatedJobs.template.spec.template.spec")
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        raise RenderError("pods of a Job need restartPolicy Never or OnFailure")
    containers = pod.get("containers") or []
    if not containers or any(not c.get("image") or not c.get("name") for c in containers):
        raise RenderError("every container needs a name and an image")
    env = {e["name"]: e for e in containers[0].get("env", [])}
    processes = int(env["NUM_PROCESSES"]["value"])
    if processes != rjobs[0]["replicas"] * job["parallelism"]:
        raise RenderError("NUM_PROCESSES does not equal replicas x parallelism")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Render a JobSet manifest for LNFM training on GKE.")
    ap.add_argument("--name", required=True, help="JobSet name (lowercase DNS label)")
    ap.add_argument("--image", required=True, help="container image with this repository installed")
    ap.add_argument("--bucket", required=True, help="GCS bucket mounted at /gcs (data and workdirs)")
    ap.add_argument("--accelerator", choices=("gpu", "tpu"), required=True)
    ap.add_argument("--gpu-type", default="nvidia-h100-80gb", help="GKE accelerator label of the GPU node pool")
    ap.add_argument("--nodes", type=int, default=1, help="GPU nodes (one pod, one process each)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tpu-type", default="tpu-v5p-slice", help="GKE TPU accelerator label (tpu-v5p-slice, "
                                                                "tpu-v5-lite-podslice, tpu-v6e-slice, tpu-v4-podslice)")
    ap.add_argument("--topology", default="2x2x2", help="TPU slice topology")
    ap.add_argument("--chips-per-host", type=int, default=4, help="TPU chips per VM host")
    ap.add_argument("--slices", type=int, default=1, help="TPU slices (multislice over DCN when > 1)")
    ap.add_argument("--spot", action="store_true", help="schedule on spot nodes")
    ap.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts after failures/preemptions")
    ap.add_argument("--out", default="-", help="output file (default stdout)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = ap.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text = render(args)
    except RenderError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    problem = out_problem(out)
    if problem:
        print(f"render.py: {out}: {problem}", file=sys.stderr)
        return 2
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return 0


def out_problem(out: Path) -> str | None:
    """Why `out` cannot take the manifest: a folder, a missing folder, or a file render.py did not write (a
    template, a user's manifest): replaced, it would be lost. A manifest it rendered there is replaced."""
    if out.is_dir() or str(out).endswith("/"):
        return "is a folder; name the manifest file"
    if not out.parent.is_dir():
        return f"its folder {out.parent} does not exist"
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_file() or not out.read_text(errors="replace").startswith(MARK):
            return "exists and is not a manifest render.py wrote; choose another --out"
    return None


if __name__ == "__main__":
    sys.exit(main())
