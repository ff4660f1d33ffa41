"""The compression methods: one registry that the command line, sweeps, reports and tests all read.

Every method starts from the same checkpoint and uses the same training recipe
(:mod:`dsformer.harness.training`); they differ in the structure and in how it is trained. The
recommended start is the dense model fine-tuned on the task (``dsformer finetune --method dense``,
then ``--model`` that folder), the usual compression pipeline and the one the published results use.
``trainer="conventional"`` fits once and trains the factors; ``"stf"`` keeps latent dense weights
and trains through the projection, which separates the structure from the training algorithm.
``fisher=True`` weights every fit of a method that allows it (each STF projection too) by the
rows' Fisher information from task gradients; ``fwsvd`` is ``svd`` with it always on.

This module imports no PyTorch: the command line builds its choices and help from it.

Example:
    >>> from dsformer.harness.methods import METHODS, check_method
    >>> METHODS["dsformer"].structure, METHODS["dsformer"].ours, METHODS["fwsvd"].family
    ('ds', True, 'low rank')
    >>> check_method("svd", 2.0), check_method("nm", 2.8), check_method("dense", 1.0)
    ('conventional', 'stf', '-')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dsformer.errors import DsformerError, InfeasibleRatioError

TRAINERS = ("stf", "conventional")


@dataclass(frozen=True)
class Method:
    """One way to turn a fine-tuned model into a compact one.

    ``structure``: the registered structure it applies (None: ``dense`` and ``distil`` apply none);
    ``trainers``: the trainers it allows, its default first; ``options``: the structure config's
    options beyond the ratio; ``fisher``: whether Fisher weights may (``"allowed"``) or must
    (``"always"``) weight its fit; ``ours``: DSFormer or a variant of it, never a baseline to beat;
    ``family``: what reports group it with; ``calibrated``: whether its fits minimize each layer's output
    error on the training inputs by default (``--no-calibrate``: the weight error).
    """

    name: str
    summary: str
    structure: str | None = None
    trainers: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    fisher: str = "never"
    ours: bool = False
    family: str = ""
    calibrated: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dense", "nothing: the fine-tuned reference"),
        Method(
            "svd", "truncated SVD of the weights", "svd", ("conventional", "stf"), fisher="allowed", family="low rank"
        ),  # fmt: skip
        Method("fwsvd", "Fisher-weighted SVD (FWSVD)", "svd", ("conventional",), fisher="always", family="low rank"),
        Method("nm", "N:M magnitude mask, re-selected straight-through (SR-STE)", "nm", ("stf", "conventional")),
        Method(
            "ds-conventional",
            "DS fit once; basis and values train, support frozen",
            "ds",
            ("conventional",),
            fisher="allowed",
            family="dense-sparse",
        ),  # fmt: skip
        # fitted to the layers' outputs by default: on MiniLM it held STS-B at the dense figure where the weight
        # fit collapsed, and MR within seed noise (docs/results.md)
        Method(
            "dsformer",
            "DSFormer: DS trained with STF, every projection fitted to the layer's outputs",
            "ds",
            ("stf",),
            fisher="allowed",
            ours=True,
            family="dense-sparse",
            calibrated=True,
        ),  # fmt: skip
        Method(
            "ds-shared",
            "DSFormer with one basis shared by all targets of a shape",
            "ds",
            ("stf",),
            {"share_basis": True},
            ours=True,
            family="dense-sparse",
        ),  # fmt: skip
        Method("distil", "every other block of a fine-tuned teacher, trained with KD (DistilBERT)"),
    )
}
COMPRESSION = tuple(name for name in METHODS if name != "dense")


@dataclass(frozen=True)
class PostTraining:
    """A training-free compression of a pretrained model (decoder LMs): a structure, fitted to the weights
    or, ``calibrated``, to each layer's inputs on calibration text (:mod:`dsformer.calibration`)."""

    name: str
    summary: str
    structure: str | None
    calibrated: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    ours: bool = False
    global_budget: bool = False  # one ratio for all targets, each layer's chosen (dsformer.allocation)


POST_TRAINING: dict[str, PostTraining] = {
    m.name: m
    for m in (
        PostTraining("dense", "the pretrained model", None),
        PostTraining("svd", "truncated SVD of the weights", "svd"),
        PostTraining("svd-llm", "SVD of the whitened weights, truncation-aware (SVD-LLM)", "svd", True),
        PostTraining("nm", "N:M by magnitude (2:4 at 2x)", "nm"),
        PostTraining("wanda-nm", "N:M by |W_ij| ||X_j|| (Wanda)", "nm", True),
        PostTraining("ds", "dense-sparse fit of the weights", "ds", ours=True),
        PostTraining(
            "ds-aware", "dense-sparse fit of each layer's output on calibration inputs", "ds", True, ours=True
        ),  # fmt: skip
        PostTraining(
            "ds-aware-bytes",
            "ds-aware with the ratio counted in stored bytes (indices included)",
            "ds",
            True,
            {"budget": "bytes"},
            ours=True,
        ),  # fmt: skip
        PostTraining(
            "ds-aware-global",
            "ds-aware-bytes with one budget for all targets, each layer's ratio chosen",
            "ds",
            True,
            {"budget": "bytes"},
            ours=True,
            global_budget=True,
        ),
        PostTraining(
            "svd-llm-global",
            "svd-llm with one budget for all targets, each layer's ratio chosen",
            "svd",
            True,
            global_budget=True,
        ),
    )
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise DsformerError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def check_method(name: str, ratio: float, trainer: str | None = None, fisher: bool = False) -> str:
    """Everything about a method's options that can be checked without a model; returns its trainer
    (``"-"`` for ``dense`` and ``distil``, which train no structure)."""
    chosen = method(name)
    if name != "dense" and (not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 1.0):
        raise InfeasibleRatioError(f"compression ratio must be a finite number > 1 (got {ratio!r})")
    if fisher and chosen.fisher == "never":
        allowed = ", ".join(m.name for m in METHODS.values() if m.fisher == "allowed")
        raise DsformerError(f"--fisher weights the fit of {allowed}; {name} has no such fit")
    if not chosen.trainers:
        if trainer is not None:
            raise DsformerError(f"--trainer applies to compression methods; {name} has no structure to train")
        return "-"
    if trainer is None:
        return chosen.trainers[0]
    if trainer not in TRAINERS:
        raise DsformerError(f"unknown trainer {trainer!r}; choose {' or '.join(TRAINERS)}")
    if trainer not in chosen.trainers:
        others = [m.name for m in METHODS.values() if m.structure == chosen.structure and trainer in m.trainers]
        fisher_too = " --fisher" if chosen.fisher == "always" else ""
        hint = f"; with --trainer {trainer} use --method {others[0]}{fisher_too}" if others else ""
        raise DsformerError(f"{name} trains with {' or '.join(chosen.trainers)} only{hint}")
    return trainer
