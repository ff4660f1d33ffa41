"""Model surgery: find the target linears of any model, fit a structure to each, swap compact layers in.

Every replacement of layers in dsformer goes through here: :func:`compress` (find, plan, fit,
build, swap, report), STF's wrap and finalize (:mod:`dsformer.stf`), :func:`merge` back to dense.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from dsformer.surgery import CompressConfig, compress
    >>> from dsformer.structures import LowRankConfig
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> report = compress(model, CompressConfig(LowRankConfig(ratio=2.0)), progress=False)
    >>> len(report.layers), report.ratio_params >= 2.0
    (12, True)
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from dsformer.errors import InfeasibleRatioError, TargetError
from dsformer.report import LayerReport, Report, model_bytes
from dsformer.structures import CompactLinear, DenseSparseConfig, Factors, Structure
from dsformer.structures.whitening import output_error

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

    structure: Structure = field(default_factory=DenseSparseConfig)
    target_modules: Patterns = None
    exclude_modules: Patterns = None
    overrides: dict[str, Structure] = field(default_factory=dict)


def _conv1d() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's transposed linear) where transformers is loaded; a model can hold
    one only then, so surgery never imports transformers itself."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module``'s weight (or its gradient), as ``(out, in)``: ``Conv1D`` stores it transposed."""
    return tensor.T if _is_conv1d(module) else tensor


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer."""
    return out_in(module, module.weight)


def source_kind(module: nn.Module) -> str:
    """What a compact layer replaces: ``"conv1d"`` or ``"linear"`` (a module that already says, as STF's do)."""
    return getattr(module, "source_kind", "conv1d" if _is_conv1d(module) else "linear")


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
    for pattern in _as_list(target_modules if target_modules != "all-linear" else None) + _as_list(exclude_modules):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise TargetError(f"pattern {pattern!r} is not a regular expression ({err})") from None
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


def plan(model: nn.Module, config: CompressConfig) -> dict[str, Structure]:
    """Each target layer's structure config, checked to be feasible for its shape (nothing is changed)."""
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    for pattern in config.overrides:
        if not any(matches(name, pattern) for name in targets):
            raise TargetError(f"override {pattern!r} matches no target layer; targets include: {_examples(targets)}")
    chosen = {}
    for name in targets:
        chosen[name] = next((cfg for pat, cfg in config.overrides.items() if matches(name, pat)), config.structure)
    check_plan(model, chosen)
    return chosen


def check_plan(model: nn.Module, structures: dict[str, Structure]) -> None:
    """Refuse a plan where some layer's structure has no layout for its shape, or stores no fewer bytes than dense."""
    for name, structure in structures.items():
        weight = linear_weight(model.get_submodule(name))
        try:
            layouts = structure.candidates(*weight.shape)
        except ValueError as err:
            raise type(err)(f"layer {name}: {err}") from None
        if min(lay.stored_bytes(weight.element_size()) for lay in layouts) >= weight.numel() * weight.element_size():
            raise InfeasibleRatioError(
                f"layer {name}: {structure.name} at this ratio stores more bytes than the dense weight (its indices "
                "count too); give a larger ratio"
            )


def fit_groups(weights: dict[str, torch.Tensor], structures: dict[str, Structure]) -> list[list[str]]:
    """Layers fitted together: those with one structure config and one weight shape (a fit batches them;
    with a shared basis they share one)."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, structure in structures.items():
        groups.setdefault((id(structure), tuple(weights[name].shape)), []).append(name)
    return list(groups.values())


def fit(
    weights: dict[str, torch.Tensor],
    structures: dict[str, Structure],
    importance: dict[str, torch.Tensor] | None = None,
    warm: dict[str, Factors] | None = None,
    progress: bool = False,
    inputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, Factors]:
    """Fit each named ``(out, in)`` weight with its structure, group by group (see :func:`fit_groups`).

    ``importance``: per-output-row weights by name; ``inputs``: each layer's input second moment
    (a data-aware fit, see :mod:`dsformer.calibration`)."""
    fitted: dict[str, Factors] = {}
    bar = tqdm(total=len(weights), desc="factorizing", unit="layer", disable=not progress)
    with torch.no_grad():
        for names in fit_groups(weights, structures):
            structure, shape = structures[names[0]], tuple(weights[names[0]].shape)
            bar.set_postfix_str(f"{structure.name} {len(names)}x{shape[0]}x{shape[1]}")
            factors = structure.fit(
                [weights[name] for name in names],
                warm=None if warm is None else [warm[name] for name in names],
                importance=None if not importance else [importance.get(name) for name in names],
                inputs=None if not inputs else [inputs.get(name) for name in names],
            )
            fitted.update(zip(names, factors, strict=True))
            bar.update(len(names))
    bar.close()
    return fitted


def build(
    factors: dict[str, Factors], structures: dict[str, Structure], sources: dict[str, nn.Module]
) -> dict[str, CompactLinear]:
    """The compact layers holding ``factors``, each with its source linear's bias, device and kind; the layers
    of one fit group are tied as their structure says (a shared basis)."""
    layers = {}
    for name, module in sources.items():
        weight = linear_weight(module)
        layer = structures[name].layer(factors[name], module.bias).to(weight.device)
        layer.source_kind = source_kind(module)
        layers[name] = layer
    shapes = {name: linear_weight(module) for name, module in sources.items()}
    for names in fit_groups(shapes, structures):
        structures[names[0]].tie([layers[name] for name in names])
    return layers


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its name in ``model``, in place."""
    for name, module in modules.items():
        model.set_submodule(name, module)


@torch.no_grad()
def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    importance: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    inputs: dict[str, torch.Tensor] | None = None,
) -> Report:
    """Replace the target linears of ``model`` by compact layers, in place, and report per layer.

    Every layer is checked before any is replaced, so a bad config leaves the model untouched.
    ``importance`` maps layer names to per-output-row weights (Fisher information: FWSVD,
    Fisher-weighted DS); ``inputs`` maps them to their inputs' second moments (data-aware fits;
    :func:`dsformer.calibration.compress_calibrated` gathers them block by block).
    """
    start = time.perf_counter()
    bytes_before = model_bytes(model)
    structures = plan(model, config or CompressConfig())
    sources = {name: model.get_submodule(name) for name in structures}
    weights = {name: linear_weight(module) for name, module in sources.items()}
    layers = build(fit(weights, structures, importance, progress=progress, inputs=inputs), structures, sources)
    swap(model, layers)
    rows = [layer_report(name, weights[name], layer, (inputs or {}).get(name)) for name, layer in layers.items()]
    return Report(rows, time.perf_counter() - start, bytes_before, model_bytes(model))


def layer_report(
    name: str, weight: torch.Tensor, layer: CompactLinear, gram: torch.Tensor | None = None
) -> LayerReport:
    """One report row: how well the compact layer reproduces the dense ``(out, in)`` weight (and its
    output on the calibration inputs, given their second moment ``gram``), at what size."""
    approx = layer.materialize()
    return LayerReport(
        name=name,
        shape=(layer.out_features, layer.in_features),
        structure=layer.structure,
        layout=layer.describe(),
        params=layer.value_params(),
        dense_params=weight.numel(),
        bytes=layer.weight_bytes(),
        dense_bytes=weight.numel() * weight.element_size(),
        rel_error=output_error(weight, approx, None),
        output_error=None if gram is None else output_error(weight, approx, gram),
    )


def compact_layers(model: nn.Module) -> dict[str, CompactLinear]:
    """The compact layers of a model, by name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, CompactLinear)}


def fuse_activations(model: nn.Module) -> int:
    """Move the exact GELU after each compact up-projection into the layer; returns how many moved.

    A module with a compact ``dense`` layer followed by ``intermediate_act_fn`` (BERT, MPNet and
    their kin) gets ``dense.activation = "gelu"`` and an identity in place of the activation, so
    a backend that can (DS's gather kernel) applies GELU before it stores each output instead of a
    separate pass. Every backend still computes ``gelu(layer(x))``; the module keeps its parameters
    and its saved form. :func:`unfuse_activations` (and :func:`merge`) put the activation back.
    """
    moved = 0
    for module in model.modules():
        layer, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        if isinstance(layer, CompactLinear) and layer.activation is None and _is_exact_gelu(act):
            layer.activation = "gelu"
            layer.__dict__["_fused_from"] = act  # a plain attribute, not a submodule: restored by unfuse
            module.intermediate_act_fn = nn.Identity()
            moved += 1
    return moved


def _is_exact_gelu(act: object) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation"  # transformers' exact GELU (erf form)


def unfuse_activations(model: nn.Module) -> int:
    """Undo :func:`fuse_activations`; returns how many activations were put back."""
    restored = 0
    for module in model.modules():
        layer = getattr(module, "dense", None)
        if isinstance(layer, CompactLinear) and "_fused_from" in layer.__dict__:
            module.intermediate_act_fn = layer.__dict__.pop("_fused_from")
            layer.activation = None
            restored += 1
    return restored


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every compact layer by the plain linear it computes (``Conv1D`` where it came from one)."""
    unfuse_activations(model)  # a fused activation goes back to the module it came from
    dense = {}
    for name, layer in compact_layers(model).items():
        linear = layer.merge()
        if layer.source_kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(layer.out_features, layer.in_features).to(linear.weight)
            conv.weight.copy_(linear.weight.T)
            conv.bias.copy_(linear.bias if linear.bias is not None else torch.zeros_like(conv.bias))
            linear = conv
        dense[name] = linear
    swap(model, dense)
    return model
