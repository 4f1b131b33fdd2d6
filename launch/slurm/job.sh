# Shared by the LNFM sbatch scripts (sourced, not run): environment, signal forwarding, requeue.
# shellcheck shell=bash
#
# Preemption and time limits: the sbatch scripts ask for `--signal=B:USR1@120`,
# so SLURM sends USR1 to this batch shell 120 s before the time limit. The
# handler forwards SIGTERM to the job steps (`scancel --signal=TERM JOBID`
# signals every step but not the batch shell); the training job then writes a
# checkpoint and exits 0, and the batch shell calls `scontrol requeue`. The
# requeued job runs the same command, which resumes from the latest checkpoint
# in its workdir. A plain SIGTERM (scancel, or preemption by a higher-priority
# job under PreemptMode=REQUEUE) reaches the steps directly from SLURM; the
# shell only waits for them, and SLURM itself requeues preempted jobs.

# NCCL / XLA settings for multi-node GPU jobs. Every value is a default: export
# your own before `sbatch` to override it.
#   NCCL_DEBUG=WARN              errors and warnings only (INFO prints the topology NCCL found)
#   NCCL_SOCKET_IFNAME           interface for NCCL's bootstrap/socket traffic; set it (e.g. ib0, eth0,
#                                or ^lo,docker) when NCCL picks a wrong or unroutable one
#   NCCL_IB_HCA                  InfiniBand adapters to use (e.g. mlx5); unset = all
#   NCCL_IB_DISABLE=0            use InfiniBand/RoCE when present (1 forces TCP sockets)
#   NCCL_NET_GDR_LEVEL           GPUDirect RDMA distance (e.g. PHB); unset = NCCL's choice
#   NCCL_CROSS_NIC=0             keep each ring on one NIC (rail-optimised fabrics)
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90   share of GPU memory JAX preallocates (JAX's default is 0.75)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_CROSS_NIC="${NCCL_CROSS_NIC:-0}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# Leftover single-machine settings would make every task join the wrong job.
unset LNFM_COORDINATOR LNFM_NUM_PROCESSES LNFM_PROCESS_ID LNFM_LOCAL_DEVICE_IDS JAX_PLATFORMS

lnfm_requeue=0
lnfm_step_pid=""

# shellcheck disable=SC2317  # trap handlers
lnfm_on_usr1() {
  echo "lnfm: time limit near: asking the job steps to checkpoint and exit, then requeueing"
  lnfm_requeue=1
  scancel --signal=TERM "${SLURM_JOB_ID}" || true
}

# shellcheck disable=SC2317  # trap handlers
lnfm_on_term() {
  echo "lnfm: SIGTERM received: waiting for the job steps to checkpoint and exit"
}

# lnfm_run_step SRUN_ARGS... -- COMMAND ARGS...
# Runs one srun step in the background, waits for it through any number of
# signals, requeues the job when USR1 asked for it, and returns the step's status.
lnfm_run_step() {
  local srun_args=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do srun_args+=("$1"); shift; done
  [[ $# -gt 1 ]] || { echo "lnfm: no command given to run (usage: sbatch SCRIPT COMMAND ...)" >&2; return 2; }
  shift
  # Quoted (%q): per_node's multi-line task stays one line, and an argument with a space stays one word.
  local cmd
  printf -v cmd ' %q' "${srun_args[@]}" "$@"
  echo "lnfm: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NUM_NODES:-?} node(s): srun${cmd}"
  if [[ "${LNFM_DRY_RUN:-0}" == 1 ]]; then
    echo "srun${cmd}"
    return 0
  fi
  trap lnfm_on_usr1 USR1
  trap lnfm_on_term TERM
  # bash can lose a background job's exit status when a trapped signal interrupts `wait` just as
  # the job ends (wait then returns -1, seen as 255): the step's own shell records the status in
  # a file instead. That shell outlives SIGTERM (a handler, not an ignore, so srun still gets the
  # default action) to write it.
  local status_file code=1 waited=0
  status_file=$(mktemp "${TMPDIR:-/tmp}/lnfm-step-${SLURM_JOB_ID:-0}.XXXXXX")
  (
    trap ':' TERM USR1
    step=0
    srun "${srun_args[@]}" "$@" || step=$?
    echo "$step" > "$status_file"
  ) &
  lnfm_step_pid=$!
  # wait also returns (status > 128) when a trapped signal arrives: keep waiting while the step runs.
  while kill -0 "$lnfm_step_pid" 2> /dev/null; do
    waited=0
    wait "$lnfm_step_pid" 2> /dev/null || waited=$?
    (( waited != 127 )) || break  # already collected
  done
  code=$(cat "$status_file" 2> /dev/null || true)
  rm -f "$status_file"
  if [[ ! "$code" =~ ^[0-9]+$ ]]; then
    echo "lnfm: the step ended without recording its exit status" >&2
    code=1
  fi
  if (( lnfm_requeue )); then
    echo "lnfm: step exited with status ${code}; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    return 0
  fi
  return "$code"
}
