"""The compression methods, each a way to turn a pretrained model into a trained compact one.

Every method starts from the same checkpoint and uses the same training recipe
(:mod:`dsformer.train`); they differ in the structure and in how it is trained. The recommended
start is the dense model fine-tuned on the task (``dsformer compress --method dense``, then
``--model`` that folder), the usual compression pipeline and the one the published results use.

| method            | structure      | default trainer | what happens before training                     |
|-------------------|----------------|-----------------|--------------------------------------------------|
| ``dense``         | none           | -               | nothing: the fine-tuned reference                 |
| ``svd``           | low rank       | conventional    | truncated SVD of the pretrained weights           |
| ``fwsvd``         | low rank       | conventional    | Fisher-weighted SVD (row importance from task gradients) |
| ``nm``            | N:M            | stf             | magnitude mask, re-selected straight-through (SR-STE style) |
| ``ds-conventional`` | dense-sparse | conventional    | DS fit once; basis and values train, support frozen |
| ``dsformer``      | dense-sparse   | stf             | STF: latent weights, warm-started projections      |
| ``ds-shared``     | dense-sparse   | stf             | as dsformer, one basis shared by all targets of a shape |
| ``distil``        | fewer layers   | -               | every other layer of a fine-tuned teacher, trained with KD |

``trainer="conventional"`` fits once and trains the factors; ``"stf"`` keeps latent dense weights
and trains through the projection, which separates the structure from the training algorithm.
``fisher=True`` weights every fit of ``svd`` (that is ``fwsvd``), ``ds-conventional`` or ``dsformer``
(each STF projection too) by the rows' Fisher information from task gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from dsformer.compress import CompressConfig, _set_module, compress, find_targets, linear_weight
from dsformer.errors import DsformerError
from dsformer.report import Report
from dsformer.stf import STF, Schedule
from dsformer.structures import DenseSparseConfig, LowRankConfig, NMConfig, StructureConfig
from dsformer.structures.base import check_ratio
from dsformer.tasks import TaskData
from dsformer.train import TrainConfig, _batch, encode

METHODS = ("dense", "svd", "fwsvd", "nm", "ds-conventional", "dsformer", "ds-shared", "distil")
FISHER_METHODS = ("svd", "fwsvd", "ds-conventional", "dsformer")  # whose fits take row weights
DEFAULT_TRAINER = {
    "svd": "conventional",
    "fwsvd": "conventional",
    "nm": "stf",
    "ds-conventional": "conventional",
    "dsformer": "stf",
    "ds-shared": "stf",
}


@dataclass
class Prepared:
    """A model ready for training: an STF controller for straight-through methods, a report otherwise."""

    stf: STF | None
    report: Report | None


def structure_for(method: str, ratio: float) -> StructureConfig | None:
    if method not in METHODS:
        raise DsformerError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("dense", "distil"):
        return None
    if method in ("svd", "fwsvd"):
        return LowRankConfig(ratio=ratio)
    if method == "nm":
        return NMConfig(ratio=ratio)
    return DenseSparseConfig(ratio=ratio, share_basis=method == "ds-shared")


def check_method(method: str, ratio: float, trainer: str | None = None, fisher: bool = False) -> str:
    """Everything about a method's options that can be checked without a model; returns its trainer
    (``"-"`` for ``dense`` and ``distil``, which train no structure).

    >>> check_method("svd", 2.0), check_method("nm", 2.8), check_method("dense", 1.0)
    ('conventional', 'stf', '-')
    """
    structure_for(method, ratio)
    if method != "dense":
        check_ratio(ratio)
    if fisher and method not in FISHER_METHODS:
        raise DsformerError(f"--fisher weights the fit of {', '.join(FISHER_METHODS)}; {method} has no such fit")
    if method in ("dense", "distil"):
        if trainer is not None:
            raise DsformerError(f"--trainer applies to compression methods; {method} has no structure to train")
        return "-"
    trainer = trainer or DEFAULT_TRAINER[method]
    if trainer not in ("stf", "conventional"):
        raise DsformerError(f"unknown trainer {trainer!r}; choose stf or conventional")
    if method == "ds-conventional" and trainer == "stf":
        raise DsformerError("ds-conventional is DS trained conventionally; for DS with STF use --method dsformer")
    if method == "dsformer" and trainer == "conventional":
        raise DsformerError(
            "dsformer is DS trained with STF; for DS trained conventionally use --method ds-conventional"
        )
    if trainer == "stf" and method == "fwsvd":
        raise DsformerError("fwsvd weights the SVD fit; with --trainer stf use --method svd --fisher")
    return trainer


def prepare(
    method: str,
    model: nn.Module,
    ratio: float,
    trainer: str | None = None,
    data: TaskData | None = None,
    tokenizer=None,
    train_config: TrainConfig | None = None,
    schedule: Schedule | None = None,
    targets=None,
    progress: bool = True,
    fisher: bool = False,
) -> Prepared:
    """Apply ``method``'s structure to ``model`` in place, ready for :func:`dsformer.train.train`."""
    trainer = check_method(method, ratio, trainer, fisher)
    structure = structure_for(method, ratio)
    if structure is None:
        return Prepared(None, None)
    importance = None
    if fisher or method == "fwsvd":
        if data is None or tokenizer is None:
            raise DsformerError(f"{method} with Fisher weights needs task data to estimate Fisher information")
        importance = fisher_importance(model, tokenizer, data, train_config or TrainConfig(), targets)
    if trainer == "stf":
        return Prepared(STF.wrap(model, structure, targets=targets, schedule=schedule, importance=importance), None)
    report = compress(
        model, CompressConfig(structure, target_modules=targets), importance=importance, progress=progress
    )
    return Prepared(None, report)


def make_student(teacher: nn.Module, ratio: float = 2.0) -> nn.Module:
    """A DistilBERT-style student: a copy of ``teacher`` with ``round(L / ratio)`` of its ``L`` blocks, evenly spaced.

    The blocks are the longest ``nn.ModuleList`` of the model (BERT's ``encoder.layer``,
    GPT-2's ``h``); the config's layer count follows. At 2x a 6-block model keeps blocks 0, 2, 4
    (every other one, as DistilBERT); at 3x it keeps 0 and 3. The block ratio is ``L`` over the
    blocks kept, the nearest a whole number of blocks allows.
    """
    student = copy.deepcopy(teacher)
    lists = [(name, mod) for name, mod in student.named_modules() if isinstance(mod, nn.ModuleList)]
    if not lists:
        raise DsformerError("distil: the model has no list of blocks to thin out")
    name, blocks = max(lists, key=lambda item: len(item[1]))
    count = round(len(blocks) / ratio)
    if not 1 <= count < len(blocks):
        raise DsformerError(
            f"distil: ratio {ratio:g} would keep round({len(blocks)} / {ratio:g}) = {count} of the model's "
            f"{len(blocks)} blocks; a student keeps at least one and fewer than all"
        )
    kept = nn.ModuleList(blocks[round(i * len(blocks) / count)] for i in range(count))
    _set_module(student, name, kept)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(student.config, attr):
            setattr(student.config, attr, len(kept))
    return student


def fisher_importance(
    model: nn.Module, tokenizer, data: TaskData, config: TrainConfig, targets=None, batches: int = 32
) -> dict[str, torch.Tensor]:
    """Row importance of each target weight: squared task-loss gradients summed over inputs (FWSVD)."""
    names = find_targets(model, targets)
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(linear_weight(m).shape[0]) for name, m in modules.items()}
    features = encode(tokenizer, data.train, config.max_length)
    labels = [e.label for e in data.train]
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(config.seed)).tolist()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for b in range(min(batches, max(1, len(order) // config.batch_size))):
        idx = order[b * config.batch_size : (b + 1) * config.batch_size]
        batch = _batch(tokenizer, [features[i] for i in idx], [labels[i] for i in idx], data.spec.is_regression)
        batch = {k: v.to(device) for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, module in modules.items():
            grad = module.weight.grad
            grad = grad if isinstance(module, nn.Linear) else grad.T  # Conv1D stores (in, out)
            sums[name] += grad.detach().float().pow(2).sum(1).cpu()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: value.clamp_min(1e-12) for name, value in sums.items()}
