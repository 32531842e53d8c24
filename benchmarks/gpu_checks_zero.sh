#!/usr/bin/env bash
# Issue 6's GPU figures: install DeepSpeed from the wheels carried in .whl/ (git-ignored: deepspeed + its small
# dependencies for Python 3.11 / 3.12, see benchmarks/results/zero_memory_cpu_20261126.md), then on the GPUs present
#   1. the largest stacked hourglass that trains at batch 4 per device, 512 x 512, bf16, under DDP, ZeRO-2, ZeRO-3
#      and ZeRO-2/3 with CPU offload (benchmarks/zero_memory.py --largest);
#   2. samples/s of DDP vs ZeRO-2 on the published hourglass (2 x 256, 256 x 256) and MultiHipPoseNet (384 x 512).
# Results land in $OUT (largest.md / throughput.md + JSON). Each stage has its own time limit.
#   OUT=dir bash benchmarks/gpu_checks_zero.sh          (env: WORLD = GPUs to use, default all; LARGEST_S, TPUT_S)
# Make .whl/ first (12 MB, carried to the GPU machine as an ignored path), for each Python the machine may have:
#   pip wheel --no-deps -w .whl deepspeed==0.19.8          (PyPI has its source; this builds the pure-Python wheel)
#   pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 -d .whl \
#     hjson py-cpuinfo msgpack ninja pydantic einops packaging psutil tqdm
# (numpy and torch come with the machine; drop the numpy wheels pip adds)
set -u
OUT=${OUT:-/tmp/gpu_zero}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg PYTHONPATH=$PWD
t0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
stamp "install DeepSpeed"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links .whl --no-compile deepspeed 2>&1 | tail -3
fi
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())" || exit 5
WORLD=${WORLD:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
stamp "largest variant at batch 4 per device (world $WORLD)"
timeout "${LARGEST_S:-300}" python3 benchmarks/zero_memory.py --out "$OUT/largest" --largest --world "$WORLD" \
  --batch 4 --hw 512 --variants 2x256,4x256,8x256,8x512 --strategies ddp,zero2,zero3,zero2_offload,zero3_offload 2>&1 \
  | grep -v -i "warn" | tail -20
stamp "throughput DDP vs ZeRO-2"
timeout "${TPUT_S:-200}" python3 benchmarks/zero_memory.py --out "$OUT/throughput" --throughput --world "$WORLD" \
  --batch 8 --hw 256 --steps 10 --strategies ddp,zero2 2>&1 | grep -v -i "warn" | tail -12
stamp "done"
