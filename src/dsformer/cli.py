"""``dsformer <verb>``: a thin layer over the library; every verb is one library call.

Errors on bad input print one line (``dsformer: error: ...``) and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dsformer.errors import DsformerError, Interrupted

BACKENDS = ("auto", "reference", "dense", "gather", "triton", "int8")  # dsformer.kernels.BACKENDS, without torch
# the labels `dsformer report` sets against the baselines unless told others: the method, and with --fisher
DEFAULT_OURS = ("dsformer", "dsformer-fisher")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    fac.add_argument(
        "--k-multiple", type=int, default=None, help="ds: search only k that are multiples of this (faster GEMMs)"
    )
    fac.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    fac.add_argument("--no-save", action="store_true", help="only report, write no model folder")
    fac.add_argument("--quiet", action="store_true", help="no progress bar")

    com = verbs.add_parser("compress", help="fine-tune and compress a model on a task with one method")
    com.add_argument("--model", default=None, help="local folder or hub name (default: the embedded all-MiniLM-L6-v2)")
    com.add_argument("--task", default="mr", help="mr (embedded), sst2, cola, mrpc, rte, stsb, wnli, qnli, mnli, qqp")
    com.add_argument(
        "--data-dir",
        default=None,
        help="GLUE task folder, local copy of a hub dataset (e.g. nyu-mll/glue's parquet layout) or hub dataset name"
        " (default: mr's embedded data; GLUE from nyu-mll/glue on the hub)",
    )
    com.add_argument(
        "--method", default="dsformer", help="dense, svd, fwsvd, nm, ds-conventional, dsformer, ds-shared, distil"
    )
    com.add_argument("--ratio", type=_number, default=2.0, help="compression ratio of the target layers (default: 2)")
    com.add_argument("--trainer", choices=["stf", "conventional"], default=None, help="default: the method's own")
    com.add_argument(
        "--fisher",
        action="store_true",
        help="weight the fit (and every STF projection) by the rows' Fisher information from task gradients"
        " (svd, ds-conventional, dsformer; svd --fisher is fwsvd); recommended with dsformer, above all on"
        " regression and small tasks",
    )
    com.add_argument("--epochs", type=_number, default=3.0)
    com.add_argument("--lr", type=_number, default=1e-4)
    com.add_argument("--batch-size", type=int, default=32)
    com.add_argument("--max-length", type=int, default=128)
    com.add_argument("--max-train", type=int, default=None, help="train on a seeded subsample of this many examples")
    com.add_argument("--seed", type=int, default=0)
    com.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    com.add_argument("--refresh-every", type=int, default=10, help="STF: re-project every this many steps")
    com.add_argument("--ramp-steps", type=int, default=0, help="STF: steps over which lambda ramps to 1")
    com.add_argument("--pull", type=_number, default=0.0, help="STF: per-step pull of latents to their projection")
    com.add_argument(
        "--hold-projection",
        action="store_true",
        help="STF: compute with the last projection unchanged between refreshes (default: follow the latent)",
    )
    com.add_argument(
        "--polish",
        type=_number,
        default=0.0,
        help="STF: fraction of the steps, at the end, that train the compact factors with the support frozen",
    )
    com.add_argument("--teacher", default=None, help="a saved fine-tuned model: adds a knowledge-distillation loss")
    com.add_argument("--reference", default=None, help="metrics.json of a dense run, for the difference to dense")
    com.add_argument(
        "--output",
        default=None,
        help="folder to write (default: outputs/<task>-<method>-<ratio>x[-<trainer>][-fisher][-s<seed>])",
    )
    com.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")
    com.add_argument("--device", default="cpu")
    com.add_argument("--quiet", action="store_true")

    swp = verbs.add_parser("sweep", help="run a grid of compression runs from a YAML config (resumable)")
    swp.add_argument("--config", required=True, help="experiments/<name>.yaml")
    swp.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    swp.add_argument("--quiet", action="store_true", help="no progress bars")
    swp.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the config (and their dense starts)")
    swp.add_argument("--labels", nargs="+", default=None, help="only these method labels of the config")
    swp.add_argument("--ratios", nargs="+", type=_number, default=None, help="only these ratios of the config")

    rep = verbs.add_parser("report", help="tables and plots from sweep results")
    rep.add_argument("results", nargs="+", help="results folders of sweeps (one JSON per run)")
    rep.add_argument("--output", default="docs/results.md", help="markdown file to write (default: docs/results.md)")
    rep.add_argument("--plots", default=None, help="folder for the PNGs (default: next to --output)")
    rep.add_argument("--notes", default=None, help="a markdown file whose text goes under the heading (how to read it)")
    rep.add_argument(
        "--ours",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="labels of DSFormer runs to set against the best baseline, each in its own tables "
        f"(default: {' '.join(DEFAULT_OURS)}, those that ran)",
    )

    summ = verbs.add_parser("summary", help="table of saved runs: metric, difference to dense, size, CPU latency")
    summ.add_argument("paths", nargs="+", help="folders written by dsformer compress")
    summ.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    summ.add_argument("--json", default=None, help="also write the rows (and the hardware) to this JSON file")

    ben = verbs.add_parser("bench", help="latency and throughput of a compact model against its dense original")
    ben.add_argument(
        "path",
        nargs="?",
        default=None,
        help="a saved compact model; or a dense model (folder or hub name) to factorize first "
        "(default: the embedded all-MiniLM-L6-v2, factorized with --structure at --ratio)",
    )
    ben.add_argument("--batch", type=_count, nargs="+", default=[32, 1], help="batch sizes (default: 32 1)")
    ben.add_argument("--seq", type=_count, nargs="+", default=[128, 64], help="sequence lengths, paired with --batch")
    ben.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ben.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="the weights' and activations' type for both models (default: float32; float16 is the GPU's usual)",
    )
    ben.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default), reference, dense, gather, triton (CUDA) or int8",
    )
    ben.add_argument("--structure", choices=["ds", "svd", "nm"], default="ds", help="when factorizing (default: ds)")
    ben.add_argument("--ratio", type=_number, default=2.8, help="when factorizing (default: 2.8)")
    ben.add_argument("--k-multiple", type=int, default=None, help="when factorizing with ds: k a multiple of this")
    ben.add_argument("--repeats", type=_count, default=10, help="timed runs of each model, alternating (default: 10)")
    ben.add_argument("--no-layers", action="store_true", help="end to end only")
    ben.add_argument("--output", default=None, help="write the results (with the hardware) to this JSON file")

    eva = verbs.add_parser("evaluate", help="evaluate a saved model on its task's test split")
    eva.add_argument("path")
    eva.add_argument("--task", default=None, help="default: the task it was trained on (metrics.json)")
    eva.add_argument(
        "--data-dir",
        default=None,
        help="GLUE task folder, local copy of a hub dataset or hub dataset name (default: the one it was trained on)",
    )
    eva.add_argument(
        "--int8",
        action="store_true",
        help="round the weights (compact factors, or a dense model's block linears) to int8 per row first",
    )
    eva.add_argument("--json", default=None, help="also write the result (with the int8 bytes) to this JSON file")
    eva.add_argument(
        "--backend",
        choices=BACKENDS,
        default="reference",
        help="execution path of the compact layers: reference (default), auto, dense, gather, "
        "triton (CUDA), int8 (int8 products)",
    )

    qua = verbs.add_parser(
        "quantize", help="store a saved model's weights as int8 with per-row scales (a smaller file), and evaluate it"
    )
    qua.add_argument("path", help="a folder written by dsformer compress or factorize")
    qua.add_argument("output", help="folder to write")
    qua.add_argument("--task", default=None, help="default: the task it was trained on (metrics.json)")
    qua.add_argument("--data-dir", default=None, help="as for evaluate")

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


def _structure(
    structure: str, ratio: float, k: int | None = None, iters: int | None = None, k_multiple: int | None = None
):
    """The structure config the command line asks for; the ds-only options are refused for the others."""
    from dsformer.structures import structure_config
    from dsformer.structures.base import check_ratio

    options = {"ratio": check_ratio(ratio)}
    ds_only = {"k": k, "iters": iters, "k_multiple": k_multiple}
    given = {key: value for key, value in ds_only.items() if value is not None}
    if structure != "ds" and given:
        raise DsformerError(f"{', '.join('--' + key.replace('_', '-') for key in given)} apply to --structure ds only")
    return structure_config(structure, **options, **given)


def factorize(args: argparse.Namespace) -> None:
    from dsformer import CompressConfig, compress, save
    from dsformer.io import atomic_write_text, check_output
    from dsformer.models import load_pretrained, resolve

    structure = _structure(args.structure, args.ratio, args.k, args.iters, args.k_multiple)
    output = None if args.no_save else Path(args.output or _default_output(args.model, args.structure, args.ratio))
    if output is not None:
        check_output(output, source=resolve(args.model))
    _check_file_output(args.json, "--json")
    _check_device(args.device)
    model, tokenizer = load_pretrained(args.model)
    model = model.to(args.device).eval()
    config = CompressConfig(structure, target_modules=args.targets, exclude_modules=args.exclude)
    report = compress(model, config, progress=not args.quiet)
    print(report.table())
    if output is not None:  # the model first: it is the costly part to lose
        save(model.cpu(), output, tokenizer=tokenizer, report=report)
        size = (output / "model.safetensors").stat().st_size
        print(f"saved to {output} ({size / 2**20:.1f} MiB); load it with dsformer.load({str(output)!r})")
    if args.json:
        from dsformer.hardware import describe

        record = {"command": args.command_line, **report.to_json(), "hardware": describe()}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        print(f"report written to {args.json}")


def compress_verb(args: argparse.Namespace) -> None:
    from dsformer.pipeline import RunConfig, run
    from dsformer.stf import Schedule
    from dsformer.structures.base import check_ratio
    from dsformer.train import TrainConfig

    if args.method != "dense":
        check_ratio(args.ratio)
    _check_device(args.device)
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        precision=args.precision,
        progress=not args.quiet,
    )
    config = RunConfig(
        model=args.model,
        task=args.task,
        data_dir=args.data_dir,
        method=args.method,
        ratio=args.ratio,
        trainer=args.trainer,
        max_train=args.max_train,
        reference=args.reference,
        teacher=args.teacher,
        device=args.device,
        fisher=args.fisher,
        train=train,
        schedule=Schedule(
            refresh_every=args.refresh_every,
            ramp_steps=args.ramp_steps,
            pull=args.pull,
            follow=not args.hold_projection,
            polish=args.polish,
        ),
    )
    output = Path(args.output or os.path.join("outputs", _run_name(args)))
    rank = _init_distributed(args.device)
    try:
        metrics = run(config, output, resume=args.resume)
    except KeyboardInterrupt as interrupt:
        from dsformer.pipeline import has_checkpoint

        if has_checkpoint(output):
            interrupt.hint = f"interrupted; the checkpoint is in {output}.work: run the same command with --resume"
        else:
            interrupt.hint = "interrupted before the first checkpoint; nothing to resume: run the command again"
        raise
    if rank == 0:
        print(summary_table([metrics]))
        print(f"saved to {output} (metrics in {output / 'metrics.json'})")


def _run_name(args: argparse.Namespace) -> str:
    """The default output folder's name: whatever tells two runs apart (``sst2-dsformer-2x-fisher-s1``)."""
    parts = [args.task, args.method] + ([] if args.method == "dense" else [f"{args.ratio:g}x"])
    parts += [args.trainer] if args.trainer else []
    parts += ["fisher"] if args.fisher else []
    parts += [f"s{args.seed}"] if args.seed else []
    return "-".join(parts)


def _init_distributed(device: str) -> int:
    """Join the process group when started by torchrun or ``accelerate launch`` (WORLD_SIZE > 1); return the rank."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the cores
    return torch.distributed.get_rank()


def bench_verb(args: argparse.Namespace) -> None:
    import torch

    from dsformer.bench import bench_model, bench_record, bench_table
    from dsformer.io import META_FILE, atomic_write_text, load, read_meta

    _check_device(args.device)
    _check_file_output(args.output, "--output")
    shapes = _paired(args.batch, args.seq)
    # a saved compact model runs as it is; a saved dense run (no compact layers) is factorized like any dense model
    if args.path is not None and (Path(args.path) / META_FILE).exists() and read_meta(args.path)["layers"]:
        model, source = load(args.path, device=args.device), args.path
    else:
        from dsformer import CompressConfig, compress
        from dsformer.models import load_pretrained, resolve

        model, _ = load_pretrained(args.path)
        model = model.to(args.device).float().eval()  # a half-precision checkpoint is fitted in float32
        print(f"factorizing {resolve(args.path)} with {args.structure} at {args.ratio:g}x (fit only, no training)")
        compress(
            model, CompressConfig(_structure(args.structure, args.ratio, k_multiple=args.k_multiple)), progress=True
        )
        source = f"{resolve(args.path)} factorized with {args.structure} at {args.ratio:g}x"
    model = model.to(getattr(torch, args.dtype))  # factorized in float32 first: the fit wants the precision
    results = []
    for batch, seq in shapes:
        result = bench_model(model, batch, seq, backend=args.backend, repeats=args.repeats, layers=not args.no_layers)
        print(bench_table(result))
        results.append(result)
    if args.output:
        record = bench_record(results, args.command_line, source)
        atomic_write_text(Path(args.output), json.dumps(record, indent=2) + "\n")
        print(f"results written to {args.output}")


def _check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where there is a CUDA device."""
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise DsformerError(f"--device {device!r}: give cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DsformerError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")


def _check_file_output(path: str | None, flag: str) -> None:
    """Refuse a file to write that cannot be one, before the work that fills it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise DsformerError(f"{flag} {path} is a folder; give a file name")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DsformerError(f"{flag} {path}: {parent} is a file, so no folder can be made there")


def _read_metrics(file: Path) -> dict:
    """A run's metrics.json; a damaged one is a one-line error."""
    try:
        metrics = json.loads(file.read_text())
        metrics["task"], metrics["metric"], metrics["test"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DsformerError(f"{file} is not a run's metrics.json ({type(err).__name__}: {err})") from None
    return metrics


def _paired(batches: list[int], seqs: list[int]) -> list[tuple[int, int]]:
    """``--batch 32 1 --seq 128 64`` -> ``[(32, 128), (1, 64)]``; a single value pairs with every other."""
    if len(batches) == 1:
        batches = batches * len(seqs)
    if len(seqs) == 1:
        seqs = seqs * len(batches)
    if len(batches) != len(seqs):
        raise DsformerError(f"--batch and --seq pair up: give as many of each, or one (got {batches} and {seqs})")
    if min(batches + seqs) < 1:
        raise DsformerError(f"--batch and --seq must be at least 1 (got {batches} and {seqs})")
    return list(zip(batches, seqs, strict=True))


def summary_verb(args: argparse.Namespace) -> None:
    from dsformer.bench import latency_ms
    from dsformer.io import load
    from dsformer.kernels import use_backend

    _check_file_output(args.json, "--json")
    runs = []
    for path in args.paths:
        metrics_file = Path(path) / "metrics.json"
        if not metrics_file.exists():
            raise DsformerError(f"{path} has no metrics.json; give folders written by dsformer compress")
        metrics = _read_metrics(metrics_file)
        if not args.no_latency:
            model = load(path)
            use_backend(model, "auto")
            seq = min(64, getattr(model.config, "max_position_embeddings", 64))  # a tiny model may allow fewer
            metrics["latency_ms"], metrics["latency_tokens"] = latency_ms(model, batch=1, seq=seq), seq
        runs.append(metrics)
    print(summary_table(runs))
    if not args.no_latency:
        tokens = "/".join(str(t) for t in sorted({m["latency_tokens"] for m in runs}))
        print(f"latency: median forward at batch 1 x {tokens} tokens on this machine's CPU, fastest kernels (auto)")
    if args.json:
        from dsformer.hardware import describe
        from dsformer.io import atomic_write_text

        keys = ("method", "trainer", "task", "metric", "test", "difference_to_dense", "ratios", "model_bytes")
        keys += ("latency_ms", "latency_tokens")
        rows = [{"path": str(path), **{k: m.get(k) for k in keys}} for path, m in zip(args.paths, runs, strict=True)]
        summary = {"command": args.command_line, "runs": rows, "hardware": describe()}
        atomic_write_text(Path(args.json), json.dumps(summary, indent=2) + "\n")


def summary_table(runs: list[dict]) -> str:
    """Method, ratio, test metric, difference to dense, model size, latency, wall time."""
    from dsformer.report import format_table

    head = ("method", "ratio", "metric", "test", "vs dense", "model MiB", "latency ms", "minutes")
    rows = []
    for m in runs:
        key = m["metric"]
        diff = m.get("difference_to_dense")
        rows.append(
            (
                f"{m['method']} ({m['trainer']})" if m["method"] != "dense" else "dense",
                f"{m['ratios']['ratio_params']:.2f}x" if m.get("ratios") else "1.00x",
                key,
                f"{100 * m['test'][key]:.2f}",
                "" if diff is None else f"{100 * diff:+.2f}",
                f"{m['model_bytes'] / 2**20:.1f}",
                f"{m['latency_ms']:.1f}" if "latency_ms" in m else "",
                f"{m['wall_seconds'] / 60:.1f}",
            )
        )
    return format_table(head, rows, left=3)


def sweep_verb(args: argparse.Namespace) -> None:
    from dsformer.sweep import load_sweep, run_sweep

    try:
        only = {"tasks": args.tasks, "labels": args.labels, "ratios": args.ratios}
        run_sweep(load_sweep(args.config), quiet=args.quiet, dry_run=args.dry_run, **only)
    except KeyboardInterrupt as interrupt:
        again = " ".join(
            [f"dsformer sweep --config {args.config}"]
            + [
                f"--{key} {' '.join(f'{v:g}' if isinstance(v, float) else v for v in value)}"
                for key, value in only.items()
                if value
            ]
        )
        interrupt.hint = f"interrupted; run `{again}` again to go on where it stopped"
        raise


def report_verb(args: argparse.Namespace) -> None:
    from dsformer.io import atomic_write_text
    from dsformer.results import collect, compression_markdown, markdown, plot, versus_markdown

    notes = ""
    if args.notes:  # read before anything is written
        try:
            notes = Path(args.notes).read_text().strip() + "\n\n"
        except OSError as err:
            raise DsformerError(f"--notes {args.notes}: {err.strerror}") from None
    _check_file_output(args.output, "--output")
    cells = collect([Path(p) for p in dict.fromkeys(args.results)])  # a folder given twice counts once
    output = Path(args.output)
    plots = plot(cells, Path(args.plots) if args.plots else output.parent)
    images = "\n".join(f"![{p.stem}]({os.path.relpath(p, output.parent)})" for p in plots)
    sources = ", ".join(f"`{p}`" for p in args.results)
    ours = _our_labels(cells, args.ours)
    against = {label: (versus_markdown(cells, label), compression_markdown(cells, label)) for label in ours}
    for label, found in against.items():
        if not any(found):
            print(f"note: --ours {label}: no task has its runs beside the dense start and a baseline", file=sys.stderr)
    tables = "\n".join([v for v, _ in against.values()] + [c for _, c in against.values()] + [markdown(cells)])
    text = (
        "# Results\n\nGenerated by `dsformer report` from " + sources + ": mean ± standard deviation over seeds "
        "of the test metric (x100), difference to the dense start in brackets. Each run's JSON holds its "
        "command, configuration and hardware.\n\n" + notes + tables + "\n" + images + "\n"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text)
    print(tables)
    print(f"written: {output}, " + ", ".join(str(p) for p in plots))


def _our_labels(cells: list, asked: list[str] | None) -> list[str]:
    """The labels ``--ours`` names, checked against the runs; without it, the default ones that ran."""
    from dsformer.results import OUR_METHODS

    labels = {c.label for c in cells}
    if asked is None:
        return [label for label in DEFAULT_OURS if label in labels]
    for label in asked:
        methods = sorted({c.method for c in cells if c.label == label})
        if not methods:
            known = sorted({c.label for c in cells if c.method in OUR_METHODS}) or ["(none)"]
            raise DsformerError(f"--ours {label}: no run has that label; DSFormer labels here: {', '.join(known)}")
        others = [m for m in methods if m not in OUR_METHODS]
        if others:
            what = "the dense reference" if others == ["dense"] else f"method {others[0]!r}, a baseline"
            raise DsformerError(f"--ours {label}: its runs are {what}; ours are methods {', '.join(OUR_METHODS)}")
    return list(dict.fromkeys(asked))


def _task_of(folder: Path, task: str | None, data_dir: str | None) -> tuple[str | None, str | None, dict | None]:
    """The task and data of a saved run: as given, else from its metrics.json; and that file's content."""
    metrics_file = folder / "metrics.json"
    saved = _read_metrics(metrics_file) if metrics_file.exists() else None
    if task is None and saved is not None:
        task, data_dir = saved["task"], data_dir or saved["config"].get("data_dir")
    return task, data_dir, saved


def _test_metrics(model, tokenizer, task: str, data_dir: str | None):
    from dsformer.tasks import load_task
    from dsformer.train import evaluate

    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise DsformerError(
            f"this {type(model).__name__} has no task head (a `dsformer factorize` output?): it cannot be evaluated "
            "on a task; train one with `dsformer compress`"
        )
    data = load_task(task, data_dir)
    return data, evaluate(model, tokenizer, data.test, data.spec)


def evaluate_verb(args: argparse.Namespace) -> None:
    from dsformer.io import load
    from dsformer.kernels import use_backend
    from dsformer.models import load_tokenizer

    folder = Path(args.path)
    _check_file_output(args.json, "--json")
    model = load(folder)
    tokenizer = load_tokenizer(str(folder))
    if tokenizer is None:
        raise DsformerError(f"{folder} holds no tokenizer; it cannot be evaluated on text")
    task, data_dir, _ = _task_of(folder, args.task, args.data_dir)
    if task is None:
        raise DsformerError(f"{folder} has no metrics.json naming its task; pass --task")
    quant = None
    if args.int8:
        from dsformer.quantize import quantize_int8

        quant = quantize_int8(model)
    if not use_backend(model, args.backend) and args.backend == "int8":  # a dense model: its block linears
        from dsformer.compress import find_targets
        from dsformer.kernels.int8 import int8_linears

        int8_linears(model, find_targets(model))
    data, result = _test_metrics(model, tokenizer, task, data_dir)
    line = f"{folder}: {data.spec.name} test ({len(data.test)} examples)"
    if args.backend != "reference":
        line += f", {args.backend} path"
    if quant is not None:
        line += f", int8 weights ({quant.model_bytes_after / 2**20:.1f} MiB)"
    print(line + ": " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if args.json:
        from dsformer.hardware import describe
        from dsformer.io import atomic_write_text

        record = {"command": args.command_line, "path": str(folder), "task": data.spec.name, "test": result}
        record.update({"backend": args.backend, "int8": quant.to_json() if quant else None, "hardware": describe()})
        atomic_write_text(Path(args.json), json.dumps(record, indent=2) + "\n")


def quantize_verb(args: argparse.Namespace) -> None:
    from dsformer.io import check_output, load, read_meta, save
    from dsformer.models import load_tokenizer
    from dsformer.quantize import quantize_int8
    from dsformer.report import Report

    folder, output = Path(args.path), Path(args.output)
    check_output(output, source=folder)
    meta = read_meta(folder)
    if meta.get("int8"):
        raise DsformerError(f"{folder} is already stored as int8")
    model = load(folder)
    tokenizer = load_tokenizer(str(folder))
    quant = quantize_int8(model)
    task, data_dir, saved = _task_of(folder, args.task, args.data_dir)
    metrics = None
    if task is not None and tokenizer is not None:
        data, result = _test_metrics(model, tokenizer, task, data_dir)
        metrics = {
            **(saved or {"task": data.spec.name, "metric": data.spec.metrics[0], "config": {"data_dir": data_dir}}),
            "command": args.command_line,
            "test": result,
            "test_before_int8": (saved or {}).get("test"),
            "model_bytes": quant.model_bytes_after,
            "int8": {**quant.to_json(), "quantized_from": str(folder.resolve())},
        }
        if saved is not None and saved.get("dense_test") is not None:
            metrics["difference_to_dense"] = result[saved["metric"]] - saved["dense_test"]
    report = Report.from_json(meta["report"]) if meta.get("report") else None
    save(
        model,
        output,
        tokenizer=tokenizer,
        report=report,
        extra_files={"metrics.json": metrics} if metrics else None,
        int8=True,
    )
    before_mib, after_mib = ((f / meta["weights"]["file"]).stat().st_size / 2**20 for f in (folder, output))
    line = f"int8 model written to {output}: weight file {before_mib:.1f} -> {after_mib:.1f} MiB"
    if metrics is not None:
        key = metrics["metric"]
        before = (metrics["test_before_int8"] or {}).get(key)
        line += f"; test {key} {result[key]:.4f}" + (f" (before: {before:.4f})" if before is not None else "")
    print(line)


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


def _raise_terminated(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, `kill`) outside training stops like Ctrl-C; training defers both to a step's end."""
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["dsformer", *(sys.argv[1:] if argv is None else argv)])  # stored with results
    _quiet_libraries()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        {
            "factorize": factorize,
            "compress": compress_verb,
            "evaluate": evaluate_verb,
            "summary": summary_verb,
            "bench": bench_verb,
            "sweep": sweep_verb,
            "quantize": quantize_verb,
            "report": report_verb,
            "merge": merge,
            "info": info,
            "data": data,
        }[args.verb](args)
    except DsformerError as err:
        print(f"dsformer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"dsformer: {getattr(interrupt, 'hint', 'interrupted; nothing was written')}", file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
