#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) lifecycle for ardiff: create, setup, run, logs, stop, delete.
# Nothing here runs at source/test time: gcloud is only invoked by an explicit subcommand.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh <command> [args...]

commands:
  create              gcloud compute tpus tpu-vm create $TPU_NAME (zone, accelerator type, runtime version,
                      service-account scopes); QUEUED=1: a queued resource instead (large slices, spot capacity)
  setup               on every worker: check Python >= 3.11, get the repo into ~/ardiff, pip install -r
                      requirements.txt, jax[tpu]; prints each host's process index and device count
  run [train flags]   on every worker: nohup ARDIFF_DISTRIBUTED=1 python -m ardiff train [flags]
                      (each host logs to ~/ardiff/logs/host-$WORKER.log; survives ssh disconnects)
  logs [N]            last N (default 50) lines of every host's log
  stop                kill the training process on every worker
  ssh [CMD]           run CMD (default: hostname) on every worker
  delete              delete the TPU VM, or the queued resource with QUEUED=1 (stops billing)

environment (defaults in brackets):
  TPU_NAME      [ardiff-tpu]          TPU VM name
  ZONE          [us-east5-a]          zone with quota for ACCELERATOR
  ACCELERATOR   [v5p-8]               accelerator type, e.g. v5p-8, v5p-1024, v5litepod-16 (v5e), v6e-16, v4-32
  TPU_VERSION   [by ACCELERATOR]      runtime image: v5e (v5litepod-*) v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
                                      v6e-* v2-alpha-tpuv6e, v4-* tpu-ubuntu2204-base
  SERVICE_ACCOUNT []                  service account of the VMs (default: the project's compute default);
                                      it needs read/write on the gs:// buckets of data_dir and run_dir
  SCOPES        [cloud-platform]      OAuth scopes of the VMs (GCS access from the workers needs storage scope)
  QUEUED        [0]                   1: create/delete through `gcloud compute tpus queued-resources`
  PROJECT       [gcloud default]      GCP project
  REPO_URL      []                    git URL to clone in `setup`; empty: copy this checkout with scp instead
  REPO_REF      [main]                branch/tag/commit to check out when cloning
  REMOTE_DIR    [ardiff]              checkout directory on the workers (relative to $HOME)
  PYTHON        [python3]             interpreter on the workers; must be Python >= 3.11 (setup checks it; on
                                      an Ubuntu 22.04 image: sudo apt-get install -y python3.11 python3.11-venv,
                                      then PYTHON=python3.11)
  JAX_VERSION   [0.10.2]              pinned jax[tpu] version (must match requirements.txt)
  SPOT          [0]                   1: create a spot (preemptible) VM
  DRY_RUN       [0]                   1: print the gcloud commands instead of running them

example:
  TPU_NAME=bd3-1b ZONE=us-east5-a ACCELERATOR=v5p-1024 launch/tpu_vm.sh create
  TPU_NAME=bd3-1b ZONE=us-east5-a REPO_URL=https://github.com/ORG/ardiff.git launch/tpu_vm.sh setup
  TPU_NAME=bd3-1b ZONE=us-east5-a launch/tpu_vm.sh run --config configs/bd3_1b_tpu.py --config.train.run_dir=gs://BUCKET/bd3_1b
  TPU_NAME=bd3-1b ZONE=us-east5-a launch/tpu_vm.sh logs
USAGE
}

TPU_NAME="${TPU_NAME:-ardiff-tpu}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
default_version() {  # the runtime image of each TPU generation
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "unknown ACCELERATOR '$1': set TPU_VERSION (the runtime image) explicitly" >&2; return 1 ;;
  esac
}
TPU_VERSION="${TPU_VERSION:-$(default_version "$ACCELERATOR")}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
SCOPES="${SCOPES:-https://www.googleapis.com/auth/cloud-platform}"
QUEUED="${QUEUED:-0}"
PROJECT="${PROJECT:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-ardiff}"
PYTHON="${PYTHON:-python3}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
SPOT="${SPOT:-0}"
DRY_RUN="${DRY_RUN:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

gcloud_tpu() {  # gcloud compute tpus tpu-vm <args>, with zone/project, or printed under DRY_RUN=1
  gcloud_tpus tpu-vm "$@"
}

gcloud_tpus() {  # gcloud compute tpus <group> <args>, with zone/project, or printed under DRY_RUN=1
  local cmd=(gcloud compute tpus "$@" --zone="$ZONE")
  [[ -n "$PROJECT" ]] && cmd+=(--project="$PROJECT")
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

on_all_workers() {  # run a bash script on every worker of the slice
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

# Prefix run on the workers: $WORKER is this host's index (0..hosts-1), from the TPU metadata server.
WORKER_ID='WORKER=$(curl -s -H "Metadata-Flavor: Google" "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number" 2>/dev/null || echo 0); WORKER=${WORKER:-0}'

cmd_create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  [[ -n "$SERVICE_ACCOUNT" ]] && extra+=(--service-account="$SERVICE_ACCOUNT")
  if [[ "$QUEUED" == 1 ]]; then
    # Large slices are granted through the queue (the request waits for capacity); `gcloud compute tpus
    # queued-resources list` shows its state, the TPU VM appears as $TPU_NAME once ACTIVE.
    gcloud_tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$TPU_VERSION" ${extra[@]+"${extra[@]}"}
  else
    gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$TPU_VERSION" --scopes="$SCOPES" \
      ${extra[@]+"${extra[@]}"}
  fi
}

cmd_setup() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch --all -q; else git clone -q $(printf '%q' "$REPO_URL") ~/$REMOTE_DIR; fi && git -C ~/$REMOTE_DIR checkout -q $(printf '%q' "$REPO_REF") && (git -C ~/$REMOTE_DIR pull -q --ff-only || true)"
  else
    # No REPO_URL: ship this checkout (tracked + untracked, not ignored files) to every worker.
    local tarball
    tarball="$(mktemp -t ardiff-XXXXXX.tar.gz)"
    (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$tarball")
    gcloud_tpu scp "$tarball" "$TPU_NAME:/tmp/ardiff.tar.gz" --worker=all
    rm -f "$tarball"
    fetch="mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/ardiff.tar.gz -C ~/$REMOTE_DIR"
  fi
  local pycheck="$PYTHON -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \"\$(hostname): $PYTHON is \$($PYTHON --version 2>&1); ardiff needs Python >= 3.11: sudo apt-get install -y python3.11 python3.11-venv and set PYTHON=python3.11\"; exit 1; }"
  on_all_workers "set -e; $pycheck; $fetch && cd ~/$REMOTE_DIR && mkdir -p logs && \
$PYTHON -m pip install -q --upgrade pip && \
$PYTHON -m pip install -q -r requirements.txt && \
$PYTHON -m pip install -q 'jax[tpu]==$JAX_VERSION' && \
$PYTHON -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
}

cmd_run() {
  local args="" a
  for a in "$@"; do args+=" $(printf '%q' "$a")"; done
  # Same command on every host; ARDIFF_DISTRIBUTED=1 makes ardiff call jax.distributed.initialize() first.
  # nohup + setsid + redirects: the run outlives the ssh session; the pid file lets `stop` find it.
  on_all_workers "$WORKER_ID; cd ~/$REMOTE_DIR && mkdir -p logs || exit 1; \
if [ -f logs/host-\$WORKER.pid ] && kill -0 \$(cat logs/host-\$WORKER.pid) 2>/dev/null; then \
echo \"worker \$WORKER: already running (pid \$(cat logs/host-\$WORKER.pid)); use stop first\"; exit 1; fi; \
ARDIFF_DISTRIBUTED=1 PYTHONUNBUFFERED=1 nohup setsid $PYTHON -m ardiff train --progress=false$args \
> logs/host-\$WORKER.log 2>&1 < /dev/null & echo \$! > logs/host-\$WORKER.pid; \
echo \"worker \$WORKER: pid \$(cat logs/host-\$WORKER.pid), log ~/$REMOTE_DIR/logs/host-\$WORKER.log\""
}

cmd_logs() {
  local n="${1:-50}"
  on_all_workers "$WORKER_ID; echo \"=== worker \$WORKER ===\"; tail -n $(printf '%q' "$n") ~/$REMOTE_DIR/logs/host-\$WORKER.log 2>/dev/null || echo '(no log yet)'"
}

cmd_stop() {
  # Kill the process group started by `run` (setsid made the pid its group leader).
  on_all_workers "$WORKER_ID; f=~/$REMOTE_DIR/logs/host-\$WORKER.pid; \
if [ -f \$f ] && kill -0 \$(cat \$f) 2>/dev/null; then kill -TERM -- -\$(cat \$f) && echo \"worker \$WORKER: stopped\"; \
else echo \"worker \$WORKER: not running\"; fi; rm -f \$f"
}

cmd_ssh() {
  on_all_workers "${*:-hostname}"
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_tpus queued-resources delete "$TPU_NAME" --force --quiet
  else
    gcloud_tpu delete "$TPU_NAME" --quiet
  fi
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    create) cmd_create "$@" ;;
    setup) cmd_setup "$@" ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    ssh) cmd_ssh "$@" ;;
    delete) cmd_delete "$@" ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) echo "unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

# Only act when executed, not when sourced (e.g. by a test).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
