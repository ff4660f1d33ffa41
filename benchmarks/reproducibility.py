"""Are `make demo`'s figures the same every time, and how far do they move across CPU features?

Give it the `outputs/demo` folders of `make demo` runs (copy each away before the next), for
example two plain runs and one with the AVX-512 paths turned off, as on an AVX2-only CPU::

    make demo && cp -r outputs/demo /tmp/demo-a && rm -r outputs/demo
    make demo && cp -r outputs/demo /tmp/demo-b && rm -r outputs/demo
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DSFORMER_NATIVE=0 make demo
    cp -r outputs/demo /tmp/demo-avx2
    .venv/bin/python benchmarks/reproducibility.py a=/tmp/demo-a b=/tmp/demo-b avx2=/tmp/demo-avx2

It compares the runs' test accuracy, weights and DS supports, and refits DS at 2x on each run's
dense start (as STF's first projection does) to find where two runs part. Writes
``results/reproducibility.json`` with the hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import dsformer
from dsformer.hardware import describe
from dsformer.harness.models import load_pretrained

ROOT = Path(__file__).resolve().parents[1]


def fitted_indices(dense: Path) -> dict[str, torch.Tensor]:
    model, _ = load_pretrained(str(dense), task_head=True, num_labels=2)
    dsformer.compress(model, dsformer.CompressConfig(dsformer.DenseSparseConfig(ratio=2.0)), progress=False)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".indices")}


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    per = [(a[k] == b[k]).float().mean().item() for k in a]
    return {"mean": sum(per) / len(per), "lowest_layer": min(per)}


def compare(first: Path, second: Path) -> dict:
    out = {}
    for run in ("dense", "dsformer"):
        a, b = (json.loads((folder / run / "metrics.json").read_text()) for folder in (first, second))
        wa, wb = (load_file(str(folder / run / "model.safetensors")) for folder in (first, second))
        floats = [k for k in wa if wa[k].is_floating_point()]
        out[run] = {
            "test": [a["test"]["accuracy"], b["test"]["accuracy"]],
            "max_weight_difference": max((wa[k] - wb[k]).abs().max().item() for k in floats),
            "identical_tensors": sum(torch.equal(wa[k], wb[k]) for k in floats),
            "tensors": len(floats),
        }
        indices = [k for k in wa if k.endswith(".indices")]
        if indices:
            out[run]["support_agreement"] = agreement({k: wa[k] for k in indices}, {k: wb[k] for k in indices})
    out["refit_of_each_dense_start"] = agreement(
        fitted_indices(first / "dense"), fitted_indices(second / "dense")
    )  # the same fit on the two dense starts: how much of the support the starts' differences move
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=FOLDER, a make demo output folder per run; the first is the base")
    parser.add_argument("--out", default=str(ROOT / "results" / "reproducibility.json"))
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    names = list(runs)
    record = {"command": "python benchmarks/reproducibility.py " + " ".join(sys.argv[1:]), "hardware": describe()}
    record["runs"] = {
        name: json.loads((Path(folder) / "summary.json").read_text())["runs"] for name, folder in runs.items()
    }
    record["compared"] = {
        f"{names[0]} vs {name}": compare(Path(runs[names[0]]), Path(runs[name])) for name in names[1:]
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["compared"], indent=2))


if __name__ == "__main__":
    main()
