#!/usr/bin/env bash
# Run N cooperating JAX processes on this machine, joined by jax.distributed over localhost.
#
#   launch/local.sh --num-processes N [--devices-per-process D] [--port P] -- COMMAND ...
#
# Every process gets LNFM_COORDINATOR=localhost:P, LNFM_NUM_PROCESSES=N and
# LNFM_PROCESS_ID=rank (read by lnfm.train.distributed.initialize).
#   CPU mode (--devices-per-process given, or no GPU found; CUDA_VISIBLE_DEVICES empty or starting with
#     an invalid id such as -1 means none): JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D (D: 1).
#   GPU mode: the visible GPUs are split evenly, CUDA_VISIBLE_DEVICES per process.
# Output lines are prefixed with "[rank] ". The script waits for all processes;
# when one fails, or on Ctrl-C / SIGTERM, the others get SIGTERM (then SIGKILL
# after --grace seconds) and the script exits non-zero.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --num-processes N  --devices-per-process D  --port P (default 12355)  --grace SECONDS (default 30)"
}

die() { echo "local.sh: $*" >&2; exit 2; }

# Our own messages use fd 3: bash's "Killed" job notices on stderr are silenced below.
exec 3>&2

num_processes=""
devices=""
port=12355
grace=30
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-processes) num_processes="${2:-}"; shift 2 || die "--num-processes needs a value" ;;
    --num-processes=*) num_processes="${1#*=}"; shift ;;
    --devices-per-process) devices="${2:-}"; shift 2 || die "--devices-per-process needs a value" ;;
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port) port="${2:-}"; shift 2 || die "--port needs a value" ;;
    --port=*) port="${1#*=}"; shift ;;
    --grace) grace="${2:-}"; shift 2 || die "--grace needs a value" ;;
    --grace=*) grace="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after --)" ;;
  esac
done

is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_positive_int "$num_processes" || die "--num-processes must be a positive integer, got '${num_processes}'"
[[ -z "$devices" ]] || is_positive_int "$devices" || die "--devices-per-process must be a positive integer, got '${devices}'"
if ! is_positive_int "$port" || (( port > 65535 )); then die "--port must be a TCP port number, got '${port}'"; fi
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '${grace}'"
[[ $# -gt 0 ]] || die "no command given after --"

# GPUs this machine exposes: CUDA_VISIBLE_DEVICES when set (set but empty: none, as CUDA reads it),
# otherwise nvidia-smi's list.
gpus=()
if [[ -z "$devices" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    IFS=',' read -r -a listed <<< "$CUDA_VISIBLE_DEVICES"
    for id in "${listed[@]}"; do  # CUDA stops at the first invalid id (-1 is the usual way to hide all GPUs)
      [[ "$id" =~ ^[0-9]+$ || "$id" =~ ^(GPU|MIG)- ]] || break
      gpus+=("$id")
    done
    (( ${#gpus[@]} > 0 )) \
      || echo "local.sh: CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' makes no GPU visible: CPU mode, 1 device per process" >&3
  elif command -v nvidia-smi > /dev/null 2>&1; then
    count=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
    for ((g = 0; g < count; g++)); do gpus+=("$g"); done
  fi
fi

mode=cpu
if [[ -z "$devices" && ${#gpus[@]} -gt 0 ]]; then
  mode=gpu
  (( ${#gpus[@]} % num_processes == 0 )) \
    || die "${#gpus[@]} GPUs cannot be split evenly over ${num_processes} processes"
  per_process=$(( ${#gpus[@]} / num_processes ))
else
  devices="${devices:-1}"
fi

# Drop any inherited device-count flag so ours is the only one XLA sees.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="${flag} "
done

pids=()
finished=()
stopping=0

stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-${pid}" 2> /dev/null || true
  done
  local waited=0
  while (( waited < grace * 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2> /dev/null && alive=1
    done
    (( alive )) || return 0
    sleep 0.1
    waited=$(( waited + 1 ))
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-${pid}" 2> /dev/null || true
  done
}

# shellcheck disable=SC2317,SC2329  # called by the trap below
on_signal() {
  stopping=1
  echo "local.sh: interrupted, stopping all processes" >&3
  stop_all 2> /dev/null
  exit 130
}
trap on_signal INT TERM

# Job control gives every rank its own process group, so a rank and its
# output filter are stopped together.
set -m
for ((rank = 0; rank < num_processes; rank++)); do
  (
    # The rank's shell outlives SIGTERM (a handler, not an ignore, so the command
    # still gets the default action) to report the command's own exit status.
    trap 'true' TERM
    trap - INT
    export LNFM_COORDINATOR="localhost:${port}"
    export LNFM_NUM_PROCESSES="$num_processes"
    export LNFM_PROCESS_ID="$rank"
    if [[ "$mode" == gpu ]]; then
      visible="${gpus[*]:$(( rank * per_process )):${per_process}}"
      export CUDA_VISIBLE_DEVICES="${visible// /,}"
      local_ids=$(seq -s, 0 $(( per_process - 1 )))
      export LNFM_LOCAL_DEVICE_IDS="$local_ids"
    else
      export JAX_PLATFORMS=cpu
      export XLA_FLAGS="${xla_flags}--xla_force_host_platform_device_count=${devices}"
    fi
    # The filter ignores SIGTERM so the command's last words still get printed.
    "$@" 2>&1 | (trap '' TERM INT; exec awk -v prefix="[${rank}] " '{ print prefix $0; fflush() }')
  ) &
  pids+=("$!")
  finished+=(0)
done
set +m

status=0
remaining=$num_processes
while (( remaining > 0 )); do
  for ((rank = 0; rank < num_processes; rank++)); do
    (( finished[rank] )) && continue
    pid="${pids[rank]}"
    kill -0 "$pid" 2> /dev/null && continue
    code=0
    wait "$pid" 2> /dev/null || code=$?
    finished[rank]=1
    remaining=$(( remaining - 1 ))
    if (( code != 0 && status == 0 )); then
      status=$code
      if (( remaining > 0 && ! stopping )); then
        echo "local.sh: process ${rank} exited with status ${code}; stopping the others" >&3
        stopping=1
        stop_all 2> /dev/null
      fi
    fi
  done
  (( remaining > 0 )) && sleep 0.2
done 2> /dev/null
exit "$status"
