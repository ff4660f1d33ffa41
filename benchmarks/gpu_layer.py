"""One large DS layer on the GPU against cuBLAS: the decode-shaped check.

A ``--out x --in`` linear (default 11008 x 4096, a 7B decoder's FFN up-projection) compressed
``--ratio`` times with DS, for a spread of the layouts that spend that budget (``k`` from low to
high). The speed of a layer does not depend on its values, only on its layout, so the factors
are random: each row gets ``s`` distinct atoms. For each layout and token count, the Triton path
(``dsformer.kernels.triton_ds``) and ``F.linear`` on the dense weight are timed alternately, each
as a CUDA graph of ``--calls`` back-to-back calls (what a decoder serving loop runs), and the
speedup is set against the byte limit: dense weight bytes over DS bytes (values, indices, bias).

    python benchmarks/gpu_layer.py --output results/bench/gpu-layer-11008x4096-h100.json

On CPU it needs ``TRITON_INTERPRET=1`` and small shapes, and times nothing meaningful; it checks
that the script runs (``--out 64 --in 32 --device cpu``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from dsformer.files import atomic_write_text
from dsformer.hardware import describe
from dsformer.kernels import seconds
from dsformer.structures.dense_sparse import DenseSparseFactors, DenseSparseLinear, budget_layouts
from dsformer.structures.dense_sparse.layout import spread


def random_layer(layout, dtype: torch.dtype, device: str, seed: int = 0) -> DenseSparseLinear:
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.rand(layout.n, layout.k, generator=gen).argsort(dim=1)[:, : layout.s]
    basis = torch.randn(layout.k, layout.d, generator=gen) / layout.d**0.5
    factors = DenseSparseFactors(layout, basis, torch.randn(layout.n, layout.s, generator=gen), atoms)
    return DenseSparseLinear(factors, torch.zeros(layout.out_features)).requires_grad_(False).to(device, dtype)


def graph_seconds(fn, calls: int, repeats: int, device: str) -> list[float]:
    """Seconds per call of ``fn``, captured ``calls`` times in one CUDA graph and replayed ``repeats`` times."""
    if device != "cuda":  # the interpreter: one timed call is enough to show the script runs
        return [seconds(fn, torch.device(device))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph (Triton autotunes here)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=int, default=11008)
    parser.add_argument("--in", dest="inp", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--layouts", type=int, default=4, help="layouts to time, spread over k (default 4)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calls", type=int, default=50, help="calls per CUDA graph (default 50)")
    parser.add_argument("--repeats", type=int, default=20, help="graph replays per path (default 20)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    for layout in spread(budget_layouts(args.out, args.inp, args.ratio), args.layouts):
        layer = random_layer(layout, dtype, args.device)
        weight = layer.materialize().contiguous()
        dense_bytes = weight.numel() * weight.element_size()
        for tokens in args.tokens:
            x = torch.randn(tokens, args.inp, device=args.device, dtype=dtype)
            want = F.linear(x, weight).float()
            error = (layer.run("triton", x).float() - want).norm() / want.norm()
            dense, compact = [], []
            dense_call = functools.partial(F.linear, x, weight)
            compact_call = functools.partial(layer.run, "triton", x)
            for _ in range(3):  # alternate, so a clock change hits both
                dense += graph_seconds(dense_call, args.calls, args.repeats, args.device)
                compact += graph_seconds(compact_call, args.calls, args.repeats, args.device)
            row = {
                "tokens": tokens,
                "k": layout.k,
                "s": layout.s,
                "dense_us": 1e6 * statistics.median(dense),
                "ds_us": 1e6 * statistics.median(compact),
                "byte_limit": dense_bytes / layer.weight_bytes(),
                "flop_limit": layout.out_features * layout.in_features / layout.value_params,
                "relative_error": float(error),
            }
            row["speedup"] = row["dense_us"] / row["ds_us"]
            row["of_byte_limit"] = row["speedup"] / row["byte_limit"]
            rows.append(row)
            print(
                f"k={layout.k:5d} s={layout.s:5d} T={tokens:4d}: dense {row['dense_us']:8.1f} us, "
                f"DS {row['ds_us']:8.1f} us -> {row['speedup']:.2f}x (byte limit {row['byte_limit']:.2f}x, "
                f"{row['of_byte_limit']:.2f} of it; error {row['relative_error']:.1e})",
                flush=True,
            )
    record = {"command": " ".join(["python", *sys.argv]), "args": vars(args), "rows": rows, "hardware": describe()}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
