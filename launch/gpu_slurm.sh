#!/usr/bin/env bash
# Train tfx on a SLURM GPU cluster: writes an sbatch script that starts one
# `python3 -m tfx.train` per GPU (default) or per node, with the coordinator on
# the job's first node and process ids from SLURM_PROCID / SLURM_NTASKS, then
# submits it. The checkout must sit on a filesystem every node can read.
#
#   launch/gpu_slurm.sh --nodes=4 --gpus_per_node=8 \
#     --config=experiments/transfusion.py:size=1.4B --workdir=/shared/runs/x \
#     [--per=gpu|node] [--partition=P] [--account=A] [--time=HH:MM:SS] \
#     [--job_name=tfx] [--port=8476] [--python=python3] [--dry-print] \
#     [-- EXTRA tfx.train FLAGS]
#
# A URL workdir (gs://...) makes the job first install tfx[gcs] (what tfx needs
# to write there) into --python's environment, which every node must share.
# --dry-print prints the sbatch script and the sbatch command instead of
# submitting; the script and the job logs go to slurm_logs/ in the checkout.
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
}

die() {  # command-line misuse: one line, exit 2
  echo "gpu_slurm.sh: $*" >&2
  exit 2
}

NODES="" GPUS="" CONFIG="" WORKDIR="" PER=gpu PARTITION="" ACCOUNT="" TIME="" JOB=tfx PORT=8476 PY=python3 DRY=0
EXTRA=()
while (($#)); do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --per=*) PER="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --job_name=*) JOB="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --dry-print) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes='$NODES' must be a positive integer"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node='$GPUS' must be a positive integer"
[[ -n "$CONFIG" ]] || die "missing --config=experiments/FILE.py[:ARGS]"
[[ -f "${CONFIG%%:*}" ]] || die "--config file '${CONFIG%%:*}' does not exist (paths are relative to the tfx checkout)"
[[ -n "$WORKDIR" ]] || die "missing --workdir=PATH (a shared filesystem path or gs://)"
[[ "$PER" == gpu || "$PER" == node ]] || die "--per='$PER' must be 'gpu' or 'node'"
[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "--port='$PORT' is not a TCP port"
[[ "$JOB" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job_name='$JOB' may hold only letters, digits, '_', '.', '-'"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOGS="$REPO/slurm_logs"
TASKS_PER_NODE=$([[ "$PER" == gpu ]] && echo "$GPUS" || echo 1)

q() {  # one shell-quoted line; single quotes only where a word needs them
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then out+="$a "
    else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

# Each task: pin its GPU (per-gpu mode), then join the job as process SLURM_PROCID.
if [[ "$PER" == gpu ]]; then
  TASK='export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; '
else
  TASK=''
fi
TASK+='exec "$@" --coordinator_address="$TFX_COORDINATOR" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'

script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$JOB"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --exclusive"
  echo "#SBATCH --output=$LOGS/%x-%j.out"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  [[ -n "$TIME" ]] && echo "#SBATCH --time=$TIME"
  echo "set -euo pipefail"
  echo "cd $(q "$REPO")"
  echo 'export TFX_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'"$PORT"'"'
  if [[ "$WORKDIR" =~ ^[A-Za-z0-9+.-]+:// ]]; then
    q "$PY" -m pip install -q -e "$REPO[gcs]"
  fi
  echo "srun --kill-on-bad-exit=1 bash -c $(q "$TASK") tfx-task $(q "$PY" -m tfx.train --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
}

SCRIPT_PATH="$LOGS/$JOB.sbatch"
if ((DRY)); then
  script
  echo "# submit with:"
  echo "# sbatch $(q "$SCRIPT_PATH")"
  exit 0
fi
mkdir -p "$LOGS"
script > "$SCRIPT_PATH"
echo "+ sbatch $SCRIPT_PATH" >&2
sbatch "$SCRIPT_PATH"
