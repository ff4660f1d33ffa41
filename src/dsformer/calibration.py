"""Data-aware compression: each target layer is fitted to its inputs on calibration data.

:func:`compress_calibrated` walks the model's repeated blocks in order, as GPTQ and SparseGPT do:
it runs the calibration batches up to the first block once, then for each block records the
second moment ``X Xᵀ / tokens`` of every target's inputs, fits and swaps that block's targets,
and runs the compressed block to get the next block's inputs. Only one block's activations are
held at a time, so memory does not grow with depth, and each block sees the errors of the
blocks compressed before it.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from dsformer.calibration import compress_calibrated
    >>> from dsformer.surgery import CompressConfig
    >>> from dsformer.structures import DenseSparseConfig
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
    >>> batches = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(2)]
    >>> report = compress_calibrated(model, CompressConfig(DenseSparseConfig(ratio=2.0, iters=4)), batches,
    ...                              progress=False)
    >>> len(report.layers), all(r.output_error is not None for r in report.layers)
    (14, True)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsformer.allocation import allocate_structures
from dsformer.errors import DsformerError
from dsformer.report import Report, model_bytes
from dsformer.structures import Structure
from dsformer.structures.whitening import DAMPING
from dsformer.surgery import CompressConfig, build, check_plan, fit, layer_report, linear_weight, plan, swap

Batch = Mapping[str, torch.Tensor]


class _Reached(Exception):
    """Raised by the hook on the first block: the embeddings' output is all that the pass was for."""


class InputMoments:
    """Forward hooks that add up ``Xᵀ X`` and the token count of the inputs of named linears.

    Linears fed the same tensor (q, k and v; gate and up) share one sum.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._alias: dict[str, str] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            # the very tensor the previous hook saw (held, so its memory cannot be reused meanwhile)
            if self._last is not None and self._last[0] is x and self._last[1] != name:
                self._alias[name] = self._last[1]
                return
            self._last = (x, name)
            x = x.detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            total = (flat.T @ flat).double()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]

        return record

    def token_count(self, name: str) -> int:
        return self.tokens[self._alias.get(name, name)]

    def moments(self) -> dict[str, torch.Tensor]:
        """Each layer's ``X Xᵀ / tokens`` (fp64)."""
        own = {name: total / max(1, self.tokens[name]) for name, total in self.sums.items()}
        return {**own, **{name: own[owner] for name, owner in self._alias.items()}}

    def remove(self) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: its longest ``nn.ModuleList`` (``model.layers``, ``encoder.layer``, ``h``)."""
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    if not lists:
        raise DsformerError("the model has no list of blocks to calibrate block by block")
    return max(lists, key=lambda item: len(item[1]))


def forward_batches(
    model: nn.Module, batches: Iterable[Batch], stop_at: nn.Module | None = None
) -> list[tuple[tuple, dict]]:
    """Run ``model`` on each batch (for the hooks it carries); with ``stop_at``, stop each pass where that
    module is called and return the positional and keyword arguments it received, per batch."""
    captured: list[tuple[tuple, dict]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Reached

    handle = stop_at.register_forward_pre_hook(catch, with_kwargs=True) if stop_at is not None else None
    device = next(model.parameters()).device
    count = 0
    try:
        for batch in batches:
            count += 1
            try:
                model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False)
            except _Reached:
                pass
    finally:
        if handle is not None:
            handle.remove()
    if not count:
        raise DsformerError("calibration needs at least one batch")
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


class OutputSensitivity:
    """Hooks that add up, per output of named linears, the squared gradient of the loss over tokens
    (the diagonal Fisher of each layer's outputs: how much an error there costs)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: self._add(name, grad))

        return record

    def _add(self, name: str, grad: torch.Tensor) -> None:
        flat = grad.detach().reshape(-1, grad.shape[-1]).double()
        total = flat.pow(2).sum(0)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / max(1, self.tokens[name]) for name, total in self.sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _forward(model: nn.Module, batch: Batch, scored: bool) -> torch.Tensor | None:
    """Run the model once on ``batch``; its loss where it gives one (the batch's own labels or answer
    positions), with ``scored`` a causal LM's next-token loss where the batch has no labels."""
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in batch.items()}
    if scored and "labels" not in inputs and "input_ids" in inputs and getattr(model, "can_generate", lambda: False)():
        mask = inputs.get("attention_mask")
        labels = inputs["input_ids"]
        inputs["labels"] = labels if mask is None else labels.masked_fill(mask == 0, -100)
    return getattr(model(**inputs, use_cache=False), "loss", None)


@contextmanager
def gradients_at_activations(model: nn.Module) -> Iterator[bool]:
    """Within it, a backward pass reaches every activation but fills no parameter's ``.grad`` (no copy of
    the weights' size): the parameters are frozen and the input embeddings' output requires grad
    instead. Yields whether gradients can flow here at all (not in inference mode, embeddings found)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or torch.is_inference_mode_enabled():
        yield False
        return
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    handle = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    try:
        with torch.enable_grad():
            yield True
    finally:
        handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)


def layer_statistics(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Batch], gradients: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Each module's input second moment over ``batches`` (:class:`InputMoments`) and, with ``gradients``
    where the model gives a loss (labels, answer positions, or a causal LM's next tokens), each of its
    outputs' mean squared loss gradient (:class:`OutputSensitivity`; None where none flowed). One
    forward (and backward) pass per batch."""
    moments = InputMoments(modules)
    sensitivity = OutputSensitivity(modules) if gradients else None
    try:
        with gradients_at_activations(model) if gradients else nullcontext(False) as flowing:
            with torch.set_grad_enabled(flowing):
                for batch in batches:
                    loss = _forward(model, batch, flowing)
                    if flowing and loss is not None and loss.requires_grad:
                        loss.backward()
    finally:
        moments.remove()
        if sensitivity is not None:
            sensitivity.remove()
    return moments.moments(), (sensitivity.means() or None) if sensitivity is not None else None


def _global_budget(
    model: nn.Module, config: CompressConfig, structures: dict[str, Structure], batches: list[Batch]
) -> tuple[dict[str, Structure], bool]:
    """Each target's structure at the ratio :func:`dsformer.allocation.allocate` gives it (overrides keep theirs),
    from one pass of the dense model over a quarter of the batches (the estimate ranks layers; it needs
    fewer tokens than a fit): every target's inputs and, where the model has a loss (a causal LM, or
    batches with labels), the loss gradient at its outputs, which weighs each layer's error by its cost;
    the second value says whether it did."""
    sources = {name: model.get_submodule(name) for name in structures}
    moments, sensitivities = layer_statistics(model, sources, batches[: max(1, len(batches) // 4)], gradients=True)
    weights = {name: linear_weight(module).detach() for name, module in sources.items()}
    return allocate_structures(config.structure, structures, weights, moments, sensitivities), bool(sensitivities)


@torch.no_grad()
def compress_calibrated(
    model: nn.Module,
    config: CompressConfig | None,
    batches: Iterable[Batch],
    progress: bool = True,
    global_budget: bool = False,
    moments: dict[str, torch.Tensor] | None = None,
) -> Report:
    """Replace the target linears of ``model`` by compact layers fitted to their calibration inputs, in place.

    ``batches`` are keyword arguments of the model's forward (``input_ids``, ``attention_mask``).
    Every target is planned (checked) before any block is touched; targets outside the repeated
    blocks are not supported here (give them to :func:`dsformer.surgery.compress`).
    ``global_budget``: the structure's ratio holds for all targets together and each layer gets its
    own (:mod:`dsformer.allocation`); per-layer overrides keep theirs. ``moments``, a dict, receives each
    layer's input second moment as its fit saw it (what STF's data-aware projections go on with).
    """
    start = time.perf_counter()
    bytes_before = model_bytes(model)
    config = config or CompressConfig()
    batches = list(batches)
    structures = plan(model, config)
    prefix, blocks = blocks_of(model)
    kinds = set(getattr(getattr(model, "config", None), "layer_types", None) or ())
    if len(kinds) > 1:  # each kind of layer gets its own mask (and RoPE): block 0's arguments would not do
        raise DsformerError(
            f"calibration block by block replays the first block's arguments; this model mixes layer types "
            f"({', '.join(sorted(map(str, kinds)))}) and is not supported yet: compress it without calibration"
        )
    owners = {name: _owner(name, prefix, len(blocks)) for name in structures}
    outside = [name for name, owner in owners.items() if owner is None]
    if outside:
        raise DsformerError(
            f"data-aware fitting calibrates the blocks of {prefix}; {outside[0]} lies outside them: "
            "exclude it, or compress it without calibration"
        )
    was_training = model.training
    model.eval()
    rows, notes = [], []
    bar = tqdm(total=len(structures), desc="calibrated fit", unit="layer", disable=not progress)
    try:
        if global_budget:
            structures, weighed = _global_budget(model, config, structures, batches)
            check_plan(model, structures)
            how = "its output error weighed by the loss gradient" if weighed else "its share of output energy (no loss)"
            notes.append(f"a global budget: each layer's ratio chosen by {how}")
        inputs = forward_batches(model, batches, stop_at=blocks[0])
        last = max(owners.values())  # blocks after the last one with targets need no inputs
        for index, block in enumerate(blocks):
            if index > last:
                break
            names = [name for name, owner in owners.items() if owner == index]
            if names:
                sources = {name: model.get_submodule(name) for name in names}
                recorder = InputMoments(sources)
                try:
                    _run_block(block, inputs)
                finally:
                    recorder.remove()
                grams = recorder.moments()
                if moments is not None:
                    moments.update(grams)
                weights = {name: linear_weight(module).detach() for name, module in sources.items()}
                notes += [
                    f"{name}: {recorder.token_count(name)} calibration tokens for {weights[name].shape[1]} inputs; "
                    f"X Xᵀ is singular and was damped ({DAMPING:g} of its mean diagonal): give more --samples"
                    for name in names
                    if recorder.token_count(name) < weights[name].shape[1]
                ]
                chosen = {name: structures[name] for name in names}
                layers = build(fit(weights, chosen, inputs=grams), chosen, sources)
                swap(model, layers)
                rows += [layer_report(name, weights[name], layers[name], grams[name]) for name in names]
                bar.update(len(names))
            if index < last:
                outputs = _run_block(block, inputs)
                for layer in layers.values() if names else ():
                    layer.drop_cached()  # a cached dense coefficient matrix per layer would grow with depth
                inputs = [_with_hidden(args, kwargs, out) for (args, kwargs), out in zip(inputs, outputs, strict=True)]
    finally:  # a failed fit leaves the model as it was asked to be (mode), the bar closed
        bar.close()
        model.train(was_training)
    return Report(rows, time.perf_counter() - start, bytes_before, model_bytes(model), notes)


def _owner(name: str, prefix: str, count: int) -> int | None:
    """The index of the block that holds module ``name``, or None."""
    head = f"{prefix}." if prefix else ""
    if not name.startswith(head):
        return None
    first = name[len(head) :].split(".", 1)[0]
    return int(first) if first.isdigit() and int(first) < count else None
