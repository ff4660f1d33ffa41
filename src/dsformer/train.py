"""The fine-tuning loop every method shares: AdamW with warm-up and linear decay, dynamic padding,
per-epoch validation with best-checkpoint selection, checkpoints that resume exactly, KD, STF hooks.

Example (a tiny model on a few made-up sentences):
    >>> import tempfile
    >>> from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    >>> from dsformer.tasks import TASKS, Example, TaskData
    >>> from dsformer.train import TrainConfig, train
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
import pickle
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dsformer.errors import DsformerError, Interrupted
from dsformer.metrics import compute
from dsformer.report import Report
from dsformer.stf import STF
from dsformer.tasks import Example, TaskData, TaskSpec

STATE_FILE = "trainer_state.json"


class TrainingError(DsformerError, RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that does not fit the run)."""


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of all steps
    max_length: int = 128
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
            "weight_decay": (0.0, math.inf),
            "warmup": (0.0, 1.0),
            "grad_clip": (0.0, math.inf),
            "checkpoint_every": (0, math.inf),
            "kd_temperature": (1e-6, math.inf),
            "kd_alpha": (0.0, 1.0),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value <= high:
                above = f"at least {low:g}" if low >= 1 or low == 0 else "positive"
                bound = above if high == math.inf else f"in [{low:g}, {high:g}]"
                raise TrainingError(f"{name} must be {bound} (got {value!r})")


PRECISIONS = ("auto", "fp32", "bf16")


def autocast(config: TrainConfig, device: torch.device):
    """The forward passes' precision: fp32 weights always; bf16 compute where the config asks for it."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class TrainResult:
    validation: dict[str, float]
    test: dict[str, float]
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    mean_step_seconds: float = 0.0


def encode(tokenizer, examples: list[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize once, unpadded; batches are padded to their own longest example."""
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    return [{key: enc[key][i] for key in enc.keys()} for i in range(len(examples))]


def _batch(tokenizer, features: list[dict], labels: list[float], regression: bool) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad(features, return_tensors="pt")
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return dict(batch)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, tokenizer, examples: list[Example], spec: TaskSpec, config: TrainConfig) -> list[float]:
    """Predictions (class indices or scores), batched by length for speed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features = encode(tokenizer, examples, config.max_length)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    preds: list[float] = [0.0] * len(features)
    for start in range(0, len(order), config.eval_batch_size):
        idx = order[start : start + config.eval_batch_size]
        batch = tokenizer.pad([features[i] for i in idx], return_tensors="pt")
        with autocast(config, device):
            logits = model(**_to(dict(batch), device)).logits.float()
        values = logits[:, 0] if spec.is_regression else logits.argmax(-1)
        for i, v in zip(idx, values.tolist(), strict=True):
            preds[i] = v
    model.train(was_training)
    return preds


def evaluate(model: nn.Module, tokenizer, examples: list[Example], spec: TaskSpec, config: TrainConfig | None = None):
    """The task's official metrics on ``examples``."""
    config = config or TrainConfig()
    preds = predict(model, tokenizer, examples, spec, config)
    return compute(spec.metrics, preds, [e.label for e in examples])


def _optimizer(model: nn.Module, config: TrainConfig, total_steps: int, offset: int = 0):
    """AdamW over the trainable parameters and its warm-up/decay schedule; a schedule built after
    ``offset`` steps (a hand-over to new parameters) goes on where the run's schedule is."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    warmup = max(1, round(config.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + offset))


def _loss(outputs, batch, spec: TaskSpec, teacher: nn.Module | None, config: TrainConfig) -> torch.Tensor:
    logits = outputs.logits.float()
    labels = batch["labels"]
    task = (
        nn.functional.mse_loss(logits[:, 0], labels)
        if spec.is_regression
        else nn.functional.cross_entropy(logits, labels)
    )
    if teacher is None:
        return task
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        target = teacher(**inputs).logits.float()
    if spec.is_regression:
        kd = nn.functional.mse_loss(logits, target)
    else:
        t = config.kd_temperature
        kd = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, -1), nn.functional.softmax(target / t, -1), reduction="batchmean"
        ) * (t * t)
    return (1 - config.kd_alpha) * task + config.kd_alpha * kd


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU one, and the GPU's when training there."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _gathered_rng(state: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Every process's generators, keyed ``cpu.<rank>``, so that each resumes its own dropout stream."""
    if world == 1:
        return state
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    return {f"{key}.{rank}": value for rank, one in enumerate(states) for key, value in one.items()}


def _restore_rng(saved: dict[str, torch.Tensor], device: torch.device) -> None:
    rank, _ = distributed()
    suffix = f".{rank}" if f"cpu.{rank}" in saved else ""  # a single-process checkpoint has plain keys
    torch.set_rng_state(saved["cpu" + suffix])
    if device.type == "cuda" and "cuda" + suffix in saved:
        torch.cuda.set_rng_state(saved["cuda" + suffix], device)


def _write_checkpoint(
    folder: Path, model, optimizer, scheduler, stf: STF | None, state: dict, rng: dict[str, torch.Tensor]
):
    from dsformer.io import atomic_folder

    with atomic_folder(folder, markers=(STATE_FILE,)) as tmp:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(_unshare(tensors), str(tmp / "model.safetensors"))
        if stf is not None:
            save_file(stf.factor_state(), str(tmp / "stf.safetensors"))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights); store each once more as a copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in tensors.items():
        ident = (value.data_ptr(), value.numel())
        out[key] = value.clone() if ident in seen else value
        seen.add(ident)
    return out


def _read_checkpoint(folder: Path, model, optimizer, scheduler, stf: STF | None) -> tuple[dict, torch.Tensor]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        if stf is not None:
            stf.load_factor_state(load_file(str(folder / "stf.safetensors")))
        rng = load_file(str(folder / "rng.safetensors"))
        if "cpu" not in rng and "cpu.0" not in rng:
            raise KeyError("rng.safetensors holds no generator state")
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
        raise TrainingError(
            f"checkpoint {folder} cannot be resumed into this run ({type(err).__name__}: {err})"
        ) from None
    return state, rng


def train(
    model: nn.Module,
    tokenizer,
    data: TaskData,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    stf: STF | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` on ``data``; keep the best validation state; report validation and test metrics.

    ``output_dir/checkpoint`` is written every ``checkpoint_every`` steps, at epoch ends and on
    interruption; ``resume=True`` continues from it exactly (same batches, dropout and metric).
    ``output_dir/best`` holds the state with the best validation metric, which the model ends in.
    """
    out = Path(output_dir)
    if resume and not (out / "checkpoint" / STATE_FILE).exists():
        raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoint'}; start without --resume")
    out.mkdir(parents=True, exist_ok=True)
    spec = data.spec
    device = next(model.parameters()).device
    # each process draws its own dropout noise (rank 0 as a single process would); the data order is shared
    torch.manual_seed(config.seed + 7919 * distributed()[0])
    features = encode(tokenizer, data.train, config.max_length)
    labels = [e.label for e in data.train]
    per_epoch = math.ceil(len(features) / config.batch_size)
    total = max(1, math.ceil(config.epochs * per_epoch))
    optimizer, scheduler = _optimizer(model, config, total)
    if teacher is not None:
        teacher.eval()

    state: dict[str, Any] = {"step": 0, "best": None, "best_step": 0, "history": [], "config": asdict(config)}
    if stf is not None:
        state["schedule"] = asdict(stf.schedule)
    ckpt = out / "checkpoint"
    if resume:
        try:  # checked before anything is loaded into the model
            saved = json.loads((ckpt / STATE_FILE).read_text())
            changed = _changed_settings(saved["config"], config)
            if stf is not None and saved.get("schedule") is not None:  # older checkpoints did not record it
                mine = asdict(stf.schedule)
                changed += [f"schedule.{key}" for key in mine if saved["schedule"].get(key, mine[key]) != mine[key]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise TrainingError(
                f"checkpoint {ckpt} cannot be resumed into this run ({type(err).__name__}: {err})"
            ) from None
        if changed:
            raise TrainingError(
                f"--resume: {ckpt} was written with other settings ({', '.join(changed)}); "
                "use the same ones or a new --output"
            )
        if stf is not None and "stf_report" in saved:  # it was written after the hand-over
            optimizer, scheduler = _hand_over(stf, model, config, total, saved)
            stf = None
        state, rng = _read_checkpoint(ckpt, model, optimizer, scheduler, stf)
        _restore_rng(rng, device)
        if stf is not None:
            stf.set_step(state["step"])

    rank, world = distributed()
    # DDP averages gradients over processes; each takes an equal share of every global batch
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    lead = rank == 0
    model.train()
    bar = tqdm(
        total=total,
        initial=state["step"],
        desc=f"train {spec.name}",
        unit="step",
        disable=not (config.progress and lead),
    )
    step_times: list[float] = []
    rng = _rng_state(device)
    before_update = False  # True while the model and optimizer are as they were at the start of the step
    with _StopRequest() as stop:
        try:
            while state["step"] < total:
                step = state["step"]
                epoch, in_epoch = divmod(step, per_epoch)
                order = torch.randperm(
                    len(features), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch)
                )
                idx = order[in_epoch * config.batch_size : (in_epoch + 1) * config.batch_size].tolist()[rank::world]
                rng = _rng_state(device)
                before_update = True
                start = time.perf_counter()
                batch = _to(
                    _batch(tokenizer, [features[i] for i in idx], [labels[i] for i in idx], spec.is_regression), device
                )
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with autocast(config, device):
                    loss = _loss(net(**inputs), batch, spec, teacher, config)
                shown = loss.detach().clone()
                if world > 1:  # every process must see the same loss to stop together
                    torch.distributed.all_reduce(shown)
                    shown /= world
                if not torch.isfinite(shown):
                    raise TrainingError(
                        f"loss became {shown.item()} at step {step + 1}; training stopped. The last good "
                        f"checkpoint is {ckpt if ckpt.exists() else 'not written yet'}; resume with --resume, "
                        "perhaps with a lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                before_update = False
                optimizer.step()
                scheduler.step()
                state["step"] = step = step + 1
                epoch_end = step % per_epoch == 0 or step == total
                if stf is not None:  # validation at an epoch end sees the latest latents' projection
                    stf.maybe_refresh(step, force=epoch_end)
                    handover = stf.schedule.polish_step(total)
                    if handover is not None and step >= handover:
                        optimizer, scheduler = _hand_over(stf, model, config, total, state, optimizer)
                        stf = None
                        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
                step_times.append(time.perf_counter() - start)
                postfix = {"loss": f"{shown.item():.4f}", "step_s": f"{step_times[-1]:.2f}"}
                if stf is not None:
                    postfix["support_change"] = f"{stf.support_change:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if epoch_end:
                    metrics = _lead_only(_validate, model, tokenizer, data, config, stf)
                    main = metrics[spec.metrics[0]]
                    entry = {"step": step, "loss": shown.item(), **metrics}
                    if stf is not None:
                        entry["support_change"] = stf.support_change
                    state["history"].append(entry)
                    if state["best"] is None or main > state["best"]:
                        state["best"], state["best_step"] = main, step
                        _lead_only(_write_checkpoint, out / "best", model, optimizer, scheduler, stf, state, rng)
                    if config.progress and lead:
                        bar.write(
                            f"step {step}: validation {metrics} (best {state['best']:.4f} at step {state['best_step']})"
                        )
                stopping = stop.agreed(world, device)
                if stopping or epoch_end or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    generators = _gathered_rng(_rng_state(device), world)
                    _lead_only(_write_checkpoint, ckpt, model, optimizer, scheduler, stf, state, generators)
                if stopping:
                    raise Interrupted(stop.signum)
        except KeyboardInterrupt:
            # an interruption before the optimizer step (a second Ctrl-C, or one outside the handler's
            # reach) left the state of the step's start intact: save that; any later one keeps the last checkpoint
            if lead and before_update:
                _write_checkpoint(ckpt, model, optimizer, scheduler, stf, state, rng)
            raise
        finally:
            bar.close()

    _read_checkpoint(out / "best", model, optimizer, scheduler, stf)
    validation = _lead_only(_validate, model, tokenizer, data, config, stf)
    test = _lead_only(evaluate, model, tokenizer, data.test, spec, config)
    timed = step_times[1:] or step_times
    return TrainResult(
        validation=validation,
        test=test,
        best_step=state["best_step"],
        steps=state["step"],
        seconds=sum(step_times),
        history=state["history"],
        mean_step_seconds=sum(timed) / max(1, len(timed)),
    )


def _hand_over(
    stf: STF, model: nn.Module, config: TrainConfig, total: int, state: dict[str, Any], optimizer=None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """End STF (``Schedule.polish``): compact layers with the support frozen train on from here.

    The new optimizer takes over the moments of every parameter that survives (embeddings,
    norms, the head, untouched linears); the compact factors start theirs. The best-checkpoint
    selection restarts with them, so the run ends in a compact model. On resume, ``state`` is the
    checkpoint's: the compact layers are rebuilt with their layouts (the checkpoint then loads
    their values) and the report of the hand-over is the one it recorded.
    """
    if "stf_report" in state:
        stf.finalize(iters=0)
        stf.report = Report.from_json(state["stf_report"])
    else:
        state["stf_report"] = stf.finalize().to_json()
        state["handover_step"] = state["step"]
        state["best"], state["best_step"] = None, 0
    new, scheduler = _optimizer(model, config, total, offset=state["handover_step"])
    if optimizer is not None:
        for group in new.param_groups:
            for param in group["params"]:
                if param in optimizer.state:
                    new.state[param] = optimizer.state[param]
    return new, scheduler


class _StopRequest:
    """Ctrl-C and SIGTERM during training finish the current step, checkpoint, then stop.

    An interruption in the middle of a step (after the optimizer moved the weights, during a
    re-projection) would leave a checkpoint that does not resume exactly; a second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame) -> None:
        if self.signum:
            raise Interrupted(signum)
        self.signum = signum

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether to stop now; every process stops at the same step (one may have got the signal first)."""
        if world == 1:
            return bool(self.signum)
        flag = torch.tensor([self.signum], dtype=torch.long, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item())
        return bool(self.signum)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _changed_settings(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Settings that differ from a checkpoint's: a field it predates counts as its default; progress never counts."""
    defaults, current = asdict(TrainConfig()), asdict(config)
    return [key for key in current if key != "progress" and saved.get(key, defaults[key]) != current[key]]


def distributed() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _lead_only(work, *args):
    """Run ``work(*args)`` on rank 0 only and hand its result to every process (evaluation, checkpoint writes)."""
    rank, world = distributed()
    if world == 1:
        return work(*args)
    result = [work(*args) if rank == 0 else None]
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def _validate(model, tokenizer, data: TaskData, config: TrainConfig, stf: STF | None) -> dict[str, float]:
    """Validation metrics of the model as it would ship: with STF, the projection itself (λ = 1)."""
    if stf is None:
        return evaluate(model, tokenizer, data.validation, data.spec, config)
    ramps = {name: layer.ramp for name, (layer, _) in stf.layers.items()}
    for layer, _ in stf.layers.values():
        layer.ramp = 1.0
    try:
        return evaluate(model, tokenizer, data.validation, data.spec, config)
    finally:
        for name, (layer, _) in stf.layers.items():
            layer.ramp = ramps[name]
