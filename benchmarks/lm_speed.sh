#!/usr/bin/env bash
# Prefill and decode speed of SmolLM2-135M compressed 2x, against its dense original, on this CPU.
# DS: the data-aware fit at 2x of the target parameters (the compress line below, about 10 minutes;
# skipped when the folder exists); low rank: svd at 2x, fitted in the bench. Each model and precision
# three times (the median of three runs is what to quote). Run it alone: timings share the cores.
#   bash benchmarks/lm_speed.sh [tag]      -> results/bench/smollm2-*-<tag>-run{1,2,3}.json
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
tag=${1:-cpu}
ds=outputs/smollm2-ds-aware-2x
B=.venv/bin/dsformer
# one ratio for every layer, as in the stored runs (a causal LM's default is now the global budget)
[ -f "$ds/config.json" ] || $B compress --model smollm2 --ratio 2 --calibration wikitext2 --no-global-budget \
    --data-dir ../shared/data/wikitext-2 --samples 64 --output "$ds" --quiet
for run in 1 2 3; do
  for dtype in float32 bfloat16; do
    $B bench "$ds" --dtype $dtype --repeats 5 --output "results/bench/smollm2-ds-aware-2x-$dtype-$tag-run$run.json"
  done
  $B bench smollm2 --structure svd --ratio 2 --repeats 5 --no-layers \
      --output "results/bench/smollm2-svd-2x-float32-$tag-run$run.json"
done
