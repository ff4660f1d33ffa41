"""How the DS basis GEMM's speed depends on k: x (4096 x 384) @ B.T for B (k x 384), MiniLM's shapes.

The per-layer k search picks k by fit error alone, and lands on sizes such as 97, 266 or 351.
This measures the multiply-add rate at those k and at their multiples of 16 beside them, which
is what ``DenseSparseConfig(k_multiple=16)`` (``--option k_multiple=16``) would choose instead.

    .venv/bin/python benchmarks/gemm_alignment.py --output results/bench/gemm-k-alignment-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dsformer.files import atomic_write_text
from dsformer.hardware import describe

# k the default search picked for MiniLM at 2x and 2.8x, each beside the nearest multiples of 16
PAIRS = [(97, 96), (107, 112), (266, 256), (266, 272), (305, 304), (351, 352)]


def rate(tokens: int, d: int, k: int, repeats: int) -> float:
    """Median seconds of ``x @ B.T`` for ``x (tokens, d)`` and ``B (k, d)``."""
    x, basis = torch.randn(tokens, d), torch.randn(k, d)
    for _ in range(3):
        x @ basis.T
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ basis.T
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rows = []
    for picked, aligned in PAIRS:
        # alternate the two sizes so that a machine slowing down slows both
        pair = {k: [] for k in (picked, aligned)}
        for _ in range(3):
            for k in pair:
                pair[k].append(rate(args.tokens, args.d, k, args.repeats))
        a, b = (statistics.median(pair[k]) for k in (picked, aligned))
        macs = args.tokens * args.d
        row = {
            "k": picked,
            "k_aligned": aligned,
            "ms": 1000 * a,
            "ms_aligned": 1000 * b,
            "gmacs": macs * picked / a / 1e9,
            "gmacs_aligned": macs * aligned / b / 1e9,
        }
        row["rate_gain"] = row["gmacs_aligned"] / row["gmacs"]
        rows.append(row)
        print(
            f"k={picked:4d}: {row['ms']:6.2f} ms ({row['gmacs']:5.1f} GMAC/s)   "
            f"k={aligned:4d}: {row['ms_aligned']:6.2f} ms ({row['gmacs_aligned']:5.1f} GMAC/s)   "
            f"rate x{row['rate_gain']:.2f}"
        )
    if args.output:
        record = {
            "command": " ".join(["python", *sys.argv]),
            "tokens": args.tokens,
            "d": args.d,
            "rows": rows,
            "hardware": describe(),
        }
        atomic_write_text(Path(args.output), json.dumps(record, indent=2) + "\n")
        print(f"written: {args.output}")


if __name__ == "__main__":
    main()
