"""The Straight-Through Factorizer (STF): train the factorization under the task loss.

Each target linear keeps a latent dense weight ``W̃`` (initialized from the pretrained ``W``).
The layer computes with ``Ŵ_λ = (1 - λ) W̃ + λ Π(W̃)``, where ``Π`` projects onto the structure
(dense-sparse, low rank or N:M) by a few fitting rounds warm-started from the previous
projection, so the discrete support keeps moving. The backward pass is straight-through:
``∂L/∂W̃ := ∂L/∂Ŵ``. :meth:`STF.finalize` turns the last projection into compact layers.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsformer.stf import STF
    >>> from dsformer.structures import DenseSparseConfig
    >>> model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    >>> stf = STF.wrap(model, DenseSparseConfig(ratio=2.0), targets=["0", "2"])
    >>> model(torch.randn(4, 32)).sum().backward()   # gradients reach the latent weights
    >>> model[0].weight.grad is not None
    True
    >>> report = stf.finalize()
    >>> type(model[0]).__name__
    'DenseSparseLinear'
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from dsformer.compress import _set_module, find_targets, layer_report, linear_weight
from dsformer.errors import DsformerError
from dsformer.report import Report, model_bytes
from dsformer.structures import CompactLinear, DenseSparseConfig, StructureConfig, compact_layer
from dsformer.structures.dense_sparse import share_bases


class STFLinear(nn.Module):
    """A linear layer whose forward uses the projection of its latent weight, with straight-through gradients."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, source_kind: str = "linear") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone())  # the latent dense weight W̃
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("projected", weight.detach().clone())  # Π(W̃), refreshed by STF
        self.register_buffer("anchor", weight.detach().clone())  # W̃ when Π(W̃) was last computed
        self.ramp = 1.0  # λ
        self.follow = True  # between refreshes, training steps see the latent's moves (see Schedule.follow)
        self.factors = None  # the last projection's factors (warm start of the next)
        self.source_kind = source_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # value (1-λ) W̃ + λ Π(W̃), gradient identity with respect to W̃; when following, Π(W̃) is
        # approximated between refreshes by Π(W̃ᵣ) + (W̃ - W̃ᵣ), so each step's update acts at once.
        # Evaluation always sees the projection itself: the model as it would ship.
        base = self.anchor if self.follow and self.training else w
        w_hat = w + self.ramp * (self.projected.to(w.dtype) - base).detach()
        return nn.functional.linear(x, w_hat, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ramp={self.ramp:g}"


@dataclass
class Schedule:
    """When to re-project and how strongly: refresh every ``refresh_every`` steps with ``iters`` fitting
    rounds; ``λ`` ramps linearly from ``ramp_start`` to 1 over the first ``ramp_steps`` steps (0: always 1).

    ``follow``: between refreshes a training step computes with ``Π(W̃ᵣ) + (W̃ - W̃ᵣ)``, the last
    projection moved by what the latent has moved since (``W̃ᵣ``: the latent at that refresh),
    instead of holding ``Π(W̃ᵣ)`` fixed. Holding it gives the optimizer no feedback for
    ``refresh_every`` steps and then applies all of their updates at once, which made MR training
    diverge at lr 1e-4; evaluation and the finished model always use the projection itself.

    ``pull`` moves each latent weight that fraction of the way to its projection after every step,
    ``W̃ ← W̃ - pull (W̃ - Π(W̃))``: SR-STE's refinement of the dropped part, for any structure
    (0: off, plain STF).

    ``polish``: the fraction of training, at its end, in which the support is frozen and the compact
    factors themselves train (the "short fine-tune of the factors" after STF that METHOD.md allows).
    At that step :meth:`STF.finalize` swaps in the compact layers and the optimizer goes on with
    their parameters; 0 trains straight-through to the end.
    """

    refresh_every: int = 10
    iters: int = 2
    ramp_steps: int = 0
    ramp_start: float = 0.0
    final_iters: int = 10
    pull: float = 0.0
    follow: bool = True
    polish: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.polish < 1.0:
            raise DsformerError(f"polish is a fraction of the training steps in [0, 1) (got {self.polish:g})")
        if self.refresh_every < 1:
            raise DsformerError(f"refresh_every must be at least 1 step (got {self.refresh_every})")

    def polish_step(self, total: int) -> int | None:
        """The step after which the factors train directly (None: never), for ``total`` training steps."""
        if not self.polish or total < 2:
            return None
        return min(total - 1, max(1, round(total * (1.0 - self.polish))))

    def ramp(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return 1.0
        return self.ramp_start + (1.0 - self.ramp_start) * step / self.ramp_steps


def _support(factors) -> torch.Tensor | None:
    """The discrete pattern of a projection as a boolean mask (None for low rank, which has none)."""
    indices = getattr(factors, "indices", None)
    if indices is None:
        return None
    width = factors.layout.k if hasattr(factors.layout, "k") else factors.layout.m
    mask = torch.zeros(*indices.shape[:-1], width, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices.long(), True)


class STF:
    """The STF layers of one model and their shared projection schedule."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, tuple[STFLinear, StructureConfig]],
        schedule: Schedule,
        importance: dict[str, torch.Tensor] | None = None,
    ):
        self.model = model
        self.layers = layers
        self.schedule = schedule
        self.importance = importance or {}  # per-output-row fit weights by layer (Fisher), for every projection
        self.support_change = 0.0  # fraction of support entries that moved at the last refresh
        self.report: Report | None = None  # set by finalize, after which the STF layers are gone

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        structure: StructureConfig | None = None,
        targets=None,
        exclude=None,
        schedule: Schedule | None = None,
        importance: dict[str, torch.Tensor] | None = None,
    ) -> STF:
        """Replace the target linears by :class:`STFLinear` (in place) and project them once.

        ``importance`` maps layer names to per-output-row weights (``dsformer.methods.fisher_importance``)
        that every projection's fit uses (DS and low rank).
        """
        structure = structure or DenseSparseConfig()
        names = find_targets(model, targets, exclude)
        layers = {}
        for name in names:
            module = model.get_submodule(name)
            structure.candidates(*linear_weight(module).shape)  # fail before changing anything
        for name in names:
            module = model.get_submodule(name)
            kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
            layer = STFLinear(linear_weight(module), module.bias, kind)
            _set_module(model, name, layer)
            layers[name] = (layer, structure)
        stf = cls(model, layers, schedule or Schedule(), importance)
        stf.refresh(first=True)
        stf.set_step(0)
        return stf

    def set_step(self, step: int) -> None:
        ramp = self.schedule.ramp(step)
        for layer, _ in self.layers.values():
            layer.ramp = ramp
            layer.follow = self.schedule.follow

    def maybe_refresh(self, step: int, force: bool = False) -> bool:
        """After optimizer step ``step``: pull the latents, set λ, re-project when due (or ``force``)."""
        if self.schedule.pull:
            with torch.no_grad():
                for layer, _ in self.layers.values():
                    layer.weight.lerp_(layer.projected.to(layer.weight.dtype), self.schedule.pull)
        self.set_step(step)
        if force or step % self.schedule.refresh_every == 0:
            self.refresh()
            return True
        return False

    @torch.no_grad()
    def refresh(self, first: bool = False, iters: int | None = None) -> float:
        """Project every latent weight, warm-started from its last projection; returns the support-change rate."""
        groups: dict[tuple[int, tuple[int, int]], list[str]] = {}
        for name, (layer, structure) in self.layers.items():
            groups.setdefault((id(structure), tuple(layer.weight.shape)), []).append(name)
        moved = total = 0
        for names in groups.values():
            structure = self.layers[names[0]][1]
            layers = [self.layers[n][0] for n in names]
            fit_config = structure
            if isinstance(structure, DenseSparseConfig) and not first:
                fit_config = replace(structure, iters=self.schedule.iters if iters is None else iters)
            warm = None if first else [layer.factors for layer in layers]
            options = {"importance": [self.importance.get(n) for n in names]} if self.importance else {}
            fitted = fit_config.fit([layer.weight.detach() for layer in layers], warm=warm, **options)
            for layer, factors in zip(layers, fitted, strict=True):
                old, new = _support(layer.factors), _support(factors)
                if old is not None and new is not None and old.shape == new.shape:
                    moved += int((old & ~new).sum())
                    total += int(new.sum())
                layer.factors = factors
                layer.projected.copy_(factors.reconstruct().to(layer.projected.dtype))
                layer.anchor.copy_(layer.weight.detach())
        self.support_change = moved / total if total else 0.0
        return self.support_change

    def factor_state(self) -> dict[str, torch.Tensor]:
        """The current projections' tensors, for checkpoints (exact resume needs the warm starts)."""
        state = {}
        for name, (layer, _) in self.layers.items():
            for field in ("basis", "values", "indices", "left", "right"):
                tensor = getattr(layer.factors, field, None)
                if tensor is not None:  # a copy: shared bases and slices of one fit must not share storage
                    state[f"{name}.{field}"] = tensor.detach().clone()
        return state

    def load_factor_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, (layer, _) in self.layers.items():
            factors = copy.copy(layer.factors)
            for field in ("basis", "values", "indices", "left", "right"):
                key = f"{name}.{field}"
                if key in state:
                    setattr(factors, field, state[key].to(getattr(factors, field).device))
            layer.factors = factors
            layer.projected.copy_(factors.reconstruct().to(layer.projected.dtype))

    @torch.no_grad()
    def finalize(self, iters: int | None = None) -> Report:
        """Swap in compact layers holding the projections; returns the report.

        ``iters``: fitting rounds of one more projection first (``None``: the schedule's
        ``final_iters``; ``0``: keep the last projection, exactly what training evaluated).
        A second call returns the first one's report (the compact layers may have trained since).
        """
        if self.report is not None:
            return self.report
        # the dense model's size: the STF layers' own buffers (projection, anchor) are training state
        bytes_before = model_bytes(self.model) - sum(
            buffer.numel() * buffer.element_size() for layer, _ in self.layers.values() for buffer in layer.buffers()
        )
        iters = self.schedule.final_iters if iters is None else iters
        if iters > 0:
            self.refresh(iters=iters)
        reports, shared = [], {}
        for name, (layer, structure) in self.layers.items():
            compact: CompactLinear = compact_layer(structure, layer.factors, layer.bias).to(layer.weight.device)
            compact.source_kind = layer.source_kind
            if getattr(structure, "share_basis", False):  # one basis per group that refresh fitted together
                shared.setdefault((id(structure), tuple(layer.weight.shape)), []).append(compact)
            _set_module(self.model, name, compact)
        for group in shared.values():
            share_bases(group)
        for name, (layer, _) in self.layers.items():
            reports.append(layer_report(name, layer.weight.detach(), self.model.get_submodule(name)))
        self.layers = {}
        self.report = Report(reports, 0.0, bytes_before, model_bytes(self.model))
        return self.report
