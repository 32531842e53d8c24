#!/usr/bin/env bash
# One node, N worker processes (DDP by default; add dist.strategy=deepspeed for ZeRO).
#
#   NPROC=4 launch/torchrun_single.sh --config hip_demo log.run_dir=runs/hip_4gpu [KEY=VALUE ...]
#
# runs exactly
#
#   torchrun --standalone --nproc_per_node=4 --max-restarts=3 \
#       -m launch.cli train --resume auto --config hip_demo log.run_dir=runs/hip_4gpu [KEY=VALUE ...]
#
# --standalone: c10d rendezvous on a free local port (no MASTER_ADDR/PORT to pick). --max-restarts: when a worker
# dies, torchrun stops the group and starts it again, up to MAX_RESTARTS times; --resume auto then continues from the
# latest complete checkpoint in log.run_dir (and starts fresh when there is none yet). Give a fixed log.run_dir so a
# relaunch of the same command resumes the same run.
#
# Environment: NPROC (default: the number of visible GPUs, or 1), MAX_RESTARTS (default 3), CORES (cores this node
# gives the job; default: nproc), TORCHRUN (default: torchrun). Each rank gets OMP_NUM_THREADS = CORES / NPROC (at
# least 1). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the restarted worker group gets a fresh rendezvous store; with the
# store shared across restarts (torch's default for c10d) the restarted gloo group read the dead group's addresses
# and failed to connect (measured with torch 2.14, see tests/test_fault_tolerance.py).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
CORES="${CORES:-$(nproc)}"
threads=$(( CORES / NPROC ))
export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
    -m launch.cli train --resume auto "$@"
