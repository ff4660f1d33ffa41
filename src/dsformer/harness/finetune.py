"""One fine-tuning run end to end (``dsformer finetune``): load, apply a method, train, finalize, save with
``metrics.json``. Resumable, and refused where it would overwrite or mix up another run's work.

Example:
    >>> from dsformer.harness.finetune import RunConfig, check_run
    >>> check_run(RunConfig(method="dsformer", ratio=2.8))
    'stf'
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from dsformer.checkpoint import check_model_output, load, read_meta, save
from dsformer.errors import DsformerError
from dsformer.files import atomic_write_text, exclusive
from dsformer.hardware import check_run_device, describe
from dsformer.harness.checkpoints import distributed, latest_checkpoint
from dsformer.harness.healing import check_lm_run, finetune_lm, fitted_start
from dsformer.harness.lm import is_lm_task, task_label
from dsformer.harness.methods import METHODS, check_method, method
from dsformer.harness.models import load_pretrained
from dsformer.harness.prepare import make_student, prepare, structure_for
from dsformer.harness.squad import check_stride
from dsformer.harness.tasks import load_task, task_spec
from dsformer.harness.training import TrainConfig, train
from dsformer.report import model_bytes
from dsformer.stf import Schedule
from dsformer.surgery import find_targets
from dsformer.version import __version__

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"  # in the work folder: what the checkpoint is a run of, checked on --resume


@dataclass
class RunConfig:
    model: str | None = None
    task: str = "mr"
    data_dir: str | None = None
    method: str = "dsformer"
    ratio: float = 2.0
    trainer: str | None = None
    max_train: int | None = None
    reference: str | None = None  # metrics.json of a dense run, for the difference to dense
    teacher: str | None = None
    device: str = "cpu"
    fisher: bool = False  # weight the structure's fit by Fisher information (dsformer.harness.prepare)
    # fit each layer's output on the task's training inputs (dsformer.harness.prepare); None: the method's default
    calibrate: bool | None = None
    global_budget: bool = False  # the ratio of all targets together, each layer's chosen (dsformer.allocation)
    tokens: int = 65536  # LM tasks: the healing budget in training tokens (dsformer.harness.healing)
    samples: int = 128  # LM tasks: calibration windows of the fit
    max_windows: int | None = None  # LM tasks: perplexity on the first this many test windows (None: all)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: Schedule = field(default_factory=Schedule)

    @property
    def fits_outputs(self) -> bool:
        """Whether the fits minimize each layer's output error: ``calibrate``, else the method's default."""
        return self.calibrate if self.calibrate is not None else calibrated_by_default(self.method)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> RunConfig:
        """A config from one flat mapping of its own, ``TrainConfig``'s and ``Schedule``'s fields (others ignored).

        A ``batch_size`` or ``max_length`` of None takes the task's default: 32 examples of 128 tokens (question
        answering: windows of 384), or for language modelling 4 windows of 512 tokens."""
        lm = is_lm_task(settings.get("task", cls.task))
        defaults = {
            "batch_size": 4 if lm else 32,
            "max_length": 512 if lm else task_spec(settings.get("task", cls.task)).max_length,
        }
        defaults |= {"checkpoint_every": 10} if lm else {}  # an LM step takes seconds, not milliseconds
        settings = {**settings, **{k: v for k, v in defaults.items() if settings.get(k) is None}}

        def part(kind: type) -> dict[str, Any]:
            return {f.name: settings[f.name] for f in fields(kind) if f.name in settings}

        return cls(**{**part(cls), "train": TrainConfig(**part(TrainConfig)), "schedule": Schedule(**part(Schedule))})


def check_run(config: RunConfig) -> str:
    """The checks that need no model or data (method, ratio, trainer, Fisher, STF schedule, data size);
    returns the trainer the run records. A sweep runs them on every planned run before the first starts."""
    trainer = check_method(config.method, config.ratio, config.trainer, config.fisher)
    if config.calibrate and method(config.method).structure is None:
        raise DsformerError(f"--calibrate fits a structure to its inputs; {config.method} fits none")
    structure = structure_for(config.method, config.ratio) if config.global_budget else None
    if config.global_budget and not (structure is not None and structure.allocatable):
        raise DsformerError(f"--global-budget gives each layer its own ratio; {config.method} takes no such ratios")
    if config.global_budget and method(config.method).options.get("share_basis"):
        raise DsformerError(f"--global-budget gives each layer its own ratio; {config.method} shares one basis")
    if config.schedule.polish and trainer != "stf":
        raise DsformerError(f"--polish ends STF training early; {config.method} does not train with STF")
    if trainer != "stf" and not config.schedule.is_default():
        how = "no structure" if trainer == "-" else "conventionally"
        flags = "--refresh-every, --ramp-steps, --pull and --hold-projection"
        raise DsformerError(f"{flags} apply to STF; {config.method} trains {how}")
    if config.schedule.polish and method(config.method).options.get("share_basis"):
        raise DsformerError(
            f"--polish trains the compact factors in transformers.Trainer, whose checkpoints cannot hold one basis "
            f"shared by several layers; {config.method} cannot polish"
        )
    check_run_device(config.device)
    if task_spec(config.task).is_qa:
        check_stride(config.train.max_length, config.train.doc_stride)
    if config.max_train is not None and config.max_train < 1:
        raise DsformerError(f"max_train must be at least 1 example (got {config.max_train})")
    return trainer


def finetune(config: RunConfig, output: str | os.PathLike, resume: bool = False) -> dict[str, Any] | None:
    """Train ``config.method`` on ``config.task`` and save the compact model and ``metrics.json`` to ``output``.

    Training state lives in ``<output>.work`` (checkpoints for ``resume``); the final model folder
    is written atomically at the end; returns the metrics. Started by ``torchrun`` or ``accelerate
    launch``, it trains on every process (DDP); rank 0 writes and returns, the others return None.
    """
    lm = is_lm_task(config.task)
    if lm and config.method == "dense":  # the ratio flag means nothing to it: recorded and resumed at 1
        config = replace(config, ratio=1.0)
    trainer = check_lm_run(config) if lm else check_run(config)  # what can be checked before loading is, first
    out = check_model_output(output, source=config.model)
    _join_processes(config.device)
    if distributed()[1] > 1:  # the processes of one run share the output; rank 0 writes it
        return _finetune_output(config, out, trainer, resume)
    with exclusive(out):  # a second run to the same output stops at once
        return _finetune_output(config, out, trainer, resume)


def _finetune_output(config: RunConfig, out: Path, trainer: str, resume: bool) -> dict[str, Any] | None:
    work = work_folder(out)
    if (work / "checkpoint" / "trainer_state.json").exists():
        raise DsformerError(
            f"{work} holds a checkpoint of dsformer 0.1's training loop, which this version cannot resume: "
            f"delete {work} to start over"
        )
    interrupted = has_checkpoint(out)
    if resume and not interrupted:
        raise DsformerError(f"--resume: no checkpoint in {work}; start without --resume")
    if interrupted and not resume:  # starting over would overwrite it at the first checkpoint
        raise DsformerError(
            f"{work} holds the checkpoint of an interrupted run: continue it with --resume, "
            f"or delete {work} to start over"
        )
    if resume:
        _check_same_run(work / RUN_FILE, config)
    started = time.time()
    try:
        if is_lm_task(config.task):
            return _finetune_lm(config, out, work, trainer, resume)
        return _finetune(config, out, work, trainer, resume)
    except KeyboardInterrupt as interrupt:
        saved = (out / METRICS_FILE).exists() and (out / METRICS_FILE).stat().st_mtime >= started
        resumable = f"the checkpoint is in {work}: run the same command with --resume"
        if saved:  # the signal came after the save: the run is complete
            interrupt.hint = f"interrupted after the run was saved to {out}"
            shutil.rmtree(work, ignore_errors=True)
        else:
            interrupt.hint = "interrupted; " + (resumable if has_checkpoint(out) else "no checkpoint yet to resume")
        raise
    finally:
        if work.exists() and not has_checkpoint(out):  # nothing to resume: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)


def _finetune(config: RunConfig, out: Path, work: Path, trainer: str, resume: bool) -> dict[str, Any] | None:
    start = time.perf_counter()
    data = load_task(config.task, config.data_dir, seed=config.train.seed, max_train=config.max_train)
    reference = _reference_metric(config.reference, data.spec.metrics[0]) if config.reference else None
    torch.manual_seed(config.train.seed)  # before loading: the new task head's initialization depends on it
    model, tokenizer = load_pretrained(
        config.model, task_head=True, num_labels=data.spec.num_labels, kind=data.spec.kind
    )
    if tokenizer is None:
        raise DsformerError(f"model {config.model!r} has no tokenizer; give a folder or hub name that includes one")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.train.max_length > positions:
        raise DsformerError(f"--max-length {config.train.max_length}: the model reads at most {positions} tokens")
    device = torch.device(config.device)
    model.to(device)
    dense_bytes = model_bytes(model)  # the pretrained model's size, the reference of every ratio
    teacher = load(config.teacher, device=device) if config.teacher else None
    if config.method == "distil":
        if teacher is None:
            raise DsformerError(
                "--method distil needs --teacher: a fine-tuned model saved by `dsformer finetune --method dense`"
            )
        model = make_student(teacher, config.ratio).to(device)
    prepared = prepare(
        config.method,
        model,
        config.ratio,
        trainer=config.trainer,
        data=data,
        tokenizer=tokenizer,
        max_length=config.train.max_length,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        schedule=config.schedule,
        progress=config.train.progress,
        fisher=config.fisher,
        calibrate=config.fits_outputs,
        global_budget=config.global_budget,
        stride=config.train.doc_stride,
    )
    if distributed()[0] == 0:
        atomic_write_text(work / RUN_FILE, json.dumps(_run_identity(config), indent=2) + "\n")
    result = train(model, tokenizer, data, config.train, work, stf=prepared.stf, teacher=teacher, resume=resume)
    report = prepared.stf.finalize(iters=0) if prepared.stf is not None else prepared.report
    ratios = report.totals() if report is not None else None
    if config.method == "distil":
        ratios = {
            "ratio_params": _block_params(teacher) / _block_params(model),
            "ratio_model_bytes": dense_bytes / model_bytes(model),
        }
    metrics: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "method": config.method,
        "trainer": trainer,
        "task": data.spec.name,
        "metric": data.spec.metrics[0],
        "ratio": config.ratio if config.method != "dense" else 1.0,
        "test": result.test,
        "validation": result.validation,
        "best_step": result.best_step,
        "steps": result.steps,
        "mean_step_seconds": result.mean_step_seconds,
        "wall_seconds": time.perf_counter() - start,
        "ratios": ratios,
        "layers": report.to_json()["layers"] if report is not None else None,  # each layer's layout and ratio
        "model_bytes": model_bytes(model),
        "dense_model_bytes": dense_bytes,
        "history": result.history,
        "start_sha256": _start_checksum(config.model),
        "sizes": data.sizes(),
        "skipped": data.skipped,  # examples reading or windowing dropped, by split and reason
        "config": {
            **asdict(config),
            "calibrate": config.fits_outputs,
            "train": asdict(config.train),
            "schedule": asdict(config.schedule),
        },  # fmt: skip
        "hardware": describe(),
        "processes": distributed()[1],  # > 1: a DDP run (torchrun / accelerate launch)
        "dsformer": __version__,
    }
    if reference is not None:
        metrics["dense_test"] = reference
        metrics["difference_to_dense"] = result.test[data.spec.metrics[0]] - reference
    if distributed()[0] != 0:
        return None
    save(model.cpu(), out, tokenizer=tokenizer, report=report, extra_files={METRICS_FILE: metrics})
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are only needed to resume an unfinished run
    return metrics


def _finetune_lm(config: RunConfig, out: Path, work: Path, trainer: str, resume: bool) -> dict[str, Any]:
    if distributed()[1] > 1:
        raise DsformerError("LM healing runs in one process for now; start it without torchrun")
    atomic_write_text(work / RUN_FILE, json.dumps(_run_identity(config), indent=2) + "\n")
    model, tokenizer, report, metrics = finetune_lm(config, work, trainer, resume)
    save(model, out, tokenizer=tokenizer, report=report, extra_files={METRICS_FILE: metrics})
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def default_output(config: RunConfig) -> Path:
    """``outputs/<task>-<method>[-<ratio>x][-<trainer>][-fisher][-calibrated|-weight-fit][-global][-s<seed>]``:
    whatever tells two runs apart."""
    parts = [task_label(config.task), config.method] + ([] if config.method == "dense" else [f"{config.ratio:g}x"])
    parts += [config.trainer] if config.trainer else []
    parts += ["fisher"] if config.fisher else []
    if config.fits_outputs != calibrated_by_default(config.method):  # named only where not the method's default
        parts += ["calibrated" if config.fits_outputs else "weight-fit"]
    parts += ["global"] if config.global_budget else []
    parts += [f"s{config.train.seed}"] if config.train.seed else []
    return Path("outputs") / "-".join(parts)


def calibrated_by_default(name: str) -> bool:
    """Whether method ``name`` fits the layers' outputs unless told otherwise (False for an LM task's methods)."""
    return name in METHODS and METHODS[name].calibrated


def work_folder(output: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints until it finishes: ``<output>.work``."""
    out = Path(output)
    return out.with_name(out.name + ".work")


def has_checkpoint(output: str | os.PathLike) -> bool:
    """Whether the run writing ``output`` was interrupted and left a checkpoint to resume."""
    work = work_folder(output)
    return work.is_dir() and (latest_checkpoint(work) is not None or fitted_start(work))


def _join_processes(device: str) -> None:
    """Join the process group when started by torchrun or ``accelerate launch`` (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=device == "cpu")


def _run_identity(config: RunConfig) -> dict[str, Any]:
    """What a checkpoint belongs to, besides the training settings and STF schedule (which
    :func:`dsformer.harness.training.train` checks): the start, data, method and its options. The device and
    the reference may change."""
    return {k: v for k, v in asdict(config).items() if k not in ("train", "schedule", "device", "reference")}


def _check_same_run(record: Path, config: RunConfig) -> None:
    """Refuse to resume a checkpoint into a different run (another start, task, data, method, ratio, ...)."""
    if not record.exists():  # checkpoints from before the record: only the training settings are checked
        return
    try:
        saved = json.loads(record.read_text())
        mine = _run_identity(config)
        changed = [key for key in mine if key in saved and saved[key] != mine[key]]
    except (OSError, ValueError, AttributeError) as err:
        raise DsformerError(f"--resume: {record} is unreadable ({type(err).__name__}: {err})") from None
    if changed:
        what = ", ".join(f"{key} {saved[key]!r} -> {mine[key]!r}" for key in changed)
        raise DsformerError(
            f"--resume: the checkpoint in {record.parent} is of another run ({what}); "
            "give the same options as the interrupted run, or delete the folder to start over"
        )


def _start_checksum(model: str | None) -> str | None:
    """The SHA-256 of the start's weight file when it is a saved dsformer folder (a fine-tuned dense
    start): runs that share it started from the same weights. None for other starts."""
    if model is None or not Path(model).is_dir():
        return None
    try:
        return read_meta(model)["weights"]["sha256"]
    except DsformerError:
        return None


def _block_params(model) -> int:
    """Weight parameters of the linears inside the model's blocks (what the other methods compress)."""
    return sum(model.get_submodule(name).weight.numel() for name in find_targets(model))


def _reference_metric(path: str, key: str) -> float:
    """The dense run's test metric from its metrics.json."""
    try:
        return float(json.loads(Path(path).read_text())["test"][key])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DsformerError(
            f"--reference {path} is not the metrics.json of a run on this task ({type(err).__name__}: {err})"
        ) from None
