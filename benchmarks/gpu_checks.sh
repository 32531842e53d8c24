#!/usr/bin/env bash
# The GPU checks of the kernels issue in one call (see benchmarks/results/kernels_*.md for what they gave):
#   1. the gpu-marked tests: every kernel compiled (not interpreted), full shape sweep, bf16 error rule, and the
#      MultiHipPoseNet training step with the Triton ops vs the references;
#   2. benchmarks/kernel_bench.py: torch eager vs torch.compile vs Triton, fwd and fwd+bwd, against the measured copy
#      bandwidth.
# Usage (repo root, GPU machine): OUT=some/folder bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider -rs \
    tests/test_kernel_gct_gate.py tests/test_kernel_soft_argmax.py tests/test_kernel_heatmap_render.py \
    tests/test_kernels_in_models.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/kernel_bench.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
