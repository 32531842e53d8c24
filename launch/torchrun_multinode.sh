#!/usr/bin/env bash
# M nodes x N processes, c10d rendezvous. Run the SAME command on every node (no --node-rank: with c10d the
# rendezvous assigns node ranks, and a node that joins late or is restarted simply joins the next round):
#
#   NNODES=2 NPROC=4 RDZV_HOST=node0.cluster RDZV_PORT=29500 JOB_ID=hip-2x4 \
#       launch/torchrun_multinode.sh --config hip_demo log.run_dir=/shared/runs/hip_2x4 [KEY=VALUE ...]
#
# runs exactly
#
#   torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=node0.cluster:29500 \
#       --rdzv_id=hip-2x4 --max-restarts=3 \
#       -m launch.cli train --resume auto --config hip_demo log.run_dir=/shared/runs/hip_2x4 [KEY=VALUE ...]
#
# RDZV_HOST is any one of the nodes (its torchrun hosts the rendezvous store on RDZV_PORT); JOB_ID must be the same on
# every node and new for each job. log.run_dir must be on a filesystem every node sees: rank 0 writes the
# checkpoints, every rank reads the one it resumes from. --max-restarts: when any worker dies, every node's torchrun
# stops its workers and the group re-forms, then --resume auto continues from the latest complete checkpoint.
#
# Environment: NNODES, RDZV_HOST (required), NPROC (default: visible GPUs, or 1), RDZV_PORT (29500), JOB_ID
# (medpose), MAX_RESTARTS (3), CORES (cores per node for the job; default nproc), TORCHRUN (torchrun). Each rank
# gets OMP_NUM_THREADS = CORES / NPROC (at least 1); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as in torchrun_single.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST to the host name of one node (it hosts the c10d rendezvous)}"
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
RDZV_PORT="${RDZV_PORT:-29500}"
JOB_ID="${JOB_ID:-medpose}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
CORES="${CORES:-$(nproc)}"
threads=$(( CORES / NPROC ))
export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "${TORCHRUN:-torchrun}" --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv_id="$JOB_ID" \
    --max-restarts="$MAX_RESTARTS" \
    -m launch.cli train --resume auto "$@"
