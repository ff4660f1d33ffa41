#!/usr/bin/env bash
# The GPU measurements, as one script for a machine with a GPU.
# Here, once:  bash benchmarks/gpu.sh prepare   (an fp16 copy of MiniLM under outputs/, 45 MB, to carry)
# There:       bash benchmarks/gpu.sh run       (PyTorch, Triton and transformers are installed there)
# Results: results/bench/gpu-layer-*.json and results/bench/minilm-ds-2.8x-cuda-fp16.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=outputs/minilm-fp16
case "${1:-}" in
  prepare)
    .venv/bin/python - <<'PY'
from dsformer.harness.models import load_pretrained
model, tokenizer = load_pretrained(None)
model.half().save_pretrained("outputs/minilm-fp16")
tokenizer.save_pretrained("outputs/minilm-fp16")
PY
    du -sh "$MODEL" ;;
  run)
    # Each step has its own time limit and log, so one that fails or hangs leaves the others' results.
    export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
    py=${PYTHON:-python3}
    out=${OUT:-results/bench}
    mkdir -p "$out"
    [ -f "$MODEL/config.json" ] || { echo "no $MODEL here: run 'bash benchmarks/gpu.sh prepare' and carry it" >&2; exit 2; }
    nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt" || true
    rc=0
    timeout 180 "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels.py -k "cuda or triton" \
      2>&1 | tee "$out/pytest.log" || rc=1
    timeout 180 "$py" benchmarks/gpu_layer.py --output "$out/gpu-layer-11008x4096-2x.json" 2>&1 | tee "$out/gpu-layer.log" || rc=1
    timeout 200 "$py" -m dsformer bench "$MODEL" --device cuda --dtype float16 --ratio 2.8 \
      --batch 1 1 8 32 --seq 1 64 128 128 --output "$out/minilm-ds-2.8x-cuda-fp16.json" 2>&1 | tee "$out/minilm.log" || rc=1
    exit $rc ;;
  *) echo "usage: bash benchmarks/gpu.sh prepare|run" >&2; exit 2 ;;
esac
