"""Fine-tuning on ``transformers.Trainer``, for every method: warm-up and linear decay, dynamic padding,
validation at each epoch end with best-checkpoint selection, exact resume, KD, STF and its hand-over.

What is ours on top of the Trainer: the task's own evaluation (:mod:`dsformer.harness.evaluation`),
a KD loss, STF through :class:`dsformer.STFCallback`, ``Schedule.polish``'s hand-over from STF to
the compact factors (two Trainer runs joined at one checkpoint), and, in
:mod:`dsformer.harness.checkpoints`, Ctrl-C/SIGTERM finishing the step with a checkpoint and
checkpoints checked before they are resumed.

Example (a tiny model on a few made-up sentences):
    >>> import tempfile
    >>> from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    >>> from dsformer.harness.tasks import TASKS, Example, TaskData
    >>> from dsformer.harness.training import TrainConfig, train
    >>> vocab = tempfile.mktemp()
    >>> _ = open(vocab, "w").write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film"]))
    >>> tok = BertTokenizerFast(vocab=vocab)
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1,
    ...                                                  num_attention_heads=2, intermediate_size=32))
    >>> ex = [Example("good film", None, 1.0), Example("bad film", None, 0.0)] * 8
    >>> result = train(model, tok, TaskData(TASKS["mr"], ex, ex[:4], ex[:4]), TrainConfig(epochs=1, batch_size=4,
    ...                progress=False), output_dir=tempfile.mkdtemp())
    >>> sorted(result.test)
    ['accuracy']
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from dsformer.callbacks import STFCallback
from dsformer.errors import Interrupted
from dsformer.files import atomic_folder, atomic_write_text
from dsformer.harness.checkpoints import (
    HANDOVER_FILE,
    SETTINGS_FILE,
    STATE_FILE,
    Checkpoints,
    StopRequest,
    TrainingError,
    check_checkpoint,
    check_settings,
    checkpoint_step,
    distributed,
    holds_stf,
    latest_checkpoint,
    read_handover_report,
)
from dsformer.harness.evaluation import encode, evaluate
from dsformer.harness.squad import training_windows
from dsformer.harness.tasks import TaskData, TaskSpec
from dsformer.stf import STF

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32  # the global batch: processes of a distributed run share each one
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of all steps
    max_length: int = 128
    doc_stride: int = 128  # question answering: tokens shared by consecutive windows of a context
    seed: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 200  # steps; 0 = only at epoch ends
    eval_batch_size: int = 128
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5  # weight of the KD term when a teacher is given
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or fp32, bf16
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        limits = {  # setting: (lowest, highest) allowed, both included
            "epochs": (1e-9, math.inf),
            "batch_size": (1, math.inf),
            "eval_batch_size": (1, math.inf),
            "lr": (1e-12, math.inf),
            "max_length": (2, math.inf),  # room for the special tokens
            "doc_stride": (0, math.inf),
            "weight_decay": (0.0, math.inf),
            "warmup": (0.0, 1.0),
            "grad_clip": (0.0, math.inf),
            "checkpoint_every": (0, math.inf),
            "kd_temperature": (1e-6, math.inf),
            "kd_alpha": (0.0, 1.0),
            "seed": (0, 2**32 - 1),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
                above = f"at least {low:g}" if low >= 1 or low == 0 else "positive"
                bound = above if high == math.inf else f"in [{low:g}, {high:g}]"
                raise TrainingError(f"{name} must be {bound} (got {value!r})")

    def bf16(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")


@dataclass
class TrainResult:
    validation: dict[str, float]
    test: dict[str, float]
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    mean_step_seconds: float = 0.0


def train(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    stf: STF | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` on ``data``; end in the state with the best validation metric; report validation
    and test metrics.

    ``output_dir`` holds the Trainer's checkpoints (``checkpoint-<step>``: every ``checkpoint_every``
    steps, at epoch ends and on Ctrl-C/SIGTERM); ``resume=True`` continues from the latest exactly
    (same batches, dropout and metric). With ``stf``, the model trains straight-through; with
    ``stf.schedule.polish``, its compact factors train for the last steps.
    """
    out = Path(output_dir)
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise TrainingError(f"--resume: no checkpoint in {out}; start without --resume")
    settings = {"config": settings_of(config), "schedule": asdict(stf.schedule) if stf is not None else None}
    if resume:
        check_settings(out, settings, settings_of(TrainConfig()))
    else:
        atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        checkpoint = None
    if data.spec.is_qa:
        features, dropped = training_windows(tokenizer, data.train, config.max_length, config.doc_stride)
        if dropped:
            data.skipped["train: answer fits in no window"] = dropped
    else:
        features = encode(tokenizer, data.train, config.max_length, data.spec)
    total = max(1, math.ceil(config.epochs * math.ceil(len(features) / config.batch_size)))
    handover = stf.schedule.polish_step(total) if stf is not None else None
    run = _Run(model, tokenizer, data, config, out, features, total, teacher)
    with StopRequest() as stop:
        if stf is not None and handover is not None:
            if checkpoint is None or holds_stf(checkpoint):
                if checkpoint is None or checkpoint_step(checkpoint) < handover:
                    run.fit(checkpoint, stf=stf, stop=stop, stop_at=handover)
                    if distributed()[1] > 1:  # rank 0 has written the checkpoint that every process reads next
                        torch.distributed.barrier()
                    checkpoint = latest_checkpoint(out)
                if checkpoint_step(checkpoint) < handover:  # stopped (Ctrl-C) before the hand-over
                    raise Interrupted(stop.signum)
                checkpoint = run.hand_over(stf, checkpoint)
            else:  # resumed after the hand-over: compact layers of the recorded layouts take the checkpoint
                stf.finalize(iters=0)
                stf.report = read_handover_report(out)
            stf = None
        if stop.signum:  # stopped (Ctrl-C) at the hand-over: its checkpoint is the compact model's
            raise Interrupted(stop.signum)
        run.fit(checkpoint, stf=stf, stop=stop)
        if stop.signum:
            raise Interrupted(stop.signum)
    validation = _evaluate(model, tokenizer, data.validation, data, config)
    test = _evaluate(model, tokenizer, data.test, data, config)
    return run.result(validation, test)


def settings_of(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (all but the progress display)."""
    return {key: value for key, value in asdict(config).items() if key != "progress"}


def _evaluate(model, tokenizer, examples, data: TaskData, config: TrainConfig) -> dict[str, float]:
    device = next(model.parameters()).device
    return evaluate(
        model, tokenizer, examples, data.spec, config.max_length, config.eval_batch_size, config.bf16(device),
        config.doc_stride,
    )  # fmt: skip


class _Run:
    """One fine-tuning run: the Trainers it takes (two with a hand-over) and what they leave."""

    def __init__(self, model, tokenizer, data, config, out, features, total, teacher) -> None:
        self.model, self.tokenizer, self.data, self.config, self.out = model, tokenizer, data, config, out
        self.features, self.total, self.teacher = features, total, teacher
        self.trainer: TaskTrainer | None = None
        self.step_times: list[float] = []

    def trainer_for(self, stf: STF | None, stop: StopRequest | None, stop_at: int | None = None) -> TaskTrainer:
        config, device = self.config, next(self.model.parameters()).device
        world = distributed()[1]
        args = trainer_arguments(
            config,
            self.out,
            self.total,
            device,
            eval_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=2,  # the latest, and the best (kept while it is)
            load_best_model_at_end=stop_at is None,
            metric_for_best_model=self.data.spec.metrics[0],
            greater_is_better=True,
            # each process takes its share of every global batch, so any number of processes trains alike
            accelerator_config={"split_batches": world > 1},
            ddp_broadcast_buffers=False,  # STF's buffers are computed alike on every process
        )
        callbacks: list[TrainerCallback] = [STFCallback(stf)] if stf is not None else []
        # the progress line after STF, whose re-projection is part of a step's time
        show = config.progress and distributed()[0] == 0
        callbacks += [Progress(f"train {self.data.spec.name}", self.step_times, stf, show)]
        callbacks.append(Checkpoints(config.checkpoint_every, stop, stop_at))
        trainer = TaskTrainer(
            self,
            stf,
            model=self.model,
            args=args,
            train_dataset=self.features,
            eval_dataset=self.features[:1],  # evaluation runs on the task's validation split (evaluate below)
            data_collator=DataCollatorWithPadding(self.tokenizer),
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def fit(self, checkpoint: Path | None, stf: STF | None, stop: StopRequest, stop_at: int | None = None) -> None:
        if checkpoint is not None:
            check_checkpoint(checkpoint, self.model)
        self.trainer = self.trainer_for(stf, stop, stop_at)
        self.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)

    def hand_over(self, stf: STF, checkpoint: Path) -> Path:
        """End STF at ``checkpoint``'s step (``Schedule.polish``): compact layers with the support frozen train
        from here.

        The checkpoint is rewritten for them: the compact model, an optimizer that keeps the moments
        of every parameter that survives (embeddings, norms, the head, untouched linears) and starts
        the factors', and the best-checkpoint selection restarted, so the run ends in a compact
        model. The Trainer then resumes from it.
        """
        check_checkpoint(checkpoint, self.model)
        # the weights, projections and moments at the hand-over (this process may have resumed right at it)
        self.model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
        predecessor = self.trainer_for(stf, None)
        predecessor.create_optimizer()
        predecessor.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        old = predecessor.optimizer.state
        report = stf.finalize()  # one more projection of the latents, as finalize makes by default
        if distributed()[0] == 0:
            atomic_write_text(self.out / HANDOVER_FILE, json.dumps(report.to_json(), indent=2) + "\n")
        successor = self.trainer_for(None, None)
        successor.create_optimizer()
        for group, before in zip(successor.optimizer.param_groups, predecessor.optimizer.param_groups, strict=True):
            group.update({key: before[key] for key in ("lr", "initial_lr") if key in before})  # the schedule's place
            for param in group["params"]:
                if param in old:
                    successor.optimizer.state[param] = old[param]
        if distributed()[1] > 1:  # every process has read the checkpoint before rank 0 rewrites it
            torch.distributed.barrier()
        if distributed()[0] == 0:
            state = json.loads((checkpoint / STATE_FILE).read_text())
            state.update(best_metric=None, best_global_step=None, best_model_checkpoint=None)
            with atomic_folder(checkpoint, manifest=None) as tmp:  # the run's own checkpoint
                successor.save_model(str(tmp))
                torch.save(successor.optimizer.state_dict(), tmp / "optimizer.pt")
                for kept in checkpoint.iterdir():
                    if kept.name.startswith(("rng_state", "scheduler")):
                        (tmp / kept.name).write_bytes(kept.read_bytes())
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if distributed()[1] > 1:
            torch.distributed.barrier()
        return checkpoint

    def result(self, validation: dict[str, float], test: dict[str, float]) -> TrainResult:
        state = self.trainer.state
        losses = {entry["step"]: entry["loss"] for entry in state.log_history if "loss" in entry}
        history = []
        for entry in state.log_history:
            metrics = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")}
            if metrics:
                history.append({"step": entry["step"], "loss": losses.get(entry["step"]), **metrics})
        timed = self.step_times[1:] or self.step_times
        return TrainResult(
            validation=validation,
            test=test,
            best_step=state.best_global_step or state.global_step,
            steps=state.global_step,
            seconds=sum(self.step_times),
            history=history,
            mean_step_seconds=sum(timed) / max(1, len(timed)),
        )


class TaskTrainer(Trainer):
    """The Trainer with the task's evaluation, a KD loss, a stop on a non-finite loss and STF's support-change
    rate in the log."""

    def __init__(self, run: _Run, stf: STF | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.job, self.stf = run, stf

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss, teacher = outputs.loss, self.job.teacher
        if teacher is not None:
            with torch.no_grad():
                target = teacher.eval()(**{k: v for k, v in inputs.items() if k not in LABELS})
            spec = self.job.data.spec
            loss = distillation_loss(loss, scores_of(outputs, spec), scores_of(target, spec), spec, self.job.config)
        check_finite(loss, self.job.out, self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        if not self.job.data.spec.is_qa:
            return super()._get_train_sampler(train_dataset)
        # QA windows run from a few dozen tokens to the whole window: batches of similar lengths pad less
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(batch, train_dataset or self.train_dataset, self.args.seed)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        job = self.job
        metrics = _evaluate(self.model, job.tokenizer, job.data.validation, job.data, job.config)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(dict(metrics))  # a copy: the Trainer adds the epoch to what it logs
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.stf is not None and self.stf.layers and "loss" in logs:
            logs["support_change"] = self.stf.support_change
        super().log(logs, start_time)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Batches of similar lengths in an order fixed by the seed and the epoch alone (the Trainer calls
    ``set_epoch``), so a resumed run draws the batches an uninterrupted one does."""

    def __init__(self, batch_size: int, dataset: Any, seed: int) -> None:
        super().__init__(batch_size, dataset=dataset)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def trainer_arguments(
    config: TrainConfig, output_dir: str | os.PathLike, steps: int, device: torch.device, **more: Any
) -> TrainingArguments:
    """The ``TrainingArguments`` of a run of ``config`` for ``steps`` steps (linear decay after warm-up,
    a log line per step, no reporting service), with ``more`` on top."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=max(1, round(config.warmup * steps)),
        lr_scheduler_type="linear",
        max_grad_norm=config.grad_clip,
        seed=config.seed,
        bf16=config.bf16(device),
        use_cpu=device.type == "cpu",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        **more,
    )


def check_finite(loss: torch.Tensor, out: Path, step: int) -> None:
    """Stop training on a non-finite loss (on every process of a distributed run alike), naming the checkpoint
    to resume from."""
    shown = loss.detach().clone()
    if distributed()[1] > 1:  # every process must see the same loss to stop together
        torch.distributed.all_reduce(shown)
    if not torch.isfinite(shown):
        last = latest_checkpoint(out)
        raise TrainingError(
            f"loss became {shown.item()} at step {step}; training stopped. The last good "
            f"checkpoint is {last or 'not written yet'}; resume with --resume, perhaps with a lower --lr"
        )


LABELS = ("labels", "start_positions", "end_positions")


def scores_of(outputs: Any, spec: TaskSpec) -> torch.Tensor:
    """What KD matches: the logits, or for question answering the start and end logits as rows of one batch."""
    if spec.is_qa:
        return torch.cat([outputs.start_logits, outputs.end_logits]).float()
    return outputs.logits.float()


def distillation_loss(
    task_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec, config: TrainConfig
) -> torch.Tensor:
    """``(1 - α) · task + α · KD``: KD the squared error to the teacher's scores (regression) or
    ``T² · KL(teacher ‖ student)`` at temperature ``T`` (classification; for question answering over the start
    positions and over the end positions, averaged)."""
    if spec.is_regression:
        kd = nn.functional.mse_loss(logits, target)
    else:
        t = config.kd_temperature
        log_p, q = nn.functional.log_softmax(logits / t, -1), nn.functional.softmax(target / t, -1)
        kd = nn.functional.kl_div(log_p, q, reduction="batchmean") * (t * t)
    return (1 - config.kd_alpha) * task_loss + config.kd_alpha * kd


class Progress(TrainerCallback):
    """One line that moves: steps, loss, seconds per step, STF's support-change rate; a line per validation.
    Each step's seconds go to ``step_times``."""

    def __init__(self, label: str, step_times: list[float], stf: STF | None, show: bool) -> None:
        self.label, self.step_times, self.stf, self.show = label, step_times, stf, show
        self.bar = None
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.started)
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            shown = {"loss": f"{logs['loss']:.4f}", "step_s": f"{self.step_times[-1]:.2f}"}
            if "support_change" in logs:
                shown["support_change"] = f"{logs['support_change']:.4f}"
            self.bar.set_postfix(shown, refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None:
            shown = {k.removeprefix("eval_"): round(v, 4) for k, v in (metrics or {}).items()}
            self.bar.write(f"step {state.global_step}: validation {shown}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
