#!/usr/bin/env bash
# Train tfx on a Cloud TPU VM pod slice (or several slices): create or reuse the
# TPU, copy this checkout to every worker, install it, and run the same
# `python3 -m tfx.train` on all workers. On TPU VMs jax.distributed.initialize()
# finds the coordinator and each worker's process id itself, so every worker
# gets the identical command.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE --accelerator=v5p-128 \
#     --config=experiments/transfusion.py:size=7B --workdir=gs://BUCKET/run \
#     [--project=P] [--version=RUNTIME] [--slices=N] [--spot] [--dry-print] \
#     [-- EXTRA tfx.train FLAGS]
#
# --slices=N>1 asks for N slices through a queued resource (nodes NAME-0..N-1,
# multislice over DCN) and adds --config.mesh.dcn_data=N to the train flags.
# --dry-print prints the commands, one per line, instead of running them.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
}

die() {  # command-line misuse: one line, exit 2
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

TPU="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" SLICES=1 SPOT=0 DRY=0
EXTRA=()
while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --slices=*) SLICES="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --dry-print) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$TPU" ]] || die "missing --tpu=NAME"
[[ "$TPU" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--tpu='$TPU' must be lowercase letters, digits and dashes"
[[ -n "$ZONE" ]] || die "missing --zone=ZONE"
[[ -n "$ACCELERATOR" ]] || die "missing --accelerator=TYPE (e.g. v5p-128)"
[[ "$ACCELERATOR" =~ ^v[0-9a-z]+-[0-9]+$ ]] || die "--accelerator='$ACCELERATOR' is not a TPU type like v5p-128"
[[ -n "$CONFIG" ]] || die "missing --config=experiments/FILE.py[:ARGS]"
[[ -f "${CONFIG%%:*}" ]] || die "--config file '${CONFIG%%:*}' does not exist (paths are relative to the tfx checkout)"
[[ -n "$WORKDIR" ]] || die "missing --workdir=gs://BUCKET/PATH"
[[ "$WORKDIR" == gs://?* ]] || die "--workdir='$WORKDIR' must be a gs:// path that every worker can reach"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices='$SLICES' must be a positive integer"

if [[ -z "$VERSION" ]]; then  # the TPU software image that matches the chip
  case "$ACCELERATOR" in
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/tfx-src-${TPU}.tar.gz"
LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")
SPOT_FLAG=()
((SPOT)) && SPOT_FLAG=(--spot)

if ((SLICES > 1)); then
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$TPU-$i"); done
  EXTRA=(--config.mesh.dcn_data="$SLICES" "${EXTRA[@]}")
else
  NODES=("$TPU")
fi

q() {  # one shell-quoted line; single quotes only where a word needs them
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then out+="$a "
    else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

TRAIN="cd ~/tfx && python3 -m tfx.train $(q --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
INSTALL="rm -rf ~/tfx && mkdir -p ~/tfx && tar -xzf ~/tfx-src.tar.gz -C ~/tfx && python3 -m pip install -q -U \"jax[tpu]\" -e \"\$HOME/tfx[gcs]\""

# 1. create the slice(s) unless they exist
if ((SLICES > 1)); then
  EXISTS=(gcloud compute tpus queued-resources describe "$TPU" "${LOCATION[@]}")
  CREATE=(gcloud compute tpus queued-resources create "$TPU" "${LOCATION[@]}" --node-count="$SLICES"
          --node-prefix="$TPU" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${SPOT_FLAG[@]}")
  WAIT="until [[ \"\$($(q "${EXISTS[@]}") --format='value(state.state)')\" == ACTIVE ]]; do sleep 30; done"
else
  EXISTS=(gcloud compute tpus tpu-vm describe "$TPU" "${LOCATION[@]}")
  CREATE=(gcloud compute tpus tpu-vm create "$TPU" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR"
          --version="$VERSION" "${SPOT_FLAG[@]}")
  WAIT=""
fi
PACK="cd $(printf '%q' "$REPO") && git ls-files -co --exclude-standard -z | tar --null -T - -czf $(printf '%q' "$TARBALL")"

COMMANDS=("$(q "${EXISTS[@]}") >/dev/null 2>&1 || $(q "${CREATE[@]}")")
[[ -n "$WAIT" ]] && COMMANDS+=("$WAIT")
COMMANDS+=("$PACK")
for node in "${NODES[@]}"; do  # 2. copy and install on every worker of every slice
  COMMANDS+=("$(q gcloud compute tpus tpu-vm scp "$TARBALL" "$node:tfx-src.tar.gz" --worker=all "${LOCATION[@]}")")
  COMMANDS+=("$(q gcloud compute tpus tpu-vm ssh "$node" --worker=all "${LOCATION[@]}" --command="$INSTALL")")
done
# 3. start training on every worker at once; a slice's ssh waits for its workers
RUN=()
for node in "${NODES[@]}"; do
  RUN+=("$(q gcloud compute tpus tpu-vm ssh "$node" --worker=all "${LOCATION[@]}" --command="$TRAIN")")
done

if ((DRY)); then
  printf '%s\n' "${COMMANDS[@]}" "${RUN[@]}"
  exit 0
fi
for c in "${COMMANDS[@]}"; do
  echo "+ $c" >&2
  bash -c "$c"
done
PIDS=()
for c in "${RUN[@]}"; do
  echo "+ $c" >&2
  bash -c "$c" & PIDS+=($!)
done
STATUS=0
for p in "${PIDS[@]}"; do wait "$p" || STATUS=$?; done
exit "$STATUS"
