"""What the command line does with models and saved runs: compress a pretrained model, evaluate a saved run,
store one as int8, summarize several, time one against its dense original, and record a result with its
command and hardware.

Each function is what one verb does (``compress``, ``evaluate``, ``quantize``, ``summary``, ``bench``); the
verb only prints its result.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsformer.calibration import compress_calibrated
from dsformer.checkpoint import META_FILE, check_model_output, load, load_tokenizer, read_meta, save
from dsformer.errors import DsformerError
from dsformer.files import atomic_write_text, exclusive
from dsformer.hardware import check_device, describe
from dsformer.harness.bench import bench_model, bench_table, latency_ms
from dsformer.harness.evaluation import evaluate
from dsformer.harness.finetune import METRICS_FILE
from dsformer.harness.lm import calibration_batches, context_length, eval_windows, is_lm_task, perplexity, read_text
from dsformer.harness.lm_bench import PROMPT, bench_lm, bench_lm_table, is_causal_lm_model
from dsformer.harness.models import load_pretrained, resolve
from dsformer.harness.results import measured_ratios
from dsformer.harness.squad import STRIDE
from dsformer.harness.tasks import TaskData, load_task
from dsformer.kernels import check_backend, native, use_backend
from dsformer.kernels.int8 import int8_linears
from dsformer.quantize import quantize_int8
from dsformer.report import Report, format_table
from dsformer.structures import structure_config
from dsformer.structures.budget import check_ratio
from dsformer.surgery import CompressConfig, compress, find_targets


def write_record(path: str | Path, command: str, result: dict[str, Any]) -> None:
    """A result as JSON, with the command that made it and the machine it ran on."""
    hardware = {**describe(), "native_kernel": native.variant() or "off"}  # the compiled gather kernel's variant
    atomic_write_text(path, json.dumps({"command": command, **result, "hardware": hardware}, indent=2) + "\n")


def compress_pretrained(
    model: str | None, structure: str, ratio: float, options: dict[str, Any], targets: Any = None,
    exclude: Any = None, device: str = "cpu", output: str | None = None, save_model: bool = True,
    progress: bool = True, calibration: Calibration | None = None,
) -> tuple[Report, Path | None]:  # fmt: skip
    """``dsformer compress``: fit ``structure`` at ``ratio`` to a pretrained model's target linears and save
    the compact model (to ``output``, default ``outputs/<model>-<structure>-<ratio>x``); every input is
    checked before the model loads. With ``calibration`` each layer is fitted to its inputs on that
    text, block by block (:func:`dsformer.calibration.compress_calibrated`)."""
    if "ratio" in options:
        raise DsformerError("give the ratio with --ratio, not as an option")
    if calibration and options.get("share_basis"):
        raise DsformerError("share_basis: one basis cannot be whitened per layer; drop --calibration or share_basis")
    config = CompressConfig(structure_config(structure, ratio=check_ratio(ratio), **options), targets, exclude)
    folder = None
    if save_model:
        name = Path(model.rstrip("/")).name if model else "minilm"
        aware = "-calibrated" if calibration else ""
        default = Path("outputs") / f"{name}-{structure}{aware}-{ratio:g}x"
        folder = check_model_output(output or default, source=resolve(model))
        if (folder / METRICS_FILE).exists():  # a fit alone would replace the run's training without a word
            raise DsformerError(f"{folder} holds a fine-tuned run (metrics.json); choose another --output")
    check_device(device)
    with exclusive(folder) if folder is not None else contextlib.nullcontext():
        text = calibration.text() if calibration else None  # a missing file fails before the model loads
        loaded, tokenizer = load_pretrained(model)
        loaded = loaded.to(device).eval()
        if calibration:
            batches = calibration.batches(loaded, tokenizer, text)
            budget = calibration.wants_global_budget(loaded, config)
            report = compress_calibrated(loaded, config, batches, progress, budget)
        else:
            report = compress(loaded, config, progress=progress)
        if folder is not None:
            save(loaded.cpu(), folder, tokenizer=tokenizer, report=report)
    return report, folder


@dataclass(frozen=True)
class Calibration:
    """Calibration text for data-aware fits: an LM task's calibration split (``wikitext2``) or a text file;
    ``samples`` windows of ``length`` tokens (default: the model's context, at most 512); ``global_budget``:
    one ratio for all targets, each layer's chosen (:mod:`dsformer.allocation`); None: on for causal LMs
    where the structure takes per-layer ratios (their next-token loss weighs each layer's error)."""

    source: str
    data_dir: str | None = None
    samples: int = 128
    length: int | None = None
    global_budget: bool | None = None
    seed: int = 0

    @classmethod
    def from_flags(
        cls, source: str | None, data_dir: str | None, samples: int, length: int | None, global_budget: bool | None
    ) -> Calibration | None:
        """The calibration the command line asks for (None without ``--calibration``)."""
        if source:
            return cls(source, data_dir, samples, length, global_budget)
        if data_dir or length or global_budget is not None:
            raise DsformerError("--data-dir, --length and --global-budget go with --calibration; give --calibration")
        return None

    def __post_init__(self) -> None:
        if self.samples < 1 or (self.length is not None and self.length < 2):
            raise DsformerError("calibration needs at least one sample of at least 2 tokens")

    def text(self) -> str:
        return read_text(self.source, "calibration", self.data_dir)

    def wants_global_budget(self, model: nn.Module, config: CompressConfig) -> bool:
        """The global budget as asked, or by default where it won every comparison measured: a causal LM
        (whose next-token loss gives the gradients that weigh each layer's error) with a structure that
        takes per-layer ratios, no size fixed by an option and no per-layer overrides."""
        if self.global_budget is not None:
            return self.global_budget
        generates = getattr(model, "can_generate", lambda: False)()  # what calibration scores next tokens of
        return generates and config.structure.sized_by_ratio and not config.overrides

    def batches(self, model: nn.Module, tokenizer: Any, text: str) -> list[dict]:
        if tokenizer is None:
            raise DsformerError("the model has no tokenizer to read calibration text with")
        length = context_length(model, self.length) if self.length else min(512, context_length(model, None))
        return calibration_batches(tokenizer, text, self.samples, length, self.seed)


def evaluate_lm(
    model: str, task: str, data_dir: str | None = None, window: int | None = None, limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Perplexity of a causal LM (a saved dsformer model, a model folder, a hub name, ``smollm2``) on an LM
    task's test text (or a text file), with its protocol."""
    text = read_text(task, "test", data_dir)
    folder = Path(model)
    if (folder / META_FILE).exists():
        loaded, tokenizer = load(folder), load_tokenizer(folder)
    else:
        loaded, tokenizer = load_pretrained(model)
    if tokenizer is None:
        raise DsformerError(f"{model} holds no tokenizer; it cannot be evaluated on text")
    window = context_length(loaded, window)
    windows = eval_windows(tokenizer, text, window, limit)
    result = perplexity(loaded, windows, progress=progress)
    protocol = f"{result['windows']} non-overlapping windows of {window} tokens"
    line = f"{model}: {task} test perplexity {result['perplexity']:.3f} ({protocol}, {result['tokens']} tokens scored)"
    return {"path": model, "task": task, "test": result, "protocol": protocol, "line": line}


def read_metrics(file: Path) -> dict[str, Any]:
    """A run's metrics.json; a damaged one is a one-line error."""
    try:
        metrics = json.loads(file.read_text())
        metrics["task"], metrics["metric"], metrics["test"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DsformerError(f"{file} is not a run's metrics.json ({type(err).__name__}: {err})") from None
    return metrics


def _task_of(folder: Path, task: str | None, data_dir: str | None) -> tuple[str | None, str | None, dict | None]:
    """The task and data of a saved run: as given, else from its metrics.json; and that file's content."""
    metrics_file = folder / METRICS_FILE
    saved = read_metrics(metrics_file) if metrics_file.exists() else None
    if task is None and saved is not None:
        task, data_dir = saved["task"], data_dir or saved["config"].get("data_dir")
    return task, data_dir, saved


def _test_metrics(
    model: nn.Module, tokenizer: Any, task: str, data_dir: str | None, saved: dict | None = None
) -> tuple[TaskData, dict]:
    """The test metrics; a run's own task is read as it trained (its windows and stride, for question answering)."""
    name = type(model).__name__
    if not name.endswith(("ForSequenceClassification", "ForQuestionAnswering")):
        raise DsformerError(
            f"this {name} has no task head (a `dsformer compress` output?): it cannot be evaluated "
            "on a task; train one with `dsformer finetune`"
        )
    data = load_task(task, data_dir)
    if data.spec.is_qa != name.endswith("ForQuestionAnswering"):
        raise DsformerError(f"this {name} has no head for {data.spec.name}; give a model fine-tuned on it")
    train = saved["config"].get("train", {}) if saved is not None and saved["task"] == data.spec.name else {}
    stride = train.get("doc_stride", STRIDE)
    return data, evaluate(model, tokenizer, data.test, data.spec, train.get("max_length"), stride=stride)


def evaluate_run(
    folder: str | Path, task: str | None = None, data_dir: str | None = None, int8: bool = False,
    backend: str = "reference", window: int | None = None, max_windows: int | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``dsformer evaluate``: perplexity for a language-modelling task or a text file (:func:`evaluate_lm`), else
    the task's test metrics (:func:`evaluate_task`)."""
    check_backend(backend)
    if is_lm_task(task):
        if int8 or backend != "reference":
            raise DsformerError("perplexity runs on the reference backend without --int8 for now")
        return evaluate_lm(str(folder), task, data_dir, window, max_windows, progress)
    if window or max_windows:
        raise DsformerError("--window and --max-windows apply to perplexity (--task wikitext2 or a text file)")
    return evaluate_task(Path(folder), task, data_dir, int8, backend)


def evaluate_task(
    folder: Path, task: str | None = None, data_dir: str | None = None, int8: bool = False, backend: str = "reference"
) -> dict[str, Any]:
    """Test metrics of a saved model on its task (or ``task``), optionally with int8 weights or on ``backend``."""
    model = load(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise DsformerError(f"{folder} holds no tokenizer; it cannot be evaluated on text")
    task, data_dir, saved = _task_of(folder, task, data_dir)
    if task is None:
        raise DsformerError(f"{folder} has no metrics.json naming its task; pass --task")
    quant = quantize_int8(model) if int8 else None
    if not use_backend(model, backend) and backend == "int8":  # a dense model: its block linears
        int8_linears(model, find_targets(model))
    data, result = _test_metrics(model, tokenizer, task, data_dir, saved)
    line = f"{folder}: {data.spec.name} test ({len(data.test)} examples)"
    line += f", {backend} backend" if backend != "reference" else ""
    line += f", int8 weights ({quant.model_bytes_after / 2**20:.1f} MiB)" if quant else ""
    return {
        "path": str(folder),
        "task": data.spec.name,
        "test": result,
        "backend": backend,
        "int8": quant.to_json() if quant else None,
        "line": line + ": " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()),
    }


def quantize_run(
    folder: Path, output: Path, task: str | None = None, data_dir: str | None = None, command: str = ""
) -> dict[str, Any]:
    """Store a saved model's weights as int8 with per-row scales in ``output``, evaluated on its task where
    it has one; returns the sizes (``int8``), the new ``metrics`` (None without a task) and a ``line`` saying so."""
    check_model_output(output, source=folder)
    meta = read_meta(folder)
    if meta.get("int8"):
        raise DsformerError(f"{folder} is already stored as int8")
    model = load(folder)
    tokenizer = load_tokenizer(folder)
    quant = quantize_int8(model)
    task, data_dir, saved = _task_of(folder, task, data_dir)
    metrics = None
    if task is not None and tokenizer is not None:
        data, result = _test_metrics(model, tokenizer, task, data_dir, saved)
        metrics = {
            **(saved or {"task": data.spec.name, "metric": data.spec.metrics[0], "config": {"data_dir": data_dir}}),
            "command": command,
            "test": result,
            "test_before_int8": (saved or {}).get("test"),
            "model_bytes": quant.model_bytes_after,
            "int8": {**quant.to_json(), "quantized_from": str(folder.resolve())},
        }
        if saved is not None and saved.get("dense_test") is not None:
            metrics["difference_to_dense"] = result[saved["metric"]] - saved["dense_test"]
    report = Report.from_json(meta["report"]) if meta.get("report") else None
    extra = {METRICS_FILE: metrics} if metrics else None
    save(model, output, tokenizer=tokenizer, report=report, extra_files=extra, int8=True)
    mib = f"{quant.bytes_before / 2**20:.1f} -> {quant.bytes_after / 2**20:.1f} MiB"
    line = f"int8 model written to {output}: weights {mib}"
    if metrics is not None:
        key, before = metrics["metric"], (metrics["test_before_int8"] or {}).get(metrics["metric"])
        line += f"; test {key} {metrics['test'][key]:.4f}" + (f" (before: {before:.4f})" if before is not None else "")
    return {"int8": quant.to_json(), "metrics": metrics, "line": line}


def summarize(folders: list[Path], latency: bool = True) -> list[dict[str, Any]]:
    """Each saved run's metrics.json, with its CPU latency at batch 1 on the fastest backends (``auto``)."""
    runs = []
    for folder in folders:
        metrics_file = folder / METRICS_FILE
        if not metrics_file.exists():
            raise DsformerError(f"{folder} has no metrics.json; give folders written by dsformer finetune")
        metrics = read_metrics(metrics_file)
        if latency:
            model = load(folder)
            use_backend(model, "auto")
            seq = min(64, getattr(model.config, "max_position_embeddings", 64))  # a tiny model may allow fewer
            metrics["latency_ms"], metrics["latency_tokens"] = latency_ms(model, batch=1, seq=seq), seq
        runs.append(metrics)
    return runs


def summary_table(runs: list[dict]) -> str:
    """Method, ratio, test metric, difference to dense, model size, latency, wall time."""
    head = ("method", "ratio", "metric", "test", "vs dense", "model MiB", "latency ms", "minutes")
    rows = []
    for m in runs:
        key = m["metric"]
        diff = m.get("difference_to_dense")
        rows.append(
            (
                f"{m['method']} ({m['trainer']})" if m["method"] != "dense" else "dense",
                f"{measured_ratios(m)['ratio_params']:.2f}x",
                key,
                f"{100 * m['test'][key]:.2f}",
                "" if diff is None else f"{100 * diff:+.2f}",
                f"{m['model_bytes'] / 2**20:.1f}",
                f"{m['latency_ms']:.1f}" if "latency_ms" in m else "",
                f"{m['wall_seconds'] / 60:.1f}",
            )
        )
    return format_table(head, rows, left=3)


def finished_run(metrics: dict[str, Any], output: Path) -> str:
    """What ``dsformer finetune`` prints at the end: the run's summary row, every test metric and what was skipped."""
    if metrics["metric"] == "perplexity":
        ratios = measured_ratios(metrics)
        return (
            f"{metrics['method']} ({metrics['trainer']}) trained on {metrics['tokens']} tokens: test perplexity "
            f"{metrics['test']['perplexity']:.3f} ({metrics['protocol']}), {ratios['ratio_params']:.2f}x params, "
            f"{ratios['ratio_bytes']:.2f}x bytes\nsaved to {output}"
        )
    scores = ", ".join(f"{name} {100 * value:.2f}" for name, value in metrics["test"].items())
    skipped = f"\nskipped (counted, never trained or scored on): {metrics['skipped']}" if metrics.get("skipped") else ""
    return (
        summary_table([metrics]) + f"\ntest: {scores}{skipped}\nsaved to {output} (metrics in {output / METRICS_FILE})"
    )


def paired(batches: list[int], seqs: list[int]) -> list[tuple[int, int]]:
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


def bench_subject(
    path: str | None, structure: str = "ds", ratio: float = 2.8, device: str = "cpu", dtype: str = "float32",
    options: dict[str, Any] | None = None, batches: list[int] | None = None, seqs: list[int] | None = None,
    backend: str = "auto", new_tokens: int = 0,
) -> tuple[nn.Module, str, list[tuple[int, int]]]:  # fmt: skip
    """What ``dsformer bench`` times: a saved compact model as it is, or a dense model (a folder or hub name,
    a saved dense run, the embedded default) factorized with ``structure`` at ``ratio`` (fit only; the
    structure's ``options`` too); a description of it; and the ``(batch, seq)`` shapes to time (``batches``
    and ``seqs`` paired, by default 32 x 128 and 1 x 64, or a causal LM's prefill of 1 x 512). The device,
    the backend and the shapes are checked first, the sequences (and a causal LM's prefill plus
    ``new_tokens``) against the model's positions, before any fit."""
    check_device(device)
    check_backend(backend)
    options = options or {}
    if "ratio" in options:
        raise DsformerError("give the ratio with --ratio, not as an option")
    config = structure_config(structure, ratio=check_ratio(ratio), **options)  # checked even where unused
    paired(batches or [1], seqs or [1])  # the counts and values, before loading anything
    if path is not None and (Path(path) / META_FILE).exists() and read_meta(path)["layers"]:
        model, source = load(path, device=device), path
    else:
        model, source = load_pretrained(path)[0], None
    lm = is_causal_lm_model(model)
    shapes = paired(batches or ([1] if lm else [32, 1]), seqs or ([512] if lm else [128, 64]))
    if lm and any(b != 1 for b, _ in shapes):
        raise DsformerError("a causal LM is timed at batch 1: give --seq for its prefill, not --batch")
    if lm and new_tokens < 2:
        raise DsformerError(f"--new-tokens {new_tokens}: time at least 2 tokens (the first comes from the prompt)")
    positions = getattr(model.config, "max_position_embeddings", None)
    seq = max((s for _, s in shapes), default=0)
    if positions is not None and seq > positions:
        raise DsformerError(f"--seq {seq}: the model reads at most {positions} tokens")
    if positions is not None and lm and PROMPT + new_tokens - 1 > positions:
        raise DsformerError(
            f"--new-tokens {new_tokens} after the {PROMPT}-token prompt: the model reads at most {positions} tokens"
        )
    if source is None:
        model = model.to(device).float().eval()  # a half-precision checkpoint is fitted in float32
        print(f"factorizing {resolve(path)} with {structure} at {ratio:g}x (fit only, no training)")
        compress(model, CompressConfig(config), progress=True)
        source = f"{resolve(path)} factorized with {structure} at {ratio:g}x"
    return model.to(getattr(torch, dtype)), source, shapes  # factorized in float32 first: the fit wants the precision


def bench_run(
    path: str | None, structure: str = "ds", ratio: float = 2.8, device: str = "cpu", dtype: str = "float32",
    options: dict[str, Any] | None = None, batches: list[int] | None = None, seqs: list[int] | None = None,
    backend: str = "auto", new_tokens: int = 32, repeats: int = 10, layers: bool = True,
) -> tuple[dict[str, Any], str]:  # fmt: skip
    """``dsformer bench``: the model of :func:`bench_subject` timed at each shape (a causal LM: prefill and
    decode, :func:`bench_lm`; else :func:`bench_model`); the record to store and the tables to print."""
    model, source, shapes = bench_subject(
        path, structure, ratio, device, dtype, options, batches, seqs, backend, new_tokens
    )
    if is_causal_lm_model(model):
        runs = [bench_lm(model, s, new_tokens, backend=backend, repeats=repeats, layers=layers) for _, s in shapes]
        return {"model": source, "runs": runs}, "\n".join(bench_lm_table(run) for run in runs)
    runs = [bench_model(model, b, s, backend, repeats, layers=layers) for b, s in shapes]
    return {"model": source, "runs": runs}, "\n".join(bench_table(run) for run in runs)
