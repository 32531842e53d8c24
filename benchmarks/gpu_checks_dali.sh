#!/usr/bin/env bash
# Issue 5's GPU call: install the DALI wheels carried in parts (.dali1-4/part0*, git-ignored; see README "DALI
# loader"), run the DALI tests (GPU pipeline parity, JPEG via nvJPEG, loader=auto training; the CPU-pipeline tests
# too, now that DALI is there) and the loader benchmark. Each stage has its own time limit; results land in $OUT.
#   OUT=dir bash benchmarks/gpu_checks_dali.sh            (env: BENCH_S, TEST_S, SKIP_TESTS=1, BENCH_ARGS)
set -u
OUT=${OUT:-/tmp/gpu_dali}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg PYTHONPATH=$PWD
t0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
stamp "install DALI"
if ! python3 -c "import nvidia.dali" 2>/dev/null; then
  # each call's carried folder is removed by the next call, so every call copies its part to /tmp/parts
  mkdir -p /tmp/parts && cp .dali*/part0* /tmp/parts/ 2>/dev/null; ls -la /tmp/parts
  cat /tmp/parts/part00 /tmp/parts/part01 /tmp/parts/part02 /tmp/parts/part03 > /tmp/dali.tar || exit 3
  sha256sum /tmp/dali.tar
  mkdir -p /tmp/w && tar -xf /tmp/dali.tar -C /tmp/w || exit 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir /tmp/w/*.whl 2>&1 | tail -3
fi
python3 -c "import nvidia.dali as d, torch; print('DALI', d.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name(0))" || exit 5
nproc
stamp "tests"
[ -n "${SKIP_TESTS:-}" ] || timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs -s tests/test_dali_gpu.py tests/test_dali_hip.py \
  tests/test_dali_xray.py tests/test_dali_hc18.py tests/test_kernel_soft_argmax.py -m "gpu or dali" 2>&1 \
  | grep -v "^$" | tail -40 | tee "$OUT/tests.log"
stamp "loader benchmark"
timeout "${BENCH_S:-300}" python3 benchmarks/loader_bench.py --out "$OUT" ${BENCH_ARGS:---n-images 128 --epochs 2 --image-hw 480x640 --workers 2,16 --steps 8} 2>&1 \
  | tail -80
stamp "done"
