#!/usr/bin/env bash
# Issue 18's GPU work in one call, two jobs side by side on one GPU machine:
#   1. benchmarks/gpu_checks_hc18.sh: train hc18_unet_gpu.yaml, score the test split with and without the flip test;
#   2. benchmarks/seed_study.py at lower CPU priority: the CPU recipe hc18_unet.yaml (fp32, as on a CPU) over training
#      seeds SEED_LIST for each variant in VARIANTS, all on the test split of data.split_seed=0 (the CPU study's split).
# The trainings share the card and the CPU cores, so their wall times are not throughput figures; the accuracy
# figures are. Everything that comes back is text: $OUT/summary_gpu.md, $OUT/summary_seeds.md, $OUT/all.tgz (logs,
# configs, reports, per-image rows, metrics; no checkpoints).
# Usage (repo root; HC18 subset copied into a git-ignored folder carried with the call, and .pyextra from
# benchmarks/gpu_carry_packages.sh):
#   HC18=.hc18 OUT=dir bash benchmarks/gpu_checks_hc18_all.sh
#   env: LIMIT_S (the whole thing, default 480), SEED_LIST (default "0 1 2"), PARALLEL (default 6),
#        VARIANTS (newline-separated NAME=OVERRIDES, default: base= and wide_aug=...), SEED_SET (more --set
#        KEY=VALUE, space-separated), GPU_ARGS (overrides for job 1), TRAIN_S / EVAL_S (job 1's stage limits)
set -u
OUT=${OUT:-/tmp/gpu_hc18_all}; mkdir -p "$OUT"
HC18=${HC18:-../shared/data/hc18}
PY=${PY:-python3}
LIMIT_S=${LIMIT_S:-480}
WORK=${WORK:-/tmp/hc18_all}
rm -rf "$WORK"; mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d "$PWD/.pyextra" ] && export PYTHONPATH=$PYTHONPATH:$PWD/.pyextra   # benchmarks/gpu_carry_packages.sh
VARIANTS=${VARIANTS:-"base=
wide_aug=data.scale_range=[0.75,1.23] data.rotation_deg=30"}
t0=$(date +%s)

( HC18="$HC18" OUT="$WORK/gpu" RUN="$WORK/gpu_run" PY="$PY" TRAIN_S="${TRAIN_S:-$(( LIMIT_S - 140 ))}" \
  EVAL_S="${EVAL_S:-50}" ARGS="${GPU_ARGS:-data.num_workers=6}" \
  timeout "$LIMIT_S" bash benchmarks/gpu_checks_hc18.sh > "$WORK/gpu_driver.log" 2>&1 ) &
gpu_pid=$!

vargs=(); while IFS= read -r v; do [ -n "$v" ] && vargs+=(--variant "$v"); done <<< "$VARIANTS"
sargs=(); for s in ${SEED_SET:-}; do sargs+=(--set "$s"); done
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 nice -n 10 timeout "$LIMIT_S" $PY benchmarks/seed_study.py --config hc18_unet \
  --seeds ${SEED_LIST:-0 1 2} --split-seed 0 --out "$WORK/seeds" --parallel "${PARALLEL:-6}" \
  --limit-s $(( LIMIT_S - 20 )) --set "data.root=$HC18" --set train.precision=fp32 "${sargs[@]}" "${vargs[@]}" \
  --title "hc18_unet (the CPU recipe, fp32) on a GPU, beside hc18_unet_gpu" > "$WORK/seeds.log" 2>&1
echo "seed study exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$WORK/seeds.log"
wait $gpu_pid
echo "gpu check exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$WORK/gpu_driver.log"

cp "$WORK/gpu/summary.md" "$OUT/summary_gpu.md" 2>/dev/null || echo "(no GPU summary)" > "$OUT/summary_gpu.md"
cp "$WORK/seeds/summary.md" "$OUT/summary_seeds.md" 2>/dev/null || echo "(no seed summary)" > "$OUT/summary_seeds.md"
tar -C "$WORK" --exclude='*.pt' --exclude='*.onnx' --exclude='tensorboard' --exclude='seeds/*/figures/overlay*' -czf "$OUT/all.tgz" .
cat "$OUT/summary_gpu.md" "$OUT/summary_seeds.md"
tail -n 5 "$WORK/seeds.log" "$WORK/gpu_driver.log"
