"""STF training-step cost against a dense fine-tuning step, both measured in one run.

MiniLM with a classification head, MR batches of 32, AdamW; the STF step includes its share of
the periodic re-projection (every ``--refresh-every`` steps, ``--iters`` DS rounds). Writes
``results/stf_step.json``. Run: ``.venv/bin/python benchmarks/stf_step.py`` (about 3 minutes on
2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dsformer.hardware import describe
from dsformer.harness.evaluation import encode
from dsformer.harness.models import load_pretrained
from dsformer.harness.tasks import load_task
from dsformer.stf import STF, Schedule
from dsformer.structures import DenseSparseConfig

ROOT = Path(__file__).resolve().parents[1]


def time_steps(model, batches, steps: int, stf: STF | None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = []
    for step in range(1, steps + 1):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stf is not None:
            stf.step(step)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--out", default=str(ROOT / "results" / "stf_step.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_task("mr")
    model, tokenizer = load_pretrained(None, task_head=True, num_labels=2)
    features = encode(tokenizer, data.train[: 32 * 8], 128, data.spec)
    batches = [dict(tokenizer.pad(features[i : i + 32], return_tensors="pt")) for i in range(0, len(features), 32)]
    dense = time_steps(copy.deepcopy(model), batches, args.steps, None)
    stf_model = copy.deepcopy(model)
    stf = STF.wrap(stf_model, DenseSparseConfig(ratio=args.ratio), schedule=Schedule(args.refresh_every, args.iters))
    stf_times = time_steps(stf_model, batches, args.steps, stf)
    skip = 2  # warm-up steps
    result = {
        "command": "python benchmarks/stf_step.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "refresh_every": args.refresh_every,
        "iters": args.iters,
        "ratio": args.ratio,
        "dense_step_seconds": statistics.mean(dense[skip:]),
        "stf_step_seconds": statistics.mean(stf_times[skip:]),
        "hardware": describe(),
    }
    result["stf_over_dense"] = result["stf_step_seconds"] / result["dense_step_seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
