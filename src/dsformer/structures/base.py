"""What every weight structure shares: the compact layer base class and budget helpers."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from dsformer.errors import InfeasibleRatioError


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio (dense parameters / compressed parameters)."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 1.0:
        raise InfeasibleRatioError(
            f"compression ratio must be a finite number > 1 (got {ratio!r}); "
            "for example 2.0 keeps half of the weight parameters"
        )
    return float(ratio)


def infeasible(structure: str, shape: tuple[int, int], ratio: float, lo: float, hi: float) -> InfeasibleRatioError:
    return InfeasibleRatioError(
        f"{structure}: ratio {ratio:g} is infeasible for a {shape[0]}x{shape[1]} weight; "
        f"feasible ratios for this shape are {lo:.3g} to {hi:.3g}"
    )


# activations a compact layer can take over from the module after it (exact GELU, erf form)
ACTIVATIONS = {"gelu": nn.functional.gelu}


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CompactLinear(nn.Module):
    """A layer that computes ``x @ W.T + bias`` like ``nn.Linear``, with ``W`` held in a compact form.

    Subclasses define ``materialize`` (the dense ``(out, in)`` weight), ``layout`` (a JSON-able
    dict that rebuilds an empty layer of the same shapes through ``from_layout``) and the counts
    used by reports. ``merge`` turns the layer back into a plain ``nn.Linear``.
    """

    structure: ClassVar[str]
    # execution path: "reference", "dense", a structure's fast path, or "auto" (see dsformer.kernels)
    backend: str = "reference"
    # "linear", or "conv1d" for a layer that replaced a GPT-2 style Conv1D (merge restores the type)
    source_kind: str = "linear"
    # an activation applied to the output ("gelu"), moved here from the module that follows the layer
    # by dsformer.kernels.fuse_activations so a fast path can apply it in its kernel; None: none
    activation: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def _cached(self, slot: str, build, *sources: torch.Tensor) -> torch.Tensor:
        """``build()``, reused across calls at inference while ``sources`` are unchanged.

        While gradients flow (training) it is rebuilt every call, so autograd sees it. Each
        ``slot`` names one cached value (a layer may keep several, e.g. indices and a weight).
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return build()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in sources)
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if slot not in cache or cache[slot][0] != key:
            cache[slot] = (key, build())
        return cache[slot][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.backend
        if (
            name != "reference"
            and torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        ):
            name = "reference"  # training (or a gradient to the input) differentiates through the reference ops
        elif name == "auto":
            from dsformer.kernels import choose

            name = choose(self, x)
        if self.activation is None:
            return self.run(name, x)
        return self.run_activated(name, x)

    def run_activated(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``activation(run(name, x))``; a path that applies the activation in its own kernel overrides this."""
        return ACTIVATIONS[self.activation](self.run(name, x))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in plain PyTorch ops on the factors (differentiable; what training uses)."""
        raise NotImplementedError

    def backends(self) -> tuple[str, ...]:
        """Execution paths this layer can take (see ``dsformer.kernels``); ``int8`` changes the numerics."""
        return ("reference", "dense", "int8")

    def unavailable(self) -> dict[str, str]:
        """Paths this structure has elsewhere but not here, each with what it needs (for error messages)."""
        return {}

    def cache_slots(self, path: str) -> tuple[str, ...]:
        """The ``_cached`` slots ``path`` fills (dropped when no choice uses the path)."""
        return {"dense": ("dense",), "int8": ("int8",)}.get(path, ())

    def work(self, path: str) -> int:
        """Multiply-adds per token on ``path`` (the dense product's ``out · in`` unless a path saves some)."""
        return self.out_features * self.in_features

    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)`` on the named path (inference; the result may be a strided view)."""
        if name == "dense":  # the materialized weight: the dense cost, kept as a fallback
            weight = self._cached("dense", self.materialize, *self.factor_tensors())
            return nn.functional.linear(x, weight, self.bias)
        if name == "reference":
            return self.reference(x)
        if name == "int8":  # the materialized weight as int8; structures with GEMM stages override it
            from dsformer.kernels.int8 import int8_linear, int8_weight

            weight8 = self._cached("int8", lambda: int8_weight(self.materialize()), *self.factor_tensors())
            return int8_linear(x, weight8, None if self.bias is None else self.bias.detach())
        raise ValueError(f"{type(self).__name__} has no backend {name!r}; it has {', '.join(self.backends())}")

    def layout(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_layout(
        cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype
    ) -> CompactLinear:
        raise NotImplementedError

    def index_bits(self) -> int | None:
        """Bits each stored index needs (compact int8 storage packs them); None: no index tensor."""
        limit = self.index_limit()
        return None if limit is None else max(1, (limit - 1).bit_length())

    def index_limit(self) -> int | None:
        """Every stored index is below this (checked at load: kernels trust them); None: no index tensor."""
        return None

    def factor_tensors(self) -> list[torch.Tensor]:
        """The tensors that store the weight (bias excluded)."""
        return [t for name, t in self.state_dict().items() if name != "bias"]

    def value_params(self) -> int:
        """Stored weight values (indices excluded): the parameter count that ratios use."""
        return sum(t.numel() for t in self.factor_tensors() if t.is_floating_point())

    def weight_bytes(self) -> int:
        """Bytes of the stored weight, indices included."""
        return tensor_bytes(*self.factor_tensors())

    def describe(self) -> str:
        """A short human description of the layout, e.g. ``k=128 s=64``."""
        raise NotImplementedError

    def merge(self) -> nn.Linear:
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
