#!/usr/bin/env bash
# The GPU checks of issue 11/16, in one script (≤ 8 minutes on one H200 with 16 CPU cores):
#
#   1. engine benchmark, --device cuda          → OUT/bench_engine.json   (benchmarks/bench_engine.py)
#   2. training benchmark, --device cuda        → OUT/bench_training.json (benchmarks/bench_training.py)
#   3. one fine-tuned training (--train-backbone all) of CMRCNet on every HER2ST section
#                                               → OUT/cmrc_all.safetensors, OUT/train_all.json
#   4. its evaluation: leave-one-section-out, cmrc/ridge/bleep/regression (one call each),
#      backbone fine-tuned for every method and fold (ridge: frozen features, closed form),
#      the project's defaults                   → OUT/eval_her2st_loso_all_<method>.json
#
# Usage:  benchmarks/gpu_checks.sh DATA_DIR OUT_DIR
#   DATA_DIR  the shared data folder (holds her2st/, genelists/, wsi/ ...)
#   OUT_DIR   where every result goes (created)
# Environment:
#   PYTHON   interpreter (default: python); STPREDICT: the CLI (default: "$PYTHON -m napari_stpredict")
#   DEVICE   default cuda
#   SMOKE=1  tiny settings (a CPU run that checks the script end to end in a few minutes)
# Each step has its own time limit and its exit code is recorded in OUT/steps.tsv; a failed step
# does not stop the next one. The script's exit code is the number of failed steps.
set -uo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 DATA_DIR OUT_DIR" >&2
  exit 2
fi
DATA=$(cd "$1" && pwd) || { echo "gpu_checks: data folder $1 not found" >&2; exit 2; }
mkdir -p "$2" && OUT=$(cd "$2" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PYTHON=${PYTHON:-python}
read -r -a STP <<< "${STPREDICT:-$PYTHON -m napari_stpredict}"
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
export STPREDICT_SHARED_DATA="$DATA"
PANEL="$DATA/genelists/hist2st_her_hvg_cut_1000.npy"
for need in "$DATA/her2st/images/B4.jpg" "$PANEL"; do
  [[ -e $need ]] || { echo "gpu_checks: $need not found (is $DATA the shared data folder?)" >&2; exit 2; }
done

# the HER2ST manifest with its data paths pointing into DATA_DIR
MANIFEST="$OUT/her2st.yaml"
sed "s#\.\./\.\./\.\./shared/data#$DATA#g" benchmarks/data/her2st.yaml > "$MANIFEST"

# sections whose files are not in DATA_DIR (a partial copy of the shared data) are left out
"$PYTHON" - "$MANIFEST" <<'EOF'
import os, sys, yaml
p = sys.argv[1]
d = yaml.safe_load(open(p))
keep = [s for s in d["sections"] if all(os.path.exists(s[k]) for k in ("image", "counts") if k in s)]
left = sorted({s["name"] for s in d["sections"]} - {s["name"] for s in keep})
if left:
    print("gpu_checks: not in the data folder, left out:", ", ".join(left), file=sys.stderr)
d["sections"] = keep
yaml.safe_dump(d, open(p, "w"), sort_keys=False)
EOF

if [[ $SMOKE == 1 ]]; then
  # two sections only, so the CPU check stays short
  "$PYTHON" - "$MANIFEST" <<'EOF'
import sys, yaml
p = sys.argv[1]
d = yaml.safe_load(open(p))
d["sections"] = [s for s in d["sections"] if s["name"] in ("C2", "C3")]
yaml.safe_dump(d, open(p, "w"), sort_keys=False)
EOF
  # whatever makes the engine benchmark shortest in this version of it (C owns its options)
  ENGINE_ARGS=()
  ENGINE_HELP=$("$PYTHON" benchmarks/bench_engine.py --help 2>/dev/null || true)
  grep -q -- "--skip SKIP" <<< "$ENGINE_HELP" && ENGINE_ARGS+=(--skip feed,store,ratio,fullmap)
  grep -q -- "--rss-sizes" <<< "$ENGINE_HELP" && ENGINE_ARGS+=(--rss-sizes "")
  grep -q -- "--layouts" <<< "$ENGINE_HELP" && ENGINE_ARGS+=(--layouts "")
  grep -q -- "--cells" <<< "$ENGINE_HELP" && ENGINE_ARGS+=(--cells 32)
  grep -q -- "--repeats" <<< "$ENGINE_HELP" && ENGINE_ARGS+=(--repeats 1)
  TRAINB_ARGS=(--steps 2 --patch-px 64 --batch-size 8 --skip-full --sections C2,C3)
  TRAIN_ARGS=(--epochs 1 --max-steps 2 --patch-px 64 --batch-size 16)
  EVAL_ARGS=(--epochs 1 --max-steps 2 --patch-px 64 --batch-size 16 --test-sections C3)
  LIMIT_ENGINE=600 LIMIT_TRAINB=600 LIMIT_TRAIN=600
  LIMIT_EVAL_CMRC=600 LIMIT_EVAL_RIDGE=600 LIMIT_EVAL_BLEEP=600 LIMIT_EVAL_REGRESSION=600
else
  # engine ÷ raw at the GPU's batch sizes, feed rate and decode limit on a 2×2 mosaic; the memory
  # runs, store layouts and full map are CPU questions answered in docs/benchmarks.md
  read -r -a ENGINE_ARGS <<< "${ENGINE_ARGS:---batch-sizes 128,512 --read-workers 8 --mosaic 2 --skip fullmap,store --rss-sizes= --layouts=}"
  TRAINB_ARGS=(--steps 8 --patch-px 224 --batch-size 64 --skip-full)
  TRAIN_ARGS=(--epochs 20 --patch-px 224 --batch-size 64)
  EVAL_ARGS=(--epochs 12 --patch-px 224 --batch-size 64 --cv leave-one-section-out)
  # 100 + 60 + 60 + 60 + 40 + 55 + 45 = 420 s of limits (7 min), plus start-up
  LIMIT_ENGINE=${LIMIT_ENGINE:-130} LIMIT_TRAINB=${LIMIT_TRAINB:-50} LIMIT_TRAIN=${LIMIT_TRAIN:-80}
  LIMIT_EVAL_CMRC=${LIMIT_EVAL_CMRC:-120} LIMIT_EVAL_RIDGE=${LIMIT_EVAL_RIDGE:-50}
  LIMIT_EVAL_BLEEP=${LIMIT_EVAL_BLEEP:-70} LIMIT_EVAL_REGRESSION=${LIMIT_EVAL_REGRESSION:-45}
fi

echo -e "step\texit\tseconds" > "$OUT/steps.tsv"
FAILED=0
step() {  # name, limit (s), command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/log.txt"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/log.txt" 2>&1
  local rc=$?
  echo -e "$name\t$rc\t$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  [[ $rc -eq 0 ]] || FAILED=$((FAILED + 1))
}

{
  echo "gpu_checks $(date -u +%FT%TZ) device=$DEVICE smoke=$SMOKE data=$DATA"
  "$PYTHON" - <<'EOF'
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
print(json.dumps(info))
EOF
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. engine throughput (engine vs raw forward) and peak memory
step bench_engine "$LIMIT_ENGINE" "$PYTHON" benchmarks/bench_engine.py --device "$DEVICE" \
  "${ENGINE_ARGS[@]}" --json "$OUT/bench_engine.json"

# 2. training throughput (pipeline vs raw forward+backward)
TRAINB_DEVICE=()
if "$PYTHON" benchmarks/bench_training.py --help 2>/dev/null | grep -q -- "--device"; then
  TRAINB_DEVICE=(--device "$DEVICE")
fi
step bench_training "$LIMIT_TRAINB" "$PYTHON" benchmarks/bench_training.py --manifest "$MANIFEST" \
  "${TRAINB_DEVICE[@]}" "${TRAINB_ARGS[@]}" --json "$OUT/bench_training.json"

# 3. one fine-tuned CMRCNet on every section (the whole backbone trains)
step train_all "$LIMIT_TRAIN" "${STP[@]}" train "$MANIFEST" --method cmrc --train-backbone all \
  --device "$DEVICE" --pretrained offline --genes "$PANEL" "${TRAIN_ARGS[@]}" \
  --out "$OUT/cmrc_all.safetensors" --overwrite --json --quiet
# its training summary (history, validation Pearson r, wall time) as JSON
"$PYTHON" - "$OUT/cmrc_all.safetensors" "$OUT/train_all.json" >> "$OUT/log.txt" 2>&1 <<'EOF'
import json, sys
from napari_stpredict.model import load_model_file
try:
    meta = load_model_file(sys.argv[1], verify=False).metadata
except Exception as err:  # the training step failed: say so in the JSON
    meta = {"error": str(err)}
keep = ("method", "backbone", "input", "metrics", "history", "config", "training_sections")
json.dump({k: meta.get(k) for k in keep} | ({"error": meta["error"]} if "error" in meta else {}),
          open(sys.argv[2], "w"), indent=1)
EOF

# 4. its evaluation: every method, fine-tuned backbone, the project's defaults. One call per
# method (same folds, seed and budget), so a method that runs out of time still leaves the
# others' JSON; benchmarks/evaluation_tables.py puts them side by side.
for m in ${METHODS:-cmrc ridge bleep regression}; do
  lim_var="LIMIT_EVAL_${m^^}"
  step "evaluate_$m" "${!lim_var}" "${STP[@]}" evaluate "$MANIFEST" \
    --methods "$m" --train-backbone all --device "$DEVICE" \
    --pretrained offline --genes "$PANEL" "${EVAL_ARGS[@]}" --seed 0 \
    --out "$OUT/eval_her2st_loso_all_$m.json" --overwrite
done

echo "gpu_checks: $FAILED failed step(s); results in $OUT" | tee -a "$OUT/log.txt"
cat "$OUT/steps.tsv"
exit "$FAILED"
