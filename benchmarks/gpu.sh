#!/usr/bin/env bash
# Issue 5's GPU measurements, as one script for a lent GPU machine (see the device tool's README).
# Here, once:  bash benchmarks/gpu.sh prepare   (an fp16 copy of MiniLM under outputs/, 45 MB, to carry)
# There:       bash benchmarks/gpu.sh run       (PyTorch, Triton and transformers are installed there)
# Results: results/bench/gpu-layer-*.json and results/bench/minilm-ds-2.8x-cuda-fp16.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=outputs/minilm-fp16
case "${1:-}" in
  prepare)
    .venv/bin/python - <<'PY'
from dsformer.models import load_pretrained
model, tokenizer = load_pretrained(None)
model.half().save_pretrained("outputs/minilm-fp16")
tokenizer.save_pretrained("outputs/minilm-fp16")
PY
    du -sh "$MODEL" ;;
  run)
    export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    out=${OUT:-results/bench}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt"
    python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels.py -k "cuda or triton" || true
    python benchmarks/gpu_layer.py --output "$out/gpu-layer-11008x4096-2x.json"
    python -m dsformer.cli bench "$MODEL" --device cuda --dtype float16 --ratio 2.8 \
      --batch 1 1 8 32 --seq 1 64 128 128 --output "$out/minilm-ds-2.8x-cuda-fp16.json" ;;
  *) echo "usage: bash benchmarks/gpu.sh prepare|run" >&2; exit 2 ;;
esac
