#!/usr/bin/env bash
# Real file sizes of int8 folders (dsformer quantize: int8 values, fp32 row scales, bit-packed indices)
# for the MR dense start and its DS and SVD factorizations at 2x. The factorizations are fit only:
# STF and conventional training keep each layer's layout (k, s or rank), and the layout alone sets
# the bytes, so these are the sizes of the trained models too (checked against their fp32 bytes).
#   bash benchmarks/int8_sizes.sh [DENSE_START] [OUT]   -> results/compose/int8-sizes.json
set -euo pipefail
cd "$(dirname "$0")/.."
B=${DSFORMER:-.venv/bin/dsformer}
START=${1:-outputs/sweeps/mr/mr-dense-s0}
OUT=${2:-outputs/int8-sizes}
for s in ds svd; do
  [ -d "$OUT/$s-2x" ] || $B compress --model "$START" --structure "$s" --ratio 2 --output "$OUT/$s-2x" --quiet
  [ -d "$OUT/$s-2x-int8" ] || $B quantize "$OUT/$s-2x" "$OUT/$s-2x-int8" --task mr
done
[ -d "$OUT/dense-int8" ] || $B quantize "$START" "$OUT/dense-int8"
.venv/bin/python - "$START" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from dsformer.hardware import describe
start, out = Path(sys.argv[1]), Path(sys.argv[2])
size = lambda f: (f / "model.safetensors").stat().st_size
folders = {"dense fp32": start, "dense int8": out / "dense-int8"}
for s in ("ds", "svd"):
    folders[f"{s} 2x fp32"] = out / f"{s}-2x"
    folders[f"{s} 2x int8"] = out / f"{s}-2x-int8"
result = {
    "command": "bash benchmarks/int8_sizes.sh " + " ".join(sys.argv[1:]),
    "files": {name: {"folder": str(f), "model_safetensors_bytes": size(f)} for name, f in folders.items()},
    "int8_layers": {name: json.loads((f / "metrics.json").read_text())["int8"] for name, f in folders.items() if "int8" in name},
    "hardware": describe(),
}
path = Path("results/compose/int8-sizes.json")
path.write_text(json.dumps(result, indent=2) + "\n")
for name, f in folders.items():
    print(f"{name:12s} {size(f) / 2**20:8.2f} MiB")
PY
