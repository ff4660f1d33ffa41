"""Healing a compressed causal LM: a short fine-tune on calibration text, distilled from the dense model.

The LM is compressed first (block by block on calibration windows for the data-aware methods,
:func:`dsformer.calibration.compress_calibrated`), then trains on windows of the same text for a
token budget, with ``(1 - α) · next-token CE + α · T² · KL(dense ‖ compressed)`` per token (a
budget of 0 tokens: the training-free fit, evaluated as it is). Two trainers:

- ``stf``: latent dense weights start from the pretrained ones; the fitted factors are their first
  projection and every later one is data-aware on the calibration moments (STF).
- ``conventional``: the compact factors themselves train, their support frozen (the ablation, and
  how the baselines heal).

Both run on ``transformers.Trainer`` with the encoders' checkpoints (every ``checkpoint_every``
steps, Ctrl-C/SIGTERM at a step's end), exact resume and progress line. The fitted start is kept in
the work folder, so a resumed run does not fit again.

Example (a tiny random Llama healing on made-up token windows):
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from dsformer.harness.healing import heal
    >>> from dsformer.harness.training import TrainConfig
    >>> torch.manual_seed(0) and None
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    >>> windows = torch.randint(0, 64, (8, 16))
    >>> result = heal(model, windows, TrainConfig(batch_size=4, progress=False), steps=2,
    ...               output_dir=tempfile.mkdtemp())
    >>> result.steps, result.tokens
    (2, 128)
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, default_data_collator

from dsformer.calibration import compress_calibrated
from dsformer.callbacks import STFCallback
from dsformer.checkpoint import META_FILE, compact_layers, load, read_meta, save
from dsformer.errors import DsformerError, Interrupted
from dsformer.files import atomic_write_text
from dsformer.hardware import check_run_device, describe
from dsformer.harness.checkpoints import (
    SETTINGS_FILE,
    Checkpoints,
    StopRequest,
    TrainingError,
    check_checkpoint,
    check_settings,
    latest_checkpoint,
)
from dsformer.harness.lm import (
    LM_TASKS,
    calibration_batches,
    context_length,
    cut_windows,
    eval_windows,
    held_out,
    perplexity,
    read_text,
    tokenize,
)
from dsformer.harness.methods import POST_TRAINING, TRAINERS
from dsformer.harness.models import load_pretrained
from dsformer.harness.training import Progress, TrainConfig, check_finite, settings_of, trainer_arguments
from dsformer.report import Report, model_bytes
from dsformer.stf import STF
from dsformer.structures import structure_config
from dsformer.structures.budget import check_ratio
from dsformer.surgery import CompressConfig, compress
from dsformer.version import __version__

START = "start"  # in the work folder: the fitted model training starts from
MOMENTS_FILE = "moments.safetensors"  # in the work folder: the calibration moments STF's projections use


@dataclass
class HealResult:
    steps: int
    tokens: int
    seconds: float
    mean_step_seconds: float
    losses: list[dict[str, float]] = field(default_factory=list)


def lm_distillation_loss(
    ce: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``(1 - α) · ce + α · T² · KL(teacher ‖ student)``, the KL averaged over every predicting position."""
    t = temperature
    log_p = nn.functional.log_softmax(logits[:, :-1].float() / t, -1)
    log_q = nn.functional.log_softmax(target[:, :-1].float() / t, -1)
    kd = nn.functional.kl_div(log_p.flatten(0, 1), log_q.flatten(0, 1), log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * kd * (t * t)


def heal(
    model: nn.Module,
    windows: torch.Tensor,
    config: TrainConfig,
    steps: int,
    output_dir: str | os.PathLike,
    teacher: nn.Module | None = None,
    stf: STF | None = None,
    resume: bool = False,
) -> HealResult:
    """Train the causal LM ``model`` for ``steps`` steps of ``config.batch_size`` token ``windows`` (shuffled,
    seeded); with ``teacher``, distilled from its logits (``config.kd_alpha``, ``config.kd_temperature``).

    ``output_dir`` holds the Trainer's checkpoints; ``resume`` continues from the latest exactly.
    With ``stf`` the model trains straight-through (the caller finalizes it).
    """
    if steps < 1:
        raise TrainingError(f"healing needs at least 1 step (got {steps})")
    out = Path(output_dir)
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise TrainingError(f"--resume: no checkpoint in {out}; start without --resume")
    settings = {
        "config": {**settings_of(config), "steps": steps},
        "schedule": asdict(stf.schedule) if stf is not None else None,
    }
    if resume:
        check_settings(out, settings, {**settings_of(TrainConfig()), "steps": steps})
        check_checkpoint(checkpoint, model)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        checkpoint = None
    device = next(model.parameters()).device
    args = trainer_arguments(
        config, out, steps, device, eval_strategy="no", save_strategy="no", save_total_limit=2
    )  # Checkpoints below decides when to save
    step_times: list[float] = []
    with StopRequest() as stop:
        callbacks = [STFCallback(stf)] if stf is not None else []
        callbacks += [
            Progress("heal", step_times, stf, config.progress),
            Checkpoints(config.checkpoint_every, stop, None),
        ]
        trainer = _HealTrainer(
            out,
            teacher,
            config,
            stf,
            model=model,
            args=args,
            train_dataset=[{"input_ids": window} for window in windows],
            data_collator=default_data_collator,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        if stop.signum:
            raise Interrupted(stop.signum)
    timed = step_times[1:] or step_times
    losses = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    return HealResult(
        steps=trainer.state.global_step,
        tokens=trainer.state.global_step * config.batch_size * windows.shape[1],
        seconds=sum(step_times),
        mean_step_seconds=sum(timed) / max(1, len(timed)),
        losses=losses,
    )


class _HealTrainer(Trainer):
    """The Trainer with the next-token loss, KD from the dense model's logits and a stop on a non-finite loss."""

    def __init__(self, out: Path, teacher: nn.Module | None, config: TrainConfig, stf: STF | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out, self.teacher, self.config, self.stf = out, teacher, config, stf

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        outputs = model(input_ids=ids, labels=ids, use_cache=False)
        loss = outputs.loss
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher.eval()(input_ids=ids, use_cache=False).logits
            alpha, temperature = self.config.kd_alpha, self.config.kd_temperature
            loss = lm_distillation_loss(loss, outputs.logits, target, alpha, temperature)
        check_finite(loss, self.out, self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.stf is not None and self.stf.layers and "loss" in logs:
            logs["support_change"] = self.stf.support_change
        super().log(logs, start_time)


def check_lm_run(config: Any) -> str:
    """The checks of an LM healing run (``config``: a :class:`dsformer.harness.finetune.RunConfig`) that need no
    model or data; returns its trainer (``conventional`` unless asked)."""
    if config.method not in POST_TRAINING:
        names = ", ".join(POST_TRAINING)
        raise DsformerError(f"--task {config.task} heals a compressed LM: choose --method from {names}")
    if config.method != "dense":  # dense trains the model as it is, the reference of the healed ones
        check_ratio(config.ratio)
    if config.trainer is not None and config.trainer not in TRAINERS:
        raise DsformerError(f"unknown trainer {config.trainer!r}; choose {' or '.join(TRAINERS)}")
    # conventional by default: on SmolLM2 at 2x and 65K tokens it healed DS and svd-llm better than STF
    # (docs/lm.md); STF, the default of task fine-tuning, is --trainer stf here
    trainer = config.trainer or "conventional"
    if config.fisher or config.calibrate or config.global_budget or config.teacher:
        raise DsformerError(
            "--fisher, --calibrate, --global-budget and --teacher apply to task fine-tuning; an LM heals from its "
            "calibration text (--samples) with KD from the dense model (its global budget: --method ds-aware-global)"
        )
    if trainer != "stf" and not config.schedule.is_default():
        raise DsformerError(
            "--refresh-every, --ramp-steps, --pull, --hold-projection and --polish apply to --trainer stf"
        )
    if config.schedule.polish:
        raise DsformerError("--polish is not offered for LM healing yet")
    check_run_device(config.device)
    for name, least in (("tokens", 0), ("samples", 1), ("max_windows", 1)):
        value = getattr(config, name)
        if (value is not None or name != "max_windows") and (not isinstance(value, int) or value < least):
            raise DsformerError(f"{name} must be a whole number of at least {least} (got {value!r})")
    if config.tokens == 0 or config.method == "dense":  # the training-free fit, or no structure: no trainer
        if config.trainer is not None or not config.schedule.is_default():
            why = "--tokens 0 fits without training" if config.tokens == 0 else "dense trains no structure"
            raise DsformerError(f"{why}: --trainer and the STF flags do not apply")
        return "-"
    return trainer


def finetune_lm(
    config: Any, work: Path, trainer: str, resume: bool
) -> tuple[nn.Module, Any, Report | None, dict[str, Any]]:
    """Compress ``config.model`` with method ``config.method`` and heal it (``config``: a ``RunConfig`` with an
    LM task); returns the model, its tokenizer, its report and the run's metrics, for the caller to save.
    ``dense`` trains the pretrained model itself by the same recipe (no report): the healed runs' reference."""
    begun = time.perf_counter()
    chosen = POST_TRAINING[config.method]
    test_text = read_text(config.task, "test", config.data_dir)  # a missing file fails before the model loads
    text = read_text(config.task, "calibration", config.data_dir)
    own_text = config.task not in LM_TASKS
    if own_text:  # one file: train on it all but its last tenth, which is the test text
        text, test_text = held_out(text)
    teacher, tokenizer = load_pretrained(config.model)
    if tokenizer is None or teacher.get_output_embeddings() is None:
        name = config.model or "the model"
        raise DsformerError(f"{name} is not a causal LM with a tokenizer; it cannot heal on text")
    window = context_length(teacher, config.train.max_length)
    windows = cut_windows(tokenize(tokenizer, text), window)
    if config.tokens > 0 and len(windows) < config.train.batch_size:
        raise DsformerError(
            f"the calibration text makes {len(windows)} windows of {window} tokens, fewer than one batch "
            f"of {config.train.batch_size}"
        )
    test_windows = eval_windows(tokenizer, test_text, window, config.max_windows)
    device = torch.device(config.device)
    teacher.to(device).eval()
    dense_bytes = model_bytes(teacher)
    student, moments, report, fit_seconds = _fitted_start(config, teacher, tokenizer, text, window, work, resume)
    student.to(device)
    stf, result = None, HealResult(steps=0, tokens=0, seconds=0.0, mean_step_seconds=0.0, losses=[])
    if config.tokens == 0:
        model = student.eval()
    elif trainer == "stf":
        start = {name: layer.factors for name, layer in compact_layers(student).items()}
        model = copy.deepcopy(teacher).train()
        structure = structure_config(chosen.structure, ratio=config.ratio, **chosen.options)
        stf = STF.wrap(model, structure, schedule=config.schedule, inputs=moments, start=start)
        del student
    else:
        model = student.train()
    for param in teacher.parameters():
        param.requires_grad_(False)
    if config.tokens > 0:
        steps = math.ceil(config.tokens / (config.train.batch_size * window))
        torch.manual_seed(config.train.seed)
        resume = resume and latest_checkpoint(work) is not None  # else only the fit was done: training starts
        result = heal(model, windows, config.train, steps, work, teacher, stf, resume)
    if stf is not None:
        report = stf.finalize(iters=0)  # exactly the projection training last computed with
    del teacher
    test = perplexity(model, test_windows, progress=config.train.progress)
    split = f"the last tenth of {config.task}'s lines (the rest trained)" if own_text else f"{config.task} test"
    protocol = f"{split}, {test['windows']} non-overlapping windows of {window} tokens"
    metrics = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "method": config.method,
        "trainer": trainer,
        "task": config.task,
        "metric": "perplexity",
        "ratio": config.ratio if chosen.structure is not None else 1.0,
        "test": test,
        "protocol": protocol,
        "steps": result.steps,
        "tokens": result.tokens,
        "window": window,
        "mean_step_seconds": result.mean_step_seconds,
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - begun,
        "ratios": report.totals() if report is not None else None,
        "layers": report.to_json()["layers"] if report is not None else None,  # each layer's layout and ratio
        "model_bytes": model_bytes(model),
        "dense_model_bytes": dense_bytes,
        "history": result.losses,
        "config": {**asdict(config), "train": asdict(config.train), "schedule": asdict(config.schedule)},
        "hardware": describe(),
        "dsformer": __version__,
    }
    return model.cpu(), tokenizer, report, metrics


def _fitted_start(
    config: Any, teacher: nn.Module, tokenizer: Any, text: str, window: int, work: Path, resume: bool
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, Report | None, float | None]:
    """The compressed model training starts from, its calibration moments (STF's projections use them) and
    report: fitted now (and kept in ``work``), or, resuming, the kept one."""
    folder = work / START
    chosen = POST_TRAINING[config.method]
    if chosen.structure is None:  # the dense reference: the pretrained model trains as it is
        return copy.deepcopy(teacher), None, None, 0.0
    if resume and fitted_start(work):
        student = load(folder)
        if chosen.calibrated and not (work / MOMENTS_FILE).exists():
            raise TrainingError(f"{work} holds a fit without its calibration moments: delete {work} to start over")
        moments = load_file(str(work / MOMENTS_FILE)) if chosen.calibrated else None
        for name, layer in compact_layers(student).items():
            if moments is not None and tuple(moments.get(name, torch.empty(0)).shape) != (layer.in_features,) * 2:
                raise TrainingError(f"{work / MOMENTS_FILE} does not fit {name}: delete {work} to start over")
        return student, moments, Report.from_json(read_meta(folder)["report"]), None
    structure = structure_config(chosen.structure, ratio=config.ratio, **chosen.options)
    student = copy.deepcopy(teacher)
    begun = time.perf_counter()
    moments: dict[str, torch.Tensor] = {}
    if chosen.calibrated:
        batches = calibration_batches(tokenizer, text, config.samples, window, seed=config.train.seed)
        progress = config.train.progress
        budget = chosen.global_budget
        report = compress_calibrated(student, CompressConfig(structure), batches, progress, budget, moments)
    else:
        report = compress(student, CompressConfig(structure), progress=config.train.progress)
    fit_seconds = time.perf_counter() - begun
    if moments:  # before the start, which marks the fit done; a tensor of its own each (inputs share moments)
        partial = work / (MOMENTS_FILE + ".partial")
        save_file({name: gram.contiguous().clone() for name, gram in moments.items()}, str(partial))
        os.replace(partial, work / MOMENTS_FILE)
    save(student.cpu(), folder, report=report)
    return student, moments or None, report, fit_seconds


def fitted_start(work: Path) -> bool:
    """Whether the work folder of an LM run holds its finished fit (a resumed run trains from it)."""
    return (work / START / META_FILE).exists()
