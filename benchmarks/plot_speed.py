"""Plot stored ``dsformer bench`` results: speedup over dense, end to end and by part, one bar per file.

Run: ``.venv/bin/python benchmarks/plot_speed.py results/bench/minilm-ds-2.8x-cpu.json
results/bench/minilm-svd-2.8x-cpu.json --output docs/speed.png`` (needs matplotlib: ``pip install
'dsformer[report]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=Path("docs/speed.png"))
    args = parser.parse_args()
    records = {f.stem: json.loads(f.read_text()) for f in args.files}
    shapes = [(r["batch"], r["seq"]) for r in next(iter(records.values()))["runs"]]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.6), sharey=True, squeeze=False)
    groups = ["end to end", "attention linears", "ffn linears"]
    width = 0.8 / len(records)
    for ax, (batch, seq) in zip(axes[0], shapes, strict=True):
        for i, (label, record) in enumerate(records.items()):
            run = next(r for r in record["runs"] if (r["batch"], r["seq"]) == (batch, seq))
            parts = run["parts"]
            values = [run["end_to_end"]["speedup"], parts["attention"]["speedup"], parts["ffn"]["speedup"]]
            bars = ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
            ax.bar_label(bars, fmt="%.2fx", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([g + width * (len(records) - 1) / 2 for g in range(len(groups))], groups, fontsize=8)
        ax.set_title(f"batch {batch} x {seq} tokens")
    axes[0][0].set_ylabel("speedup over dense")
    axes[0][-1].legend(fontsize=7)
    hardware = next(iter(records.values()))["hardware"]
    fig.suptitle(f"{hardware['cpu']}, {hardware['cores']} cores, torch {hardware['torch']}", fontsize=9)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
