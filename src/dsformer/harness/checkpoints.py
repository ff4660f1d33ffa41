"""The Trainer's checkpoints as a run uses them: the newest complete one, checked whole before it is
resumed into a model; the run's settings, refused when they change; and stopping at a step's end
(Ctrl-C, SIGTERM, or a step asked for) with a checkpoint.
"""

from __future__ import annotations

import json
import pickle
import re
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals

from dsformer.callbacks import ends_epoch
from dsformer.errors import DsformerError, Interrupted
from dsformer.report import Report

STATE_FILE = "trainer_state.json"  # the Trainer's, in every checkpoint folder
SETTINGS_FILE = "training.json"  # the run's settings, checked on resume
HANDOVER_FILE = "handover.json"  # the report of STF's hand-over to the compact factors (Schedule.polish)


class TrainingError(DsformerError, RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that does not fit the run)."""


def distributed() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (the Trainer writes ``trainer_state.json`` last)."""
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    complete = [p for p in found if (p / STATE_FILE).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def check_settings(out: Path, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse to resume into other training settings or another STF schedule (a field the record predates
    counts as its default)."""
    try:
        saved = json.loads((out / SETTINGS_FILE).read_text())
        changed = [k for k, v in settings["config"].items() if saved["config"].get(k, defaults[k]) != v]
        if settings["schedule"] is not None or saved.get("schedule") is not None:
            mine, theirs = settings["schedule"] or {}, saved.get("schedule") or {}
            changed += [f"schedule.{k}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise TrainingError(f"checkpoint in {out} cannot be resumed into this run ({reason})") from None
    if changed:
        raise TrainingError(
            f"--resume: {out} was written with other settings ({', '.join(changed)}); "
            "use the same ones or a new --output"
        )


def read_handover_report(out: Path) -> Report:
    try:
        return Report.from_json(json.loads((out / HANDOVER_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingError(f"{out / HANDOVER_FILE} cannot be read ({type(err).__name__}: {err})") from None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def holds_stf(checkpoint: Path) -> bool:
    """Whether a checkpoint was written before STF's hand-over (its model has STF layers' projections)."""
    try:
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            return any(key.endswith(".projected") for key in f.keys())
    except (OSError, SafetensorError) as err:
        raise TrainingError(
            f"checkpoint {checkpoint} cannot be resumed into this run ({type(err).__name__}: {err})"
        ) from None


class Checkpoints(TrainerCallback):
    """Checkpoints every ``every`` steps besides the epoch ends; a stop request (Ctrl-C, SIGTERM) or the step
    ``stop_at`` ends training after the step with a checkpoint (and no evaluation, unless an epoch ends)."""

    def __init__(self, every: int, stop: StopRequest | None, stop_at: int | None) -> None:
        self.every, self.stop, self.stop_at = every, stop, stop_at
        self.stopping = False

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = (self.stop is not None and self.stop.agreed(args.device)) or state.global_step == self.stop_at
        if self.stopping:
            control.should_training_stop = True
            control.should_save = True
        elif self.every and state.global_step % self.every == 0:
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopping and not ends_epoch(state):  # the Trainer ends an epoch it leaves early: not a real end
            control.should_evaluate = control.should_save = False  # the step's checkpoint is written


def check_checkpoint(checkpoint: Path, model: nn.Module) -> None:
    """Read every file of a checkpoint before the Trainer loads it, so a damaged or foreign one is one clear
    error rather than a failure part-way through loading."""
    try:
        json.loads((checkpoint / STATE_FILE).read_text())
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
        differ = [k for k in stored if stored[k] != expected.get(k)] + sorted(
            set(expected) - set(stored) - _tied(model)
        )
        if differ:
            raise KeyError(f"its model does not match this one (at {differ[0]!r})")
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.load(checkpoint / name, weights_only=True)
        with safe_globals():  # the Trainer's own allowance: numpy's generator state
            for rng in checkpoint.glob("rng_state*.pth"):
                torch.load(rng, weights_only=True)
        if not any(checkpoint.glob("rng_state*.pth")):
            raise FileNotFoundError("it holds no generator state")
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
        raise TrainingError(
            f"checkpoint {checkpoint} cannot be resumed into this run ({type(err).__name__}: {err})"
        ) from None


def _tied(model: nn.Module) -> set[str]:
    """State keys whose tensor another key shares (a checkpoint stores tied weights once, under either)."""
    state = model.state_dict()
    counts: dict[int, int] = {}
    for tensor in state.values():
        counts[tensor.data_ptr()] = counts.get(tensor.data_ptr(), 0) + 1
    return {key for key, tensor in state.items() if counts[tensor.data_ptr()] > 1}


class StopRequest:
    """Ctrl-C and SIGTERM during training finish the current step, checkpoint, then stop.

    An interruption in the middle of a step (after the optimizer moved the weights, during a
    re-projection) would leave a checkpoint that does not resume exactly; a second Ctrl-C stops at
    once (the last checkpoint stays).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame) -> None:
        if self.signum:
            raise Interrupted(signum)
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """Whether to stop now; every process stops at the same step (one may have got the signal first)."""
        if distributed()[1] > 1:
            flag = torch.tensor([self.signum], dtype=torch.long, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item())
        return bool(self.signum)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
