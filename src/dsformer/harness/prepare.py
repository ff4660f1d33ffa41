"""Apply a method (:mod:`dsformer.harness.methods`) to a model: its structure, by STF or fitted once;
the DistilBERT-style student; Fisher information for the weighted fits.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from dsformer.harness.prepare import prepare
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> prepare("dsformer", model, ratio=2.0).stf is not None
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsformer.allocation import allocate_structures
from dsformer.calibration import blocks_of, layer_statistics
from dsformer.errors import DsformerError
from dsformer.harness.evaluation import encode
from dsformer.harness.methods import check_method, method
from dsformer.harness.squad import STRIDE
from dsformer.harness.tasks import TaskData
from dsformer.report import Report
from dsformer.stf import STF, Schedule
from dsformer.structures import Structure, structure_config
from dsformer.surgery import CompressConfig, compress, find_targets, linear_weight, out_in, plan


@dataclass
class Prepared:
    """A model ready for training: an STF controller for straight-through methods, a report otherwise."""

    stf: STF | None
    report: Report | None


def structure_for(name: str, ratio: float) -> Structure | None:
    """The structure config a method applies at ``ratio`` (None for ``dense`` and ``distil``)."""
    chosen = method(name)
    return None if chosen.structure is None else structure_config(chosen.structure, ratio=ratio, **chosen.options)


def prepare(
    name: str,
    model: nn.Module,
    ratio: float,
    trainer: str | None = None,
    data: TaskData | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    schedule: Schedule | None = None,
    stride: int = STRIDE,
    targets: Any = None,
    progress: bool = True,
    fisher: bool = False,
    calibrate: bool = False,
    global_budget: bool = False,
) -> Prepared:
    """Apply method ``name``'s structure to ``model`` in place, ready for :func:`dsformer.harness.training.train`.

    Fisher weights (``fisher``, or a method that always uses them) need ``data`` and ``tokenizer``:
    ``batch_size``, ``max_length``, ``seed`` (and for question answering ``stride``) say how its batches
    are drawn. ``calibrate`` (with ``data`` and ``tokenizer`` too) fits every layer's output on the
    training inputs instead of its weight, in the first fit and in every STF projection.
    ``global_budget`` (with ``data`` and ``tokenizer``) makes ``ratio`` the ratio of all targets
    together and gives each layer its own, chosen from its weight and its inputs on the training
    texts (:mod:`dsformer.allocation`).
    """
    trainer = check_method(name, ratio, trainer, fisher)
    structure = structure_for(name, ratio)
    if structure is None:
        return Prepared(None, None)
    importance = None
    if fisher or method(name).fisher == "always":
        if data is None or tokenizer is None:
            raise DsformerError(f"{name} with Fisher weights needs task data to estimate Fisher information")
        importance = fisher_importance(model, tokenizer, data, max_length, batch_size, seed, targets, stride=stride)
    moments = sensitivities = None
    if calibrate or global_budget:
        if data is None or tokenizer is None:
            what = "fitted to its inputs" if calibrate else "with a global budget"
            raise DsformerError(f"{name} {what} needs task data to run the model on")
        moments, sensitivities = task_statistics(
            model, tokenizer, data, max_length, batch_size, seed, targets, stride=stride, gradients=global_budget
        )
    config = CompressConfig(structure, target_modules=targets)
    if global_budget:
        structures = plan(model, config)
        weights = {layer: linear_weight(model.get_submodule(layer)).detach() for layer in structures}
        config.overrides = allocate_structures(structure, structures, weights, moments, sensitivities)
    inputs = moments if calibrate else None
    if trainer == "stf":
        stf = STF.wrap(
            model, structure, targets=targets, schedule=schedule, importance=importance, overrides=config.overrides,
            inputs=inputs,
        )  # fmt: skip
        return Prepared(stf, None)
    return Prepared(None, compress(model, config, importance=importance, progress=progress, inputs=inputs))


def make_student(teacher: nn.Module, ratio: float = 2.0) -> nn.Module:
    """A DistilBERT-style student: a copy of ``teacher`` with ``round(L / ratio)`` of its ``L`` blocks, evenly spaced.

    The blocks are the longest ``nn.ModuleList`` of the model (BERT's ``encoder.layer``,
    GPT-2's ``h``); the config's layer count follows. At 2x a 6-block model keeps blocks 0, 2, 4
    (every other one, as DistilBERT); at 3x it keeps 0 and 3. The block ratio is ``L`` over the
    blocks kept, the nearest a whole number of blocks allows.
    """
    student = copy.deepcopy(teacher)
    try:
        name, blocks = blocks_of(student)
    except DsformerError:
        raise DsformerError("distil: the model has no list of blocks to thin out") from None
    count = round(len(blocks) / ratio)
    if not 1 <= count < len(blocks):
        raise DsformerError(
            f"distil: ratio {ratio:g} would keep round({len(blocks)} / {ratio:g}) = {count} of the model's "
            f"{len(blocks)} blocks; a student keeps at least one and fewer than all"
        )
    student.set_submodule(name, nn.ModuleList(blocks[round(i * len(blocks) / count)] for i in range(count)))
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(student.config, attr):
            setattr(student.config, attr, count)
    return student


def _training_batches(
    model: nn.Module, tokenizer: Any, data: TaskData, max_length: int, batch_size: int, seed: int, batches: int,
    stride: int = STRIDE,
) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """Seeded, padded batches of the training examples (labels included), on the model's device."""
    features = encode(tokenizer, data.train, max_length, data.spec, stride)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    device = next(model.parameters()).device
    for b in range(min(batches, max(1, len(order) // batch_size))):
        batch = tokenizer.pad([features[i] for i in order[b * batch_size : (b + 1) * batch_size]], return_tensors="pt")
        yield {k: v.to(device) for k, v in batch.items()}


def task_statistics(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    max_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    targets: Any = None,
    batches: int = 32,
    stride: int = STRIDE,
    gradients: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Each target's input second moment on seeded batches of the training texts (padding positions
    included) and, with ``gradients``, each of its outputs' mean squared task-loss gradient (what the
    global budget weighs errors by; :class:`dsformer.calibration.OutputSensitivity`)."""
    names = find_targets(model, targets)
    was_training = model.training
    model.eval()
    try:
        batched = _training_batches(model, tokenizer, data, max_length, batch_size, seed, batches, stride)
        return layer_statistics(model, {name: model.get_submodule(name) for name in names}, batched, gradients)
    finally:
        model.train(was_training)


def fisher_importance(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    max_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    targets: Any = None,
    batches: int = 32,
    stride: int = STRIDE,
) -> dict[str, torch.Tensor]:
    """Row importance of each target weight: squared task-loss gradients summed over inputs (FWSVD)."""
    names = find_targets(model, targets)
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(linear_weight(m).shape[0]) for name, m in modules.items()}
    was_training = model.training
    model.eval()
    for batch in _training_batches(model, tokenizer, data, max_length, batch_size, seed, batches, stride):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, module in modules.items():
            sums[name] += out_in(module, module.weight.grad).detach().float().pow(2).sum(1).cpu()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: value.clamp_min(1e-12) for name, value in sums.items()}
