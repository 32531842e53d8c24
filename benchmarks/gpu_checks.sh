#!/usr/bin/env bash
# The GPU checks of the kernels issue in one call (benchmarks/results/kernels_h200_20261126.md holds what they gave):
#   1. the gpu-marked tests: every kernel compiled (not interpreted), full shape sweep, bf16 error rule, and the
#      MultiHipPoseNet training step with the Triton ops vs the references;
#   2. benchmarks/kernel_bench.py: torch eager vs torch.compile vs Triton, fwd and fwd+bwd, against the measured copy
#      bandwidth — fp32 for every op, bf16 for the ME-GCT ops (the dtype they run in under autocast);
#   3. the soft-argmax launch-parameter sweep and a profile of gct_gate at a small-map level;
#   4. a short `medpose train` of the hip demo on the GPU (bf16 autocast, targets rendered on the device).
# Each stage has its own time limit and writes as it goes, so a stopped stage keeps what it measured.
# Usage (repo root, GPU machine): OUT=some/folder bash benchmarks/gpu_checks.sh   (STAGES="tests fp32 bf16 extra e2e")
set -u
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg
PY=${PY:-python3}
STAGES=${STAGES:-"tests fp32 bf16 extra e2e"}
LOG="$OUT/bench.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$LOG"
for stage in $STAGES; do
  case $stage in
    tests) timeout "${TEST_TIMEOUT:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider -rs \
             tests/test_kernel_gct_gate.py tests/test_kernel_soft_argmax.py tests/test_kernel_heatmap_render.py \
             tests/test_kernels_in_models.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    fp32) timeout "${FP32_TIMEOUT:-300}" $PY benchmarks/kernel_bench.py --out "$OUT" --dtype fp32 \
            ${FP32_ARGS:-} 2>&1 | tee -a "$LOG" ;;
    bf16) timeout "${BF16_TIMEOUT:-200}" $PY benchmarks/kernel_bench.py --out "$OUT" --dtype bf16 \
            --ops gct_gate,gct_gate_conv1x1 ${BF16_ARGS:-} 2>&1 | tee -a "$LOG" ;;
    extra) timeout "${EXTRA_TIMEOUT:-90}" $PY benchmarks/kernel_bench.py --out "$OUT" --ops "" --sweep --profile \
             --no-compile 2>&1 | tee -a "$LOG" ;;
    e2e) timeout "${E2E_TIMEOUT:-120}" $PY -m launch.cli train --config hip_demo data.root=/tmp/medpose_e2e/data \
           data.synth_n=48 train.max_steps=100 train.eval_every=50 train.ckpt_every=50 \
           log.runs_root=/tmp/medpose_e2e/runs 2>&1 | tail -40 | tee -a "$LOG" ;;
  esac
done
