"""Dense-sparse layers at decode sizes (1, 2, 4 tokens) with their factors streamed from memory.

A decoding model reads every weight once per token; a model larger than the cache reads them from
memory. Here each layer shape of SmolLM2-135M at 2x (the layouts of its data-aware fit) is made in
enough random copies to overflow the last-level cache, and the copies are run in turn, so each call
finds its factors in memory as a decode step does. Per shape and token count: the dense product
(``F.linear``), the decode path (``dsformer.kernels.decode``: one call of the compiled kernel) and the
bags path it replaces (the basis GEMM, then the weighted bags), microseconds a call and the dense
time over each. What it decides: below how many tokens the gather backend takes the decode path
(``decode.TOKENS``). Then the fixed cost of a call: tiny layers (16 x 16) in a loop, ``nn.Linear``,
the decode kernel's Python entry, and a dense-sparse layer on the ``dense`` and ``gather`` backends.
Run alone on the machine.

    .venv/bin/python benchmarks/decode_layers.py --output results/bench/decode-layers-<tag>.json   # 1 2 4 8 tokens
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from dsformer.hardware import describe
from dsformer.kernels import decode, gather, native

# (out, in, k, s, rows): SmolLM2-135M's layouts at 2x (q/o, k/v, gate/up, down)
SHAPES = [(576, 576, 185, 103, True), (192, 576, 123, 55, False), (1536, 576, 419, 130, True),
          (576, 1536, 471, 111, False)]  # fmt: skip
STREAM_BYTES = 1 << 30  # the copies of one shape: more than any last-level cache here


def median_us(fn, calls: int, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def time_shape(out: int, inp: int, k: int, s: int, by_rows: bool, token_counts: list[int]) -> list[dict]:
    n, d = (out, inp) if by_rows else (inp, out)  # n vectors of length d; columns: W = (C B)^T
    index_type = torch.uint8 if k <= 256 else torch.int16
    copies = max(8, STREAM_BYTES // (out * inp * 4))
    weights = [torch.randn(out, inp) for _ in range(copies)]
    factors = [
        (torch.randn(k, d), torch.randint(0, k, (n, s)).to(index_type), torch.randn(n, s)) for _ in range(copies)
    ]
    if by_rows:
        fast = [functools.partial(decode.rows, plan=decode.row_plan(i, v, b)) for b, i, v in factors]
        bags = [functools.partial(gather.ds_rows, basis=b, indices=i, values=v, bias=None) for b, i, v in factors]
    else:
        fast = [functools.partial(decode.columns, plan=decode.column_plan(i, v, b)) for b, i, v in factors]
        bags = [
            functools.partial(gather.ds_columns, plan=gather.column_plan(i, v, k), basis=b, bias=None)
            for b, i, v in factors
        ]
    rows = []
    for tokens in token_counts:
        x = torch.randn(1, tokens, inp)
        dense = median_us(lambda x=x: [F.linear(x, w) for w in weights], copies)
        ours = median_us(lambda x=x: [f(x) for f in fast], copies)
        bag = median_us(lambda x=x: [f(x) for f in bags], copies)
        rows.append({"shape": [out, inp], "layout": f"k={k} s={s}", "rows": by_rows, "tokens": tokens,
                     "dense_us": dense, "decode_us": ours, "bags_us": bag, "decode_speedup": dense / ours,
                     "bags_speedup": dense / bag, "copies": copies})  # fmt: skip
        print(f"{out:5d} x {inp:<5d} k={k:<3d} s={s:<3d} {'rows' if by_rows else 'cols'} T={tokens}: dense "
              f"{dense:6.1f} us, decode {ours:6.1f} us ({dense / ours:.2f}x), bags {bag:6.1f} us "
              f"({dense / bag:.2f}x)")  # fmt: skip
    return rows


def call_overheads() -> dict[str, float]:
    """Microseconds a call of tiny layers (16 x 16) with weights in cache: what a call costs besides its work."""
    from dsformer import kernels
    from dsformer.structures import DenseSparseLinear
    from dsformer.structures.dense_sparse.layout import DenseSparseFactors, DenseSparseLayout

    layout = DenseSparseLayout(16, 16, k=8, s=4)
    factors = DenseSparseFactors(layout, torch.randn(8, 16), torch.randn(16, 4), torch.randint(0, 8, (16, 4)))
    layer = DenseSparseLinear(factors).requires_grad_(False)
    linear = torch.nn.Linear(16, 16).requires_grad_(False)
    plan, x = decode.row_plan(layer.indices, layer.values, layer.basis), torch.randn(1, 1, 16)
    calls = 20000
    with torch.inference_mode():
        times = {"nn.Linear": median_us(lambda: [linear(x) for _ in range(calls)], calls),
                 "decode.rows": median_us(lambda: [decode.rows(x, plan) for _ in range(calls)], calls)}  # fmt: skip
        for backend in ("dense", "gather"):
            kernels.use_backend(layer, backend)
            times[f"DenseSparseLinear on {backend}"] = median_us(lambda: [layer(x) for _ in range(calls)], calls)
    for name, us in times.items():
        print(f"a call of a 16 x 16 layer, {name}: {us:.1f} us")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the compiled kernel does not run here (dsformer.kernels.native.available())")
    torch.manual_seed(0)
    rows = [row for shape in SHAPES for row in time_shape(*shape, args.tokens)]
    overheads = call_overheads()
    if args.output:
        hardware = {**describe(), "native_kernel": native.variant()}
        record = {"command": "benchmarks/decode_layers.py", "threads": torch.get_num_threads(), "rows": rows,
                  "call_overhead_us": overheads, "hardware": hardware}  # fmt: skip
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
