#!/usr/bin/env bash
# Issue 17's GPU figures in one call: benchmarks/gpu_throughput.py at full size on the GPU of this machine
# (`python benchmarks/gpu_throughput.py --help` explains every part and goal):
#   train         published MultiHipPoseNet at 384 x 512: largest bf16 batch; plain fp32 loop + DataLoader vs the
#                 engine with its levers (bf16, channels_last, fused, host_sync=log), and + torch.compile (goal >= 3x)
#   host_sync     the engine step with perf.host_sync=step vs log
#   small_levels  the hip_demo-sized network: eager vs torch.compile mode default vs reduce-overhead (CUDA graphs)
#   gct_gate      the Triton gate's bf16 backward vs fp32 backward at the five ME-GCT levels
#   dali          the DALI-fed step vs the in-memory step (goal: at most 3 % slower)
#   zero          only prints the gpu_checks_zero.sh command (ZERO=1 runs it here: ~8 more minutes)
# Results: $OUT.md and $OUT.json, rewritten after every part; default OUT=benchmarks/results/throughput_<gpu>_<date>.
#
# Usage (repo root, GPU machine):
#   bash benchmarks/gpu_checks_throughput.sh
# Under a 10-minute limit per command, split it (the second call appends to the same $OUT and takes the batch the
# train part found; the time limits below are guesses, no GPU measured this script's parts yet):
#   PARTS=train,host_sync bash benchmarks/gpu_checks_throughput.sh
#   PARTS=small_levels,gct_gate,dali bash benchmarks/gpu_checks_throughput.sh
# env: PARTS (default train,host_sync,small_levels,gct_gate,dali), OUT, PY (python3), ARGS (more options for
#      gpu_throughput.py, e.g. "--batch 32" to skip the batch search or "--dali-formats jpg"), FRESH=1 (start a new
#      $OUT.json instead of appending), ZERO=1, and per-part time limits in seconds: TRAIN_S (420), SYNC_S (90),
#      SMALL_S (240), GCT_S (120), DALI_S (180), ZERO_S (1200); QUICK=1 adds --quick (tiny sizes; also runs without
#      a GPU, writing /tmp/throughput_quick_<device>_<date>: a smoke test of this script).
# DALI: when nvidia.dali is missing and the wheel parts .dali*/part0* are here (git-ignored, see
# benchmarks/gpu_checks_dali.sh), it is installed first; otherwise the dali rows read "skipped".
set -u
export PYTHONUNBUFFERED=1 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg PYTHONPATH=$PWD
PY=${PY:-python3}
t0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

GPU=$($PY - <<'EOF'
import os, re, sys
try:
    import torch
except Exception as exc:  # noqa: BLE001
    sys.exit(f"cannot import torch: {exc}")
if not torch.cuda.is_available():
    if os.environ.get("QUICK"):
        print("cpu")
        sys.exit(0)
    sys.exit("no CUDA device here (QUICK=1 runs this script's smoke test; or python benchmarks/gpu_throughput.py "
             "--quick)")
words = [w for w in torch.cuda.get_device_name(0).lower().split() if w not in ("nvidia", "tesla", "geforce")]
print(re.sub(r"[^a-z0-9]+", "", words[0] if words else "gpu") or "gpu")
EOF
) || exit 3
# compiled Triton kernels on the GPU (gpu_throughput.py turns the interpreter on by itself where there is no GPU)
[ "$GPU" = cpu ] || export TRITON_INTERPRET=0
if [ -n "${QUICK:-}" ]; then OUT=${OUT:-/tmp/throughput_quick_${GPU}_$(date +%Y%m%d)}; fi
OUT=${OUT:-benchmarks/results/throughput_${GPU}_$(date +%Y%m%d)}
PARTS=${PARTS:-train,host_sync,small_levels,gct_gate,dali}
mkdir -p "$(dirname "$OUT")"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true; nproc; } \
  | tee "$OUT.gpu.txt"

if [[ ",$PARTS," == *",dali,"* ]] && ! $PY -c "import nvidia.dali" 2>/dev/null; then
  if ls .dali*/part00 >/dev/null 2>&1; then
    stamp "install DALI from .dali*/part0*"
    mkdir -p /tmp/parts && cp .dali*/part0* /tmp/parts/ && cat /tmp/parts/part0* > /tmp/dali.tar \
      && mkdir -p /tmp/w && tar -xf /tmp/dali.tar -C /tmp/w \
      && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir /tmp/w/*.whl 2>&1 | tail -3
  else
    stamp "nvidia.dali is not installed and no .dali*/part0* here: the dali rows will read skipped"
  fi
fi

EXTRA=()
[ -n "${FRESH:-}" ] || EXTRA+=(--append)
[ -z "${QUICK:-}" ] || EXTRA+=(--quick)
if [ -n "${ZERO:-}" ]; then PARTS="$PARTS,zero"; EXTRA+=(--run-zero); fi
stamp "gpu_throughput.py --parts $PARTS -> $OUT.md / $OUT.json"
# shellcheck disable=SC2086  # ARGS is split into options on purpose
$PY benchmarks/gpu_throughput.py --out "$OUT" --parts "$PARTS" "${EXTRA[@]}" \
  --part-timeout "train=${TRAIN_S:-420},host_sync=${SYNC_S:-90},small_levels=${SMALL_S:-240},gct_gate=${GCT_S:-120},dali=${DALI_S:-180},zero=${ZERO_S:-1200}" \
  ${ARGS:-} 2>&1 | grep --line-buffered -v -E "UserWarning|warnings.warn|^\s*$"
rc=${PIPESTATUS[0]}
stamp "done (exit $rc); table: $OUT.md"
exit "$rc"
