#!/usr/bin/env bash
# LNFM on Cloud TPU VM pod slices (queued resources, optionally spot), with auto-resume.
#
#   launch/tpu/tpu.sh [--dry-run] create              queue a slice (queued resource, --spot with SPOT=1)
#   launch/tpu/tpu.sh [--dry-run] setup               install this checkout + jax[tpu] and mount the bucket on every worker
#   launch/tpu/tpu.sh [--dry-run] run -- COMMAND ...  run COMMAND on all workers at once (one process per host)
#   launch/tpu/tpu.sh [--dry-run] watch -- COMMAND ...  create/setup/run, and after a preemption recreate and rerun
#   launch/tpu/tpu.sh [--dry-run] delete              delete the queued resource and its slice
#
# Settings (environment or --name=value flags): PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE
# (e.g. v5p-64, v5litepod-32, v6e-64), RUNTIME_VERSION (e.g. v2-alpha-tpuv5, v2-alpha-tpuv6e),
# BUCKET (gs://name, mounted at MOUNT=/gcs on every worker with gcsfuse), SPOT=1 (or true) for spot
# capacity, POLL_SECONDS (watch polling, default 60), MAX_FAILURES (watch gives up after this
# many job failures on a healthy slice, default 3). --dry-run prints the gcloud commands.
#
# Put data and the workdir under $MOUNT (the bucket): a recreated slice starts blank, and the
# job resumes from the newest checkpoint in its workdir.
set -euo pipefail

die() { echo "tpu.sh: $*" >&2; exit 2; }

dry_run=0
action=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --tpu-name=*) TPU_NAME="${1#*=}"; shift ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}"; shift ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}"; shift ;;
    --bucket=*) BUCKET="${1#*=}"; shift ;;
    --spot) SPOT=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    create|setup|run|watch|delete) action="$1"; shift; break ;;
    *) die "unknown argument '$1' (expected create, setup, run, watch or delete)" ;;
  esac
done
[[ -n "$action" ]] || die "no action given (create, setup, run, watch or delete)"
if [[ "$action" == run || "$action" == watch ]]; then
  [[ "${1:-}" == "--" ]] || die "$action needs '-- COMMAND ...'"
  shift
  [[ $# -gt 0 ]] || die "$action needs a command after --"
fi

for var in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION; do
  [[ -n "${!var:-}" ]] || die "$var is not set (export it or pass --$(tr '[:upper:]_' '[:lower:]-' <<< "$var")=...)"
done
BUCKET="${BUCKET:-}"
[[ -z "$BUCKET" || "$BUCKET" == gs://* ]] || die "BUCKET must look like gs://name, got '$BUCKET'"
MOUNT="${MOUNT:-/gcs}"
case "${SPOT:-0}" in  # the usual spellings of a yes/no setting; anything else is a typo, not "no"
  1|[Tt]rue|TRUE|[Yy]es|YES) SPOT=1 ;;
  0|[Ff]alse|FALSE|[Nn]o|NO) SPOT=0 ;;
  *) die "SPOT must be 1/true/yes or 0/false/no, got '$SPOT'" ;;
esac
POLL_SECONDS="${POLL_SECONDS:-60}"
MAX_FAILURES="${MAX_FAILURES:-3}"
QR_NAME="${TPU_NAME}-qr"
common=(--project="$PROJECT" --zone="$ZONE")

# Run (or, with --dry-run, print) one gcloud command.
gc() {
  if (( dry_run )); then
    printf 'gcloud'; printf ' %q' "$@"; printf '\n'
  else
    gcloud "$@"
  fi
}

qr_state() {
  if (( dry_run )); then echo ACTIVE; return; fi
  gcloud compute tpus queued-resources describe "$QR_NAME" "${common[@]}" \
    --format='value(state.state)' 2> /dev/null || echo MISSING
}

do_create() {
  local extra=()
  (( SPOT )) && extra+=(--spot)
  gc compute tpus queued-resources create "$QR_NAME" "${common[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
}

do_delete() {
  gc compute tpus queued-resources delete "$QR_NAME" "${common[@]}" --force --quiet
}

on_all_workers() {
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker=all --command="$1"
}

do_setup() {
  local repo archive="/tmp/lnfm-src.tar.gz"
  repo="$(cd "$(dirname "$0")/../.." && pwd)"
  if (( dry_run )); then
    echo "git -C $repo archive --format=tar.gz -o $archive HEAD"
  else
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  fi
  gc compute tpus tpu-vm scp "$archive" "$TPU_NAME:lnfm-src.tar.gz" "${common[@]}" --worker=all
  local setup="set -e; rm -rf ~/lnfm && mkdir -p ~/lnfm && tar -xzf ~/lnfm-src.tar.gz -C ~/lnfm"
  setup+=" && python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e ~/lnfm'[tpu]'"
  if [[ -n "$BUCKET" ]]; then
    setup+=" && if ! command -v gcsfuse >/dev/null; then"
    setup+=" echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\""
    setup+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
    setup+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -"
    setup+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
    local mount bucket  # quoted for the workers' shell: a MOUNT with a space stays one path
    mount="$(printf '%q' "$MOUNT")"
    bucket="$(printf '%q' "${BUCKET#gs://}")"
    setup+=" && sudo mkdir -p $mount && sudo chown \$USER $mount"
    setup+=" && (mountpoint -q $mount || gcsfuse --implicit-dirs $bucket $mount)"
  fi
  on_all_workers "$setup"
}

do_run() {
  local cmd="" arg
  for arg in "$@"; do cmd+=" $(printf '%q' "$arg")"; done
  # One process per host; jax finds the other hosts of the slice on its own.
  on_all_workers "cd ~/lnfm && exec${cmd}"
}

do_watch() {
  local failures=0 state code
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE)
        code=0
        do_run "$@" || code=$?
        (( dry_run )) && return 0
        state="$(qr_state)"
        if [[ "$state" == ACTIVE ]]; then
          if (( code == 0 )); then echo "tpu.sh: job finished"; return 0; fi
          failures=$(( failures + 1 ))
          echo "tpu.sh: job failed with status $code on a healthy slice ($failures of $MAX_FAILURES)" >&2
          (( failures < MAX_FAILURES )) || return "$code"
        else
          echo "tpu.sh: slice went to state $state while the job ran; recreating"
        fi
        ;;
      MISSING)
        echo "tpu.sh: no queued resource $QR_NAME; creating it"
        do_create
        wait_active
        do_setup
        ;;
      SUSPENDING|SUSPENDED|FAILED|PREEMPTED)
        echo "tpu.sh: queued resource is $state (preempted or failed); deleting and recreating"
        do_delete
        ;;
      *)
        echo "tpu.sh: queued resource is $state; waiting"
        sleep "$POLL_SECONDS"
        ;;
    esac
  done
}

wait_active() {
  local state
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|MISSING) die "queued resource $QR_NAME is $state while waiting for it" ;;
      *) echo "tpu.sh: waiting for $QR_NAME ($state)"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

case "$action" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run "$@" ;;
  delete) do_delete ;;
  watch)
    if (( dry_run )); then
      # One pass of the recovery path: recreate the slice, set it up, run the job.
      do_create; do_setup; do_run "$@"
    else
      do_watch "$@"
    fi
    ;;
esac
