"""Where a decode step of a causal LM spends its time: the PyTorch profiler over greedy steps with the KV
cache at batch 1, operators by self time, and the share of matrix products (the linears and the LM head).

    .venv/bin/python benchmarks/lm_decode_profile.py [model folder, default: the embedded SmolLM2] \\
        --output results/bench/smollm2-decode-profile-<tag>.json

Run alone on the machine. The model is loaded as it is stored (float32 for SmolLM2's converted folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from dsformer.hardware import describe
from dsformer.harness.data.smollm2 import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    folder = args.model or prepare()  # converted once, then reused
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(5):  # warm-up steps
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [
        {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / args.steps,
         "share": e.self_cpu_time_total / total, "calls_per_step": e.count / args.steps}
        for e in events[:15]
    ]  # fmt: skip
    for row in rows:
        print(f"{row['op']:55s} {row['self_ms_per_step']:7.2f} ms/step  {100 * row['share']:5.1f}%  "
              f"{row['calls_per_step']:6.1f} calls/step")  # fmt: skip
    products = sum(r["share"] for r in rows if r["op"] in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"matrix products: {100 * products:.1f}% of the operators' self time over {args.steps} steps")
    if args.output:
        record = {"command": "benchmarks/lm_decode_profile.py", "model": str(folder), "steps": args.steps,
                  "operator_ms_per_step": total / 1000 / args.steps, "matrix_product_share": products,
                  "top": rows, "hardware": describe()}  # fmt: skip
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
