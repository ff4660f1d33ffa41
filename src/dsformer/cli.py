"""``dsformer <verb>``: a thin layer over the library; every verb is one library call.

Errors on bad input print one line (``dsformer: error: ...``) and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from dsformer.errors import DsformerError


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsformer", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    fac = verbs.add_parser("factorize", help="factorize a pretrained model's linears and save the compact model")
    fac.add_argument("--model", default=None, help="local folder or hub name (default: the embedded all-MiniLM-L6-v2)")
    fac.add_argument("--structure", choices=["ds", "svd", "nm"], default="ds", help="weight structure (default: ds)")
    fac.add_argument(
        "--ratio", type=_number, default=2.0, help="compression ratio of the factorized layers (default: 2)"
    )
    fac.add_argument("--output", default=None, help="folder to write (default: outputs/<model>-<structure>-<ratio>x)")
    fac.add_argument("--json", default=None, help="also write the report as JSON to this file")
    fac.add_argument(
        "--targets", nargs="+", default=None, help="module names, suffixes or re: patterns (default: block linears)"
    )
    fac.add_argument("--exclude", nargs="+", default=None, help="module names, suffixes or re: patterns to leave dense")
    fac.add_argument("--k", type=int, default=None, help="ds: fix the basis size k instead of searching it")
    fac.add_argument("--iters", type=int, default=None, help="ds: alternating-minimization rounds")
    fac.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    fac.add_argument("--no-save", action="store_true", help="only report, write no model folder")
    fac.add_argument("--quiet", action="store_true", help="no progress bar")

    mer = verbs.add_parser("merge", help="export a saved compact model as a plain dense Hugging Face folder")
    mer.add_argument("path", help="folder written by dsformer factorize")
    mer.add_argument("output", help="folder to write")

    info = verbs.add_parser("info", help="print the report stored in a saved compact model")
    info.add_argument("path")

    data = verbs.add_parser("data", help="download and convert the embedded default data (MR)")
    data.add_argument("name", choices=["mr"])
    data.add_argument("--sdist", default=None, help="a local vaderSentiment-3.3.2.tar.gz instead of downloading it")
    data.add_argument("--force", action="store_true", help="convert again even if the data is there")
    return parser


def _default_output(model: str | None, structure: str, ratio: float) -> str:
    name = Path(model.rstrip("/")).name if model else "minilm"
    return os.path.join("outputs", f"{name}-{structure}-{ratio:g}x")


def _structure(args: argparse.Namespace):
    from dsformer.structures import structure_config
    from dsformer.structures.base import check_ratio

    options = {"ratio": check_ratio(args.ratio)}
    if args.structure == "ds":
        if args.k is not None:
            options["k"] = args.k
        if args.iters is not None:
            options["iters"] = args.iters
    elif args.k is not None or args.iters is not None:
        raise DsformerError("--k and --iters apply to --structure ds only")
    return structure_config(args.structure, **options)


def factorize(args: argparse.Namespace) -> None:
    import torch

    from dsformer import CompressConfig, compress, save
    from dsformer.io import check_output
    from dsformer.models import load_pretrained, resolve

    structure = _structure(args)
    output = None if args.no_save else Path(args.output or _default_output(args.model, args.structure, args.ratio))
    if output is not None:
        check_output(output, source=resolve(args.model))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DsformerError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    model, tokenizer = load_pretrained(args.model)
    model = model.to(args.device).eval()
    config = CompressConfig(structure, target_modules=args.targets, exclude_modules=args.exclude)
    report = compress(model, config, progress=not args.quiet)
    print(report.table())
    if args.json:
        _write_json_atomic(Path(args.json), report.to_json())
        print(f"report written to {args.json}")
    if output is not None:
        save(model.cpu(), output, tokenizer=tokenizer, report=report)
        size = (output / "model.safetensors").stat().st_size
        print(f"saved to {output} ({size / 2**20:.1f} MiB); load it with dsformer.load({str(output)!r})")


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def merge(args: argparse.Namespace) -> None:
    from dsformer import export_dense
    from dsformer.io import check_output

    check_output(Path(args.output), source=args.path)
    out = export_dense(args.path, args.output)
    print(f"dense Hugging Face model written to {out}")


def info(args: argparse.Namespace) -> None:
    from dsformer.io import read_meta
    from dsformer.report import Report

    meta = read_meta(args.path)
    print(f"{args.path}: {meta['model_class']}, {len(meta['layers'])} compact layers, format {meta['format_version']}")
    if meta.get("report"):
        print(Report.from_json(meta["report"]).table())


def data(args: argparse.Namespace) -> None:
    from dsformer.data import mr

    path = mr.prepare(args.sdist, force=args.force)
    with open(path, encoding="utf-8") as f:
        count = sum(1 for _ in f) - 1
    print(f"MR: {count} labelled sentences in {path}")


def _quiet_libraries() -> None:
    """Keep other libraries' progress bars and notices off stderr, where our errors go as one line."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        {"factorize": factorize, "merge": merge, "info": info, "data": data}[args.verb](args)
    except DsformerError as err:
        print(f"dsformer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsformer: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
