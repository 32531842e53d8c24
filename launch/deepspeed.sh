#!/usr/bin/env bash
# The deepspeed launcher over the nodes of a hostfile (see launch/deepspeed_hostfile.example), ZeRO strategy:
#
#   cp launch/deepspeed_hostfile.example launch/hostfile   # then edit host names and slots
#   NUM_GPUS=4 launch/deepspeed.sh --config hip_demo log.run_dir=/shared/runs/hip_zero2 dist.deepspeed.zero_stage=2
#
# runs exactly
#
#   deepspeed --hostfile launch/hostfile --num_gpus 4 --no_local_rank --module launch.cli \
#       train --resume auto dist.strategy=deepspeed --config hip_demo log.run_dir=/shared/runs/hip_zero2 ...
#
# (--module is the deepspeed launcher's spelling of python's -m; --no_local_rank because launch.cli reads
# LOCAL_RANK from the environment, which the launcher sets together with RANK, WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT, instead of taking a --local_rank argument.) Options of the strategy are under dist.deepspeed (see
# engine/config.py). The deepspeed launcher has no --max-restarts: this script relaunches the whole job up to
# MAX_RESTARTS times when it fails, and --resume auto continues from the latest complete checkpoint each time.
#
# Environment: HOSTFILE (launch/hostfile), NUM_GPUS (default: all slots of each host), MAX_RESTARTS (3), CORES
# (cores per node for the job; default nproc), DEEPSPEED (deepspeed). OMP_NUM_THREADS = CORES / processes per node
# reaches the remote ranks through a DeepSpeed environment file (DS_ENV_FILE) written into the run's launch folder.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
HOSTFILE="${HOSTFILE:-$REPO/launch/hostfile}"
if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch/deepspeed.sh: hostfile $HOSTFILE not found (copy launch/deepspeed_hostfile.example)" >&2
    exit 2
fi
slots=$(awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub(/^slots=/, "", $i); print $i; exit } }' "$HOSTFILE")
NUM_GPUS="${NUM_GPUS:-${slots:-1}}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
CORES="${CORES:-$(nproc)}"
threads=$(( CORES / NUM_GPUS ))
export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
env_dir="${DS_ENV_DIR:-$REPO/runs/.launch}"
mkdir -p "$env_dir"
export DS_ENV_FILE="$env_dir/deepspeed_env.$$"
printf 'OMP_NUM_THREADS=%s\nPYTHONPATH=%s\n' "$OMP_NUM_THREADS" "$PYTHONPATH" > "$DS_ENV_FILE"
trap 'rm -f "$DS_ENV_FILE"' EXIT
attempt=0
until "${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --num_gpus "$NUM_GPUS" --no_local_rank \
        --module launch.cli train --resume auto dist.strategy=deepspeed "$@"; do
    attempt=$(( attempt + 1 ))
    if (( attempt > MAX_RESTARTS )); then
        echo "launch/deepspeed.sh: failed $attempt times, giving up" >&2
        exit 1
    fi
    echo "launch/deepspeed.sh: job failed, relaunching ($attempt/$MAX_RESTARTS) to resume from the latest checkpoint" >&2
done
