#!/usr/bin/env bash
# Run `python -m ardiff train|eval|sample` on this machine: one process, or N processes forming one JAX job over
# localhost (the code path of a TPU pod, one process per host), with every process's console log in the run directory.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh [--processes N] [--fake-devices M] [--command train|eval|sample] [--python PY]
                       [--grace S] [--] [ardiff flags...]

Runs `python -m ardiff <command>` from the repository root. One process: its stdout/stderr are teed to
<run_dir>/train.log (eval/sample: <run_dir>/<command>.log). N processes: process i logs to
<run_dir>/logs/<command>-process-<i>.log (process 0 is also shown here) and its pid is in
<run_dir>/logs/<command>-process-<i>.pid.
<run_dir> is read from --config.train.run_dir=... (train; else runs/default, the default config's run_dir) or
--run_dir/--checkpoint (eval, sample); if you use a config file with another run_dir, pass
--config.train.run_dir explicitly so the logs land beside it.

options:
  --processes N      start N processes of the same command: a free localhost port as the coordinator,
                     ARDIFF_COORDINATOR / ARDIFF_NUM_PROCESSES / ARDIFF_PROCESS_ID in each one's environment
                     (read by ardiff.distributed). The global device count is N * (devices per process).
  --fake-devices M   split each process's CPU into M XLA devices (XLA_FLAGS=--xla_force_host_platform_device_count=M)
                     to try data/fsdp/tensor sharding without accelerators, e.g. with --config.mesh.fsdp=2
  --command CMD      train (default), eval or sample
  --grace S          when a process dies, the others get S seconds (default 60) to stop on their own (a
                     collective fails, or ARDIFF_HEARTBEAT_TIMEOUT passes), then are killed
  --python PY        interpreter to use (default: $PYTHON or python)
  -h, --help         this message

SIGINT/SIGTERM to this script are passed to every process (training saves the current step and exits 0).
Exit status: 0 when every process exited 0, else the first non-zero status.

examples:
  launch/local.sh --config configs/default.py --config.train.num_steps=200
  launch/local.sh --fake-devices 4 --config.mesh.data=2 --config.mesh.fsdp=2 --config.train.run_dir=runs/fsdp_cpu
  launch/local.sh --processes 2 --fake-devices 2 --config.mesh.fsdp=2 --config.mesh.tensor=2 \
    --config.train.run_dir=runs/two_procs
  launch/local.sh --processes 2 --fake-devices 2 --command eval --run_dir runs/two_procs
USAGE
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
FAKE_DEVICES=""
PROCESSES=1
COMMAND=train
GRACE=60
ARGS=()

need() { [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --fake-devices) need "$@"; FAKE_DEVICES="$2"; shift 2 ;;
    --fake-devices=*) FAKE_DEVICES="${1#*=}"; shift ;;
    --processes) need "$@"; PROCESSES="$2"; shift 2 ;;
    --processes=*) PROCESSES="${1#*=}"; shift ;;
    --command) need "$@"; COMMAND="$2"; shift 2 ;;
    --command=*) COMMAND="${1#*=}"; shift ;;
    --grace) need "$@"; GRACE="$2"; shift 2 ;;
    --grace=*) GRACE="${1#*=}"; shift ;;
    --python) need "$@"; PY="$2"; shift 2 ;;
    --python=*) PY="${1#*=}"; shift ;;
    --) shift; ARGS+=("$@"); break ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 must be a positive integer, got '$2'" >&2; exit 2; }; }
positive --processes "$PROCESSES"
positive --grace "$GRACE"
case "$COMMAND" in
  train|eval|sample) ;;
  *) echo "error: --command must be train, eval or sample, got '$COMMAND'" >&2; exit 2 ;;
esac

if [[ -n "$FAKE_DEVICES" ]]; then
  positive --fake-devices "$FAKE_DEVICES"
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$FAKE_DEVICES"
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi

export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# Explicit coordinator below; never let jax.distributed auto-detect a cluster on a workstation.
export ARDIFF_DISTRIBUTED=0

# Where the run writes, for the logs: the last flag wins, as in ml_collections / argparse.
if [[ "$COMMAND" == train ]]; then RUN_DIR="runs/default"; else RUN_DIR=""; fi
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  a="${ARGS[$i]}"
  next="${ARGS[$((i + 1))]:-}"
  case "$COMMAND:$a" in
    train:--config.train.run_dir=*|eval:--run_dir=*|eval:--checkpoint=*|sample:--run_dir=*|sample:--checkpoint=*)
      RUN_DIR="${a#*=}" ;;
    train:--config.train.run_dir|eval:--run_dir|eval:--checkpoint|sample:--run_dir|sample:--checkpoint)
      RUN_DIR="$next" ;;
  esac
done
if [[ -z "$RUN_DIR" ]]; then
  echo "error: $COMMAND needs --run_dir DIR (the run to read; its logs go there)" >&2; exit 2
fi
if [[ "$RUN_DIR" == *://* ]]; then
  LOG_DIR="runs/logs"  # a gs:// run directory: tee cannot append to an object; keep the console logs here
else
  LOG_DIR="${RUN_DIR/#\~/$HOME}"
fi

cd "$REPO_ROOT"
mkdir -p "$LOG_DIR"
header() {
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) git=$(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "# XLA_FLAGS=${XLA_FLAGS:-} JAX_PLATFORMS=${JAX_PLATFORMS:-} $*"
  echo "# $PY -m ardiff $COMMAND ${ARGS[*]:-}"
}

if [[ "$PROCESSES" == 1 ]]; then
  LOG="$LOG_DIR/$COMMAND.log"
  header >> "$LOG"
  echo "logging to $LOG" >&2
  # ${arr[@]+...} keeps `set -u` happy with an empty array on older bash.
  "$PY" -m ardiff "$COMMAND" ${ARGS[@]+"${ARGS[@]}"} 2>&1 | tee -a "$LOG"
  exit "${PIPESTATUS[0]}"
fi

# ------------------------------------------------------------------------------------------- N processes
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$LOG_DIR/logs"
PIDS=()
for ((p = 0; p < PROCESSES; p++)); do
  LOG="$LOG_DIR/logs/$COMMAND-process-$p.log"
  header "ARDIFF_PROCESS_ID=$p/$PROCESSES" >> "$LOG"
  ARDIFF_COORDINATOR="127.0.0.1:$PORT" ARDIFF_NUM_PROCESSES="$PROCESSES" ARDIFF_PROCESS_ID="$p" \
    "$PY" -m ardiff "$COMMAND" ${ARGS[@]+"${ARGS[@]}"} > >(if [[ $p == 0 ]]; then tee -a "$LOG"; else cat >> "$LOG"; fi) 2>&1 &
  PIDS+=($!)
  echo "${PIDS[$p]}" > "$LOG_DIR/logs/$COMMAND-process-$p.pid"
done
echo "started $PROCESSES processes (coordinator 127.0.0.1:$PORT), logs in $LOG_DIR/logs/" >&2

forward() {  # a signal to this script goes to every process (SIGTERM: each saves the agreed step and exits 0)
  echo "launch/local.sh: passing SIG$1 to every process" >&2
  for pid in "${PIDS[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

alive() { local n=0 pid; for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done; echo $n; }
STATUS=0
declare -A DONE=()
deadline=""
while :; do
  for p in "${!PIDS[@]}"; do
    pid="${PIDS[$p]}"
    [[ -n "${DONE[$p]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    DONE[$p]=$rc
    if [[ $rc != 0 ]]; then
      echo "launch/local.sh: process $p exited with status $rc (log: $LOG_DIR/logs/$COMMAND-process-$p.log)" >&2
      if [[ $STATUS == 0 ]]; then
        STATUS=$rc
        deadline=$((SECONDS + GRACE))
        echo "launch/local.sh: the other processes get ${GRACE}s to stop on their own, then are killed" >&2
      fi
    fi
  done
  [[ ${#DONE[@]} == "$PROCESSES" ]] && break
  if [[ -n "$deadline" && $SECONDS -ge $deadline ]]; then
    echo "launch/local.sh: killing the $(alive) remaining process(es)" >&2
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    deadline=""
  fi
  sleep 0.5
done
wait 2>/dev/null || true  # the tee/cat log writers
exit "$STATUS"
