"""The dispatch table of execution backends that compact layers consult.

A backend is one way to compute a compact layer's forward at inference: ``reference`` (plain
PyTorch ops on the factors, differentiable), ``dense`` (the materialized weight in one GEMM), or
a structure's fast kernel. Kernels live above the structures (:mod:`dsformer.kernels`) and
register their backends here for the layer classes they serve, as torchao registers its
dispatches; a structure never imports a kernel. Lookups follow the class hierarchy, so a
backend registered for :class:`~dsformer.structures.base.CompactLinear` serves every structure
unless a structure registers its own under the same name.

``auto`` is not a backend but a choice among them; :mod:`dsformer.kernels` registers the
function that makes it (:func:`set_chooser`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsformer.errors import DsformerError

if TYPE_CHECKING:
    from dsformer.structures.base import CompactLinear


@dataclass(frozen=True)
class Backend:
    """One execution backend of a compact layer class.

    ``run(layer, x)`` computes ``x (..., in) -> (..., out)`` (inference: the result may be a
    strided view). ``fused(layer, x, activation)`` applies the activation that follows the layer
    in its own kernel, or returns None where it cannot. ``available(layer)`` says whether it runs
    for this layer here, ``needs`` what it needs where it does not. ``exact=False`` marks a
    backend that changes the numerics (int8): only asked for by name, never chosen by ``auto``.
    ``work(layer)`` is the multiply-adds per token (None: the dense product's ``out · in``) and
    ``slots`` the layer caches it fills (see ``CompactLinear.cached``).
    """

    name: str
    run: Callable[[CompactLinear, torch.Tensor], torch.Tensor]
    fused: Callable[[CompactLinear, torch.Tensor, str], torch.Tensor | None] | None = None
    available: Callable[[CompactLinear], bool] | None = None
    needs: str = ""
    exact: bool = True
    work: Callable[[CompactLinear], int] | None = None
    slots: tuple[str, ...] = ()

    def runs_for(self, layer: CompactLinear) -> bool:
        return self.available is None or self.available(layer)

    def work_for(self, layer: CompactLinear) -> int:
        return layer.out_features * layer.in_features if self.work is None else self.work(layer)


_TABLE: dict[type, dict[str, Backend]] = {}
_RESOLVED: dict[type, dict[str, Backend]] = {}  # per layer class, its bases' entries merged (forward's lookup)
_chooser: Callable[[CompactLinear, torch.Tensor], str] | None = None


def register_backend(layer_class: type, backend: Backend) -> Backend:
    """Make ``backend`` an execution backend of ``layer_class`` and its subclasses (replacing one of its name)."""
    _TABLE.setdefault(layer_class, {})[backend.name] = backend
    _RESOLVED.clear()
    return backend


def registered(layer: CompactLinear) -> dict[str, Backend]:
    """Every backend registered for ``layer``'s class, by name (a subclass's own shadow its bases')."""
    cls = type(layer)
    if cls not in _RESOLVED:
        found: dict[str, Backend] = {}
        for base in reversed(cls.__mro__):
            found.update(_TABLE.get(base, {}))
        _RESOLVED[cls] = found
    return _RESOLVED[cls]


def names() -> set[str]:
    """Every backend name registered for any layer class."""
    return {name for backends in _TABLE.values() for name in backends}


def backend_of(layer: CompactLinear, name: str) -> Backend:
    backends = registered(layer)
    if name not in backends:
        raise DsformerError(
            f"{type(layer).__name__} has no backend {name!r}; it has {', '.join(backends)} "
            "(fast backends are registered when dsformer.kernels is imported)"
        )
    return backends[name]


def available(layer: CompactLinear) -> tuple[str, ...]:
    """The backends that run for ``layer`` here."""
    return tuple(name for name, backend in registered(layer).items() if backend.runs_for(layer))


def set_chooser(chooser: Callable[[CompactLinear, torch.Tensor], str]) -> None:
    """Register the function that makes the ``auto`` choice (``dsformer.kernels.choose``)."""
    global _chooser
    _chooser = chooser


def choose(layer: CompactLinear, x: torch.Tensor) -> str:
    if _chooser is None:
        raise DsformerError("the auto backend needs dsformer.kernels (import it, or use dsformer.use_backend)")
    return _chooser(layer, x)
