#!/usr/bin/env bash
# Train on this machine: `python -m ardiff train "$@"`, with the console log saved in the run directory.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh [--fake-devices N] [--python PY] [--] [ardiff train flags...]

Runs `python -m ardiff train` from the repository root and tees stdout/stderr to <run_dir>/train.log
(<run_dir> is read from --config.train.run_dir=..., else runs/default, the default config's run_dir;
if you use a config file with another run_dir, pass --config.train.run_dir explicitly so the log lands beside it).

options:
  --fake-devices N   split the host CPU into N XLA devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)
                     to try data/fsdp/tensor sharding without accelerators, e.g. with --config.mesh.fsdp=2
  --python PY        interpreter to use (default: $PYTHON or python)
  -h, --help         this message

examples:
  launch/local.sh --config configs/default.py --config.train.num_steps=200
  launch/local.sh --fake-devices 4 --config.mesh.data=2 --config.mesh.fsdp=2 --config.train.run_dir=runs/fsdp_cpu
  launch/local.sh --config configs/ar_shakespeare.py --progress=false
USAGE
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
FAKE_DEVICES=""
TRAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --fake-devices) [[ $# -ge 2 ]] || { echo "--fake-devices needs a value" >&2; exit 2; }; FAKE_DEVICES="$2"; shift 2 ;;
    --fake-devices=*) FAKE_DEVICES="${1#*=}"; shift ;;
    --python) [[ $# -ge 2 ]] || { echo "--python needs a value" >&2; exit 2; }; PY="$2"; shift 2 ;;
    --python=*) PY="${1#*=}"; shift ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done

if [[ -n "$FAKE_DEVICES" ]]; then
  if ! [[ "$FAKE_DEVICES" =~ ^[1-9][0-9]*$ ]]; then
    echo "--fake-devices must be a positive integer, got '$FAKE_DEVICES'" >&2; exit 2
  fi
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$FAKE_DEVICES"
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi

# Sensible single-host defaults; each can be overridden from the environment.
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# Single host: never call jax.distributed.initialize() (launch/tpu_vm.sh sets ARDIFF_DISTRIBUTED=1 on pods).
export ARDIFF_DISTRIBUTED="${ARDIFF_DISTRIBUTED:-0}"

# Where the run writes, for the log file: the last --config.train.run_dir wins, as in ml_collections.
RUN_DIR="runs/default"
for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
  a="${TRAIN_ARGS[$i]}"
  case "$a" in
    --config.train.run_dir=*) RUN_DIR="${a#*=}" ;;
    --config.train.run_dir) if (( i + 1 < ${#TRAIN_ARGS[@]} )); then RUN_DIR="${TRAIN_ARGS[$((i + 1))]}"; fi ;;
  esac
done

cd "$REPO_ROOT"
RUN_DIR="${RUN_DIR/#\~/$HOME}"
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/train.log"
{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) git=$(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "# XLA_FLAGS=${XLA_FLAGS:-} JAX_PLATFORMS=${JAX_PLATFORMS:-}"
  echo "# $PY -m ardiff train ${TRAIN_ARGS[*]:-}"
} >> "$LOG"
echo "logging to $LOG" >&2

# ${arr[@]+...} keeps `set -u` happy with an empty array on older bash.
"$PY" -m ardiff train ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
