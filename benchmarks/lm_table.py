"""The tables and plot of ``results/lm/*.json`` (training-free, by ``benchmarks/lm_compress.py``) and of
``results/lm/heal/*.json`` (healed, by ``dsformer sweep --config experiments/lm.yaml``) for ``docs/lm.md``.

.venv/bin/python benchmarks/lm_table.py            # prints the markdown tables, writes docs/lm_perplexity.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsformer.harness.results import measured_ratios  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_runs(folder: Path) -> list[dict]:
    return [json.loads(file.read_text()) for file in sorted(folder.glob("*.json"))]


def table(runs: list[dict]) -> str:
    dense = next((r for r in runs if r["method"] == "dense"), None)
    head = "| method | asked ratio | ratio by params | ratio by bytes | model bytes | perplexity | vs dense | fit (s) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    rows = sorted(runs, key=lambda r: (r["method"] != "dense", r["ratio"], r["test"]["perplexity"]))
    for run in rows:
        totals = run.get("report", {}).get("totals", {})
        ppl = run["test"]["perplexity"]
        versus = f"{ppl / dense['test']['perplexity']:.2f}x" if dense and run is not dense else ""
        lines.append(
            f"| {run['method']} | {'-' if run['method'] == 'dense' else format(run['ratio'], 'g') + 'x'} "
            f"| {totals.get('ratio_params', 1):.2f}x | {totals.get('ratio_bytes', 1):.2f}x "
            f"| {totals.get('ratio_model_bytes', 1):.2f}x | {ppl:.2f} | {versus} "
            f"| {run.get('fit_seconds', 0):.0f} |"
        )
    return "\n".join(lines)


def healed_table(healed: list[dict], free: list[dict]) -> str:
    """One row per healed run: the training-free perplexity of the same fit beside the healed one."""
    before = {(r["method"], r["ratio"]): r["test"]["perplexity"] for r in free}
    head = (
        "| method | trainer | ratio by params | ratio by bytes | training-free | healed | steps x tokens "
        "| s/step | run (min) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(healed, key=lambda r: (r["ratio"], r["test"]["perplexity"])):
        ratios = measured_ratios(run)
        dense = run["method"] == "dense"  # its training-free figure is the pretrained model's, at any ratio
        start = (
            next((p for (m, _), p in before.items() if m == "dense"), None)
            if dense
            else before.get((run["method"], run["ratio"]))
        )
        lines.append(
            f"| {run['method']} | {run['trainer']} | {ratios['ratio_params']:.2f}x | {ratios['ratio_bytes']:.2f}x "
            f"| {'-' if start is None else format(start, '.2f')} | {run['test']['perplexity']:.2f} "
            f"| {run['steps']} x {run['tokens'] // max(1, run['steps'])} | {run['mean_step_seconds']:.1f} "
            f"| {run['wall_seconds'] / 60:.0f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, healed: list[dict] = ()) -> None:
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    # the data-free fits (perplexity in the thousands to millions) would flatten every other curve
    shown = [r for r in runs if r["test"]["perplexity"] < 1000]
    methods = sorted({r["method"] for r in shown if r["method"] != "dense"})
    colors = {}
    for name in methods:
        points = sorted(
            (r["report"]["totals"]["ratio_bytes"], r["test"]["perplexity"]) for r in shown if r["method"] == name
        )
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=name)
        colors[name] = line.get_color()
    trained = next((r for r in healed if r["method"] == "dense"), None)
    if trained:  # the dense model trained by the healing recipe: the reference of the healed marks
        ax.axhline(trained["test"]["perplexity"], color="grey", linestyle=":", label="dense, trained the same way")
    for trainer, marker in (("conventional", "^"), ("stf", "*")):  # healed runs: their method's colour
        for name in sorted({r["method"] for r in healed if r["trainer"] == trainer}):
            points = sorted(
                (r["ratios"]["ratio_bytes"], r["test"]["perplexity"])
                for r in healed
                if r["method"] == name and r["trainer"] == trainer
            )
            ax.plot(*zip(*points, strict=True), marker=marker, markersize=10, linestyle=":", color=colors.get(name),
                    label=f"{name} healed, {trainer}")  # fmt: skip
    dense = next((r for r in runs if r["method"] == "dense"), None)
    if dense:
        ax.axhline(dense["test"]["perplexity"], color="black", linestyle="--", label="dense")
    ax.set_xlabel("compression of the target layers, by stored bytes (indices included)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: lines training-free (data-free fits off the scale), marks healed", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "lm")
    parser.add_argument("--healed", type=Path, default=ROOT / "results" / "lm" / "heal")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "lm_perplexity.png")
    args = parser.parse_args()
    runs = load_runs(args.results)
    print(table(runs))
    healed = load_runs(args.healed) if args.healed.is_dir() else []
    if healed:
        print("\n" + healed_table(healed, runs))
    plot(runs, args.plot, healed)


if __name__ == "__main__":
    main()
