#!/usr/bin/env bash
# Issue 18's GPU item in one call: train launch/configs/hc18_unet_gpu.yaml (384 x 576, U-Net base 32, batch 16,
# 4000 steps, bf16 autocast) on the real HC18 subset, then score its best checkpoint on the held-out test split with
# and without the flip test. Stages have their own time limits; a training stopped at its limit keeps its last
# checkpoint (every 500 steps), which the eval stages score. Checkpoints stay out of $OUT (only text and figures
# come back); $OUT/summary.md holds the figures beside the CPU recipe's.
# Usage (repo root, GPU machine; HC18 copied into a git-ignored folder carried with the call, e.g. .hc18/, and the
# packages the machine lacks carried as .pyextra/: bash benchmarks/gpu_carry_packages.sh here first):
#   HC18=.hc18 OUT=dir bash benchmarks/gpu_checks_hc18.sh
#   env: TRAIN_S (training limit, default 420 s), EVAL_S (each eval, default 90 s), STEPS (default: the config's),
#        ARGS (more KEY=VALUE overrides), RUN (the run directory, default /tmp/hc18_gpu_run)
set -u
OUT=${OUT:-/tmp/gpu_hc18}; mkdir -p "$OUT"
HC18=${HC18:-../shared/data/hc18}
RUN=${RUN:-/tmp/hc18_gpu_run}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NUMBA_THREADING_LAYER=workqueue MPLBACKEND=Agg PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# packages the GPU image lacks, carried as .pyextra (benchmarks/gpu_carry_packages.sh)
[ -d "$PWD/.pyextra" ] && export PYTHONPATH=$PYTHONPATH:$PWD/.pyextra
PY=${PY:-python3}
t0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/stages.log"; }
[ -f "$HC18/annotations.csv" ] || { echo "no HC18 subset at $HC18 (annotations.csv, images/, masks/)"; exit 2; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  echo "cpu cores $(nproc)"; } 2>&1 | tee "$OUT/device.txt"

stamp "train (limit ${TRAIN_S:-420} s)"
rm -rf "$RUN"
# shellcheck disable=SC2086
timeout "${TRAIN_S:-420}" $PY -m launch.cli train --config hc18_unet_gpu "data.root=$HC18" "log.run_dir=$RUN" \
  log.progress=false log.overlays=4 ${STEPS:+train.max_steps=$STEPS} ${ARGS:-} > "$OUT/train.log" 2>&1
echo "train exit $?" | tee -a "$OUT/stages.log"
tail -30 "$OUT/train.log"
for f in metrics.jsonl config.yaml versions.json summary.txt report.json splits.json; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
done
[ -d "$RUN/figures" ] && cp -r "$RUN/figures" "$OUT/"

for flip in false true; do
  stamp "eval test, flip_test=$flip (limit ${EVAL_S:-90} s)"
  timeout "${EVAL_S:-90}" $PY -m launch.cli eval --checkpoint "$RUN" --split test --out "$OUT/eval_flip_$flip" \
    "eval.flip_test=$flip" log.overlays=0 > "$OUT/eval_flip_$flip.log" 2>&1
  echo "eval exit $?" | tee -a "$OUT/stages.log"
done

stamp "summary"
$PY - "$OUT" "$RUN" <<'EOF' 2>&1 | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, run = Path(sys.argv[1]), Path(sys.argv[2])
device = (out / "device.txt").read_text().strip().replace("\n", "; ")
rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "train"] \
    if (out / "metrics.jsonl").is_file() else []
print(f"# hc18_unet_gpu on the HC18 subset\n\ndevice: {device}\n")
if rows:
    print(f"trained to step {rows[-1]['step']}, {rows[-1].get('samples_per_s', float('nan')):.0f} samples/s at the "
          f"last log line")
best = run / "checkpoints" / "best.pt"
print(f"checkpoint scored: {best if best.is_file() else 'the latest (no best.pt)'}\n")
print("| row (50 held-out test images) | Dice | HC MAE mm | HC bias mm | landmark MRE mm |\n|---|---|---|---|---|")
print("| CPU recipe hc18_unet (1800 x 8, 2-core CPU, 25.4 min) | 0.9758 | 1.75 | +0.47 | 2.15 |")
for flip in ("false", "true"):
    rep = out / f"eval_flip_{flip}" / "report.json"
    if not rep.is_file():
        print(f"| GPU, flip_test={flip} | (no report) | | | |")
        continue
    f = json.loads(rep.read_text())["figures"]
    print(f"| GPU, flip_test={flip} | {f['seg_dice']:.4f} | {f['hc_mae_mm']:.2f} | {f['hc_bias_mm']:+.2f} | "
          f"{f.get('landmark_mre_mm', float('nan')):.2f} |")
EOF
stamp "done"
