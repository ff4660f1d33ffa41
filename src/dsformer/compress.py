"""Model surgery: find the target linears of any model, fit a structure to each, swap them in place.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from dsformer import CompressConfig, compress
    >>> from dsformer.structures import LowRankConfig
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> report = compress(model, CompressConfig(LowRankConfig(ratio=2.0)), progress=False)
    >>> len(report.layers), report.ratio_params >= 2.0
    (12, True)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsformer.errors import TargetError
from dsformer.report import LayerReport, Report, model_bytes
from dsformer.structures import CompactLinear, DenseSparseConfig, StructureConfig, compact_layer
from dsformer.structures.dense_sparse import share_bases

try:  # GPT-2 style models use a transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep surgery usable without it
    Conv1D = ()  # type: ignore[assignment,misc]

Patterns = str | Iterable[str] | None


@dataclass
class CompressConfig:
    """What to compress and how.

    ``target_modules``: ``None`` (every linear inside the model's repeated blocks: attention and
    MLP of each layer, not embeddings, pooler or task head), ``"all-linear"`` (every linear but
    the output embeddings), or a list of module names, name suffixes (``"query"``) and
    ``re:`` regular expressions (full match). ``exclude_modules`` uses the same forms.
    ``overrides`` maps the same forms to a structure config for the layers they match (first
    match wins); every other target gets ``structure``.
    """

    structure: StructureConfig = field(default_factory=DenseSparseConfig)
    target_modules: Patterns = None
    exclude_modules: Patterns = None
    overrides: dict[str, StructureConfig] = field(default_factory=dict)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer (``Conv1D`` stores it transposed)."""
    return module.weight.T if not isinstance(module, nn.Linear) else module.weight


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def matches(name: str, pattern: str) -> bool:
    """Whether a module name matches a name, a ``.``-suffix, or a ``re:`` full-match pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _block_linears(model: nn.Module) -> list[str]:
    """Names of linears that sit inside an element of a ``ModuleList`` (the transformer blocks)."""
    prefixes = [
        f"{name}.{i}." for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) for i in range(len(mod))
    ]
    return [
        name
        for name, mod in model.named_modules()
        if is_linear(mod) and any(name.startswith(prefix) for prefix in prefixes)
    ]


def find_targets(model: nn.Module, target_modules: Patterns = None, exclude_modules: Patterns = None) -> list[str]:
    """Resolve target and exclusion patterns to module names; any pattern that matches nothing is an error."""
    modules = dict(model.named_modules())
    linears = [name for name, mod in modules.items() if is_linear(mod)]
    if target_modules is None:
        targets = _block_linears(model)
        if not targets:
            raise TargetError(
                "found no linear layers inside repeated blocks of this model; "
                "name the layers with target_modules (--targets), e.g. 're:.*dense'"
            )
    elif target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [name for name in linears if modules[name] is not head]
    else:
        targets = []
        for pattern in _as_list(target_modules):
            hits = [name for name in modules if name and matches(name, pattern)]
            if not hits:
                raise TargetError(f"target {pattern!r} matches no module; linear layers include: {_examples(linears)}")
            # a pattern may also match containers (attention, a whole block): take the linears among its hits
            hits_linear = [name for name in hits if is_linear(modules[name])]
            if not hits_linear:
                kind = type(modules[hits[0]]).__name__
                raise TargetError(
                    f"target {pattern!r} matches {hits[0]!r}, a {kind}, not a linear layer (nor any linear); "
                    f"linear layers include: {_examples(linears)}"
                )
            targets += [name for name in hits_linear if name not in targets]
    for pattern in _as_list(exclude_modules):
        if not any(matches(name, pattern) for name in modules if name):
            raise TargetError(f"exclusion {pattern!r} matches no module; linear layers include: {_examples(linears)}")
        targets = [name for name in targets if not matches(name, pattern)]
    if not targets:
        raise TargetError("no target layers are left to compress; check target_modules and exclude_modules")
    return targets


def _examples(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def plan(model: nn.Module, config: CompressConfig) -> dict[str, StructureConfig]:
    """Each target layer's structure config, checked to be feasible for its shape (nothing is changed)."""
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    for pattern in config.overrides:
        if not any(matches(name, pattern) for name in targets):
            raise TargetError(f"override {pattern!r} matches no target layer; targets include: {_examples(targets)}")
    chosen = {}
    for name in targets:
        structure = next((cfg for pat, cfg in config.overrides.items() if matches(name, pat)), config.structure)
        out_features, in_features = linear_weight(model.get_submodule(name)).shape
        try:
            structure.candidates(out_features, in_features)
        except ValueError as err:
            raise type(err)(f"layer {name}: {err}") from None
        chosen[name] = structure
    return chosen


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    importance: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> Report:
    """Replace the target linears of ``model`` by compact layers, in place, and report per layer.

    Every layer is checked before any is replaced, so a bad config leaves the model untouched.
    ``importance`` maps layer names to per-output-row weights for structures that use them (FWSVD,
    Fisher-weighted DS).
    """
    config = config or CompressConfig()
    start = time.perf_counter()
    bytes_before = model_bytes(model)
    chosen = plan(model, config)
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, structure in chosen.items():
        shape = tuple(linear_weight(model.get_submodule(name)).shape)
        groups.setdefault((id(structure), shape), []).append(name)

    layers: list[LayerReport] = []
    bar = tqdm(total=len(chosen), desc="factorizing", unit="layer", disable=not progress)
    for (_, shape), names in groups.items():
        structure = chosen[names[0]]
        bar.set_postfix_str(f"{structure.name} {len(names)}x{shape[0]}x{shape[1]}")
        modules = [model.get_submodule(name) for name in names]
        weights = [linear_weight(mod) for mod in modules]
        options: dict[str, Any] = {}
        if importance is not None and structure.name in ("svd", "ds"):
            options["importance"] = [importance.get(name) for name in names]
        with torch.no_grad():
            fitted = structure.fit(weights, **options)
            built = []
            for mod, w, factors in zip(modules, weights, fitted, strict=True):
                layer = compact_layer(structure, factors, mod.bias).to(device=w.device)
                layer.source_kind = "linear" if isinstance(mod, nn.Linear) else "conv1d"
                built.append(layer)
            if getattr(structure, "share_basis", False):
                share_bases(built)
            for name, w, layer in zip(names, weights, built, strict=True):
                _set_module(model, name, layer)
                layers.append(layer_report(name, w, layer))
        bar.update(len(names))
    bar.close()
    order = list(chosen)
    layers.sort(key=lambda r: order.index(r.name))
    return Report(layers, time.perf_counter() - start, bytes_before, model_bytes(model))


def layer_report(name: str, weight: torch.Tensor, layer: CompactLinear) -> LayerReport:
    """One report row: how well the compact layer reproduces the dense ``(out, in)`` weight, at what size."""
    error = (layer.materialize().float() - weight.float()).norm() / weight.float().norm().clamp_min(1e-30)
    return LayerReport(
        name=name,
        shape=(layer.out_features, layer.in_features),
        structure=layer.structure,
        layout=layer.describe(),
        params=layer.value_params(),
        dense_params=weight.numel(),
        bytes=layer.weight_bytes(),
        dense_bytes=weight.numel() * weight.element_size(),
        rel_error=float(error),
    )


def compact_layers(model: nn.Module) -> dict[str, CompactLinear]:
    """The compact layers of a model, by name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, CompactLinear)}


def merge(model: nn.Module) -> nn.Module:
    """Replace every compact layer by the plain linear it computes (``Conv1D`` where it came from one)."""
    from dsformer.kernels import unfuse_activations

    unfuse_activations(model)  # a fused activation goes back to the module it came from
    for name, layer in compact_layers(model).items():
        dense = layer.merge()
        if layer.source_kind == "conv1d":
            conv = Conv1D(layer.out_features, layer.in_features).to(dense.weight)
            with torch.no_grad():
                conv.weight.copy_(dense.weight.T)
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
                else:
                    conv.bias.zero_()
            dense = conv
        _set_module(model, name, dense)
    return model
