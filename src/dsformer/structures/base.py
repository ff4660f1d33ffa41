"""What every weight structure provides: a config (:class:`Structure`), its fitted :class:`Factors`,
and a compact layer (:class:`CompactLinear`) that computes with them.

A new structure is one module that subclasses these three and registers its config with
:func:`dsformer.structures.registry.register`; nothing else in dsformer names a structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from dsformer.structures.backends import Backend, backend_of, choose, register_backend


def layout_ints(layout: dict[str, Any], *bounds: tuple[str, int, int]) -> list[int]:
    """The named whole numbers of a recorded layout, each checked to lie in ``[low, high]`` (before any
    tensor of that size is allocated: the record may be corrupt or crafted)."""
    values = []
    for key, low, high in bounds:
        value = layout.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"layout {key}={value!r} is not a whole number in {low}..{high}")
        values.append(value)
    return values


def support_mask(indices: torch.Tensor, width: int) -> torch.Tensor:
    """The boolean ``(..., width)`` mask of the positions that ``indices (..., s)`` name."""
    mask = torch.zeros(*indices.shape[:-1], width, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices.long(), True)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# activations a compact layer can take over from the module after it (exact GELU, erf form)
ACTIVATIONS = {"gelu": nn.functional.gelu}


class Factors:
    """The fitted factors of one layer: a dataclass whose tensor fields store the weight, and a ``layout``
    (shapes and counts: ``value_params``, ``ratio``)."""

    layout: Any

    def reconstruct(self) -> torch.Tensor:
        """The ``(out, in)`` weight these factors represent."""
        raise NotImplementedError

    def support(self) -> torch.Tensor | None:
        """The discrete pattern as a boolean mask (STF reports how much of it moves); None: no pattern."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that store the weight, by field name."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> Factors:
        """A copy holding ``tensors`` in place of the fields of those names."""
        return dataclasses.replace(self, **tensors)  # type: ignore[type-var]


# what a fit takes: the (out, in) weights, earlier factors to start from, positive weights of their rows
Weights = list[torch.Tensor]
Warm = list["Factors | None"] | None
Importance = list[torch.Tensor | None] | None
# the second moment ``X Xᵀ / tokens`` (``in x in``) of each layer's inputs on calibration data
Inputs = list[torch.Tensor | None] | None


class Structure:
    """A structure's config: which layouts fit a shape at the asked budget, and how to fit them.

    Subclasses are dataclasses with a ``name`` and the ``layer`` class that holds their factors.
    """

    name: ClassVar[str]
    layer: ClassVar[type[CompactLinear]]
    # whether any ratio gives a layout (a global budget may then give each layer its own)
    allocatable: ClassVar[bool] = False

    @property
    def sized_by_ratio(self) -> bool:
        """Whether the ratio alone sets each layer's size (no size fixed by another option), so that a
        global budget may choose every layer's ratio."""
        return self.allocatable and getattr(self, "ratio", None) is not None

    def candidates(self, out_features: int, in_features: int) -> list[Any]:
        """The layouts a fit may choose for this shape; raises InfeasibleRatioError where none fits. A layout
        has ``value_params``, ``ratio`` and ``stored_bytes(element_size)`` (indices included)."""
        raise NotImplementedError

    def fit(
        self, weights: Weights, warm: Warm = None, importance: Importance = None, inputs: Inputs = None
    ) -> list[Factors]:
        """Factorize each ``(out, in)`` weight. ``warm``: earlier factors to start from (their layouts are
        kept); ``importance[i]``: positive weights of the output rows (Fisher information);
        ``inputs[i]``: the second moment of the layer's inputs, which makes the fit minimize the
        output error ``||(W - Ŵ) X||`` (see :mod:`dsformer.structures.whitening`)."""
        raise NotImplementedError

    def with_rounds(self, iters: int) -> Structure:
        """The config for a warm-started refit of ``iters`` rounds (STF's projections); itself where a
        fit has no rounds."""
        return self

    def tie(self, layers: list[CompactLinear]) -> None:
        """Make the layers of one joint fit share what the fit shared (nothing, unless the config says so)."""


class CompactLinear(nn.Module):
    """A layer that computes ``x @ W.T + bias`` like ``nn.Linear``, with ``W`` held in a compact form.

    Subclasses define ``materialize`` (the dense ``(out, in)`` weight), ``reference`` (the forward in
    differentiable ops on the factors), ``layout`` (a JSON-able dict that rebuilds an empty layer of
    the same shapes through ``from_layout``) and ``describe``. At inference the forward runs on
    ``backend``, looked up in :mod:`dsformer.structures.backends`.
    """

    structure: ClassVar[str]
    # the execution backend at inference: "reference", "dense", a registered fast one, or "auto"
    backend: str = "reference"
    # "linear", or "conv1d" for a layer that replaced a GPT-2 style Conv1D (merge restores the type)
    source_kind: str = "linear"
    # an activation applied to the output ("gelu"), moved here from the module that follows the layer
    # by dsformer.surgery.fuse_activations so that a backend can apply it in its kernel; None: none
    activation: str | None = None
    # factor tensors that belong to another layer (a shared basis): stored and counted there
    borrowed: frozenset[str] = frozenset()

    def __init__(self, layout: Any, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cached(self, slot: str, build, *sources: torch.Tensor) -> Any:
        """``build()``, reused across calls at inference while ``sources`` are unchanged.

        While gradients flow (training) it is rebuilt every call, so autograd sees it. Each
        ``slot`` names one cached value (a layer may keep several, e.g. indices and a weight).
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return build()
        # a list, not a generator: a decode step calls this for every layer. Inference tensors (a model cast
        # inside inference mode) keep no version: for them only a new address, device or type rebuilds
        key = tuple([(t.data_ptr(), None if t.is_inference() else t._version, t.device, t.dtype) for t in sources])
        cache = self.__dict__.setdefault("_kernel_cache", {})
        entry = cache.get(slot)
        if entry is None or entry[0] != key:
            entry = cache[slot] = (key, build())
        return entry[1]

    def drop_cached(self) -> None:
        """Forget what :meth:`cached` kept (memory that inference reuses, not needed between passes)."""
        self.__dict__.pop("_kernel_cache", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.backend
        if (
            name != "reference"
            and torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        ):
            name = "reference"  # training (or a gradient to the input) differentiates through the reference ops
        elif name == "auto":
            name = choose(self, x)
        backend = backend_of(self, name)
        if self.activation is None:
            return backend.run(self, x)
        if backend.fused is not None:
            y = backend.fused(self, x, self.activation)
            if y is not None:
                return y
        return ACTIVATIONS[self.activation](backend.run(self, x))

    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)`` on the named backend, without a fused activation (timing, tests)."""
        return backend_of(self, name).run(self, x)

    def layout(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_layout(
        cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype
    ) -> CompactLinear:
        raise NotImplementedError

    def index_bounds(self) -> dict[str, int]:
        """Each index buffer's name and the bound all its entries are below (checked at load: kernels
        trust them; int8 storage packs them to the bits the bound needs)."""
        return {}

    def factor_tensors(self) -> list[torch.Tensor]:
        """The tensors that store the weight (bias excluded), borrowed ones included: what ``state_dict`` holds
        besides the bias, read without building one (a backend keys its cache on them at every call)."""
        return [t.detach() for name, t in self._stored() if name != "bias"]

    def own_factor_tensors(self) -> list[torch.Tensor]:
        return [t.detach() for name, t in self._stored() if name != "bias" and name not in self.borrowed]

    def _stored(self) -> list[tuple[str, torch.Tensor]]:
        buffers = [(n, t) for n, t in self._buffers.items() if n not in self._non_persistent_buffers_set]
        return [(n, t) for n, t in [*self._parameters.items(), *buffers] if t is not None]

    def value_params(self) -> int:
        """Stored weight values (indices excluded): the parameter count that ratios use."""
        return sum(t.numel() for t in self.own_factor_tensors() if t.is_floating_point())

    def weight_bytes(self) -> int:
        """Bytes of the stored weight, indices included."""
        return tensor_bytes(*self.own_factor_tensors())

    def borrow(self, owner: CompactLinear, name: str) -> None:
        """Use ``owner``'s factor tensor ``name`` instead of this layer's own (of the same shape and type)."""
        mine, theirs = getattr(self, name), getattr(owner, name)
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            raise ValueError(
                f"cannot share {name}: this layer's is {tuple(mine.shape)} {mine.dtype}, "
                f"the owner's {tuple(theirs.shape)} {theirs.dtype}"
            )
        setattr(self, name, theirs)
        self.borrowed = self.borrowed | {name}

    def describe(self) -> str:
        """A short human description of the layout, e.g. ``k=128 s=64``."""
        raise NotImplementedError

    def merge(self) -> nn.Linear:
        """The plain linear this layer computes."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        w = self.materialize().detach()
        dense = dense.to(dtype=w.dtype, device=w.device)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"


def _dense(layer: CompactLinear, x: torch.Tensor) -> torch.Tensor:
    """The materialized weight in one GEMM: the dense cost, kept as a fallback."""
    # contiguous: a column layer materializes a transposed view, which bf16 GEMMs run at half speed
    weight = layer.cached("dense", lambda: layer.materialize().contiguous(), *layer.factor_tensors())
    return nn.functional.linear(x, weight, layer.bias)


register_backend(CompactLinear, Backend("reference", run=lambda layer, x: layer.reference(x)))
register_backend(CompactLinear, Backend("dense", run=_dense, slots=("dense",)))
