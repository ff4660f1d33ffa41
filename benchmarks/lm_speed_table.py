"""The table of docs/speed.md's causal-LM section from the runs of benchmarks/lm_speed.sh: per model and
precision, the prefill and decode ratios of each run and their median, with dense and compressed tokens/s.

    .venv/bin/python benchmarks/lm_speed_table.py results/bench/smollm2-*-intel-xeon-run*.json
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(paths: list[str]) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(paths):
        label = re.sub(r"-run\d+\.json$", "", Path(path).name)
        record = json.loads(Path(path).read_text())
        groups[label] += [dict(run, hardware=record["hardware"]) for run in record["runs"]]
    print("| model | dtype | prefill 1 x 512, runs | median | decode, runs | median | decode tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in groups.items():
        fill = [r["prefill_end_to_end"]["speedup"] for r in runs]
        step = [r["decode_end_to_end"]["speedup"] for r in runs]
        dense = statistics.median(r["decode_end_to_end"]["dense_tokens_per_s"] for r in runs)
        compact = statistics.median(r["decode_end_to_end"]["compact_tokens_per_s"] for r in runs)
        ratios = [", ".join(f"{x:.2f}x" for x in xs) for xs in (fill, step)]
        middle = [f"**{statistics.median(xs):.2f}x**" for xs in (fill, step)]
        cells = [label, runs[0]["dtype"], ratios[0], middle[0], ratios[1], middle[1], f"{dense:.1f} -> {compact:.1f}"]
        print("| " + " | ".join(cells) + " |")
    hardware = {json.dumps(r["hardware"], sort_keys=True) for runs in groups.values() for r in runs}
    for h in hardware:
        print(f"\nhardware: {h}")


if __name__ == "__main__":
    main(sys.argv[1:])
