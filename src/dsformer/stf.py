"""The Straight-Through Factorizer (STF): train the factorization under the task loss, in any training loop.

Each target linear keeps a latent dense weight ``W̃`` (initialized from the pretrained ``W``).
The layer computes with ``Ŵ_λ = (1 - λ) W̃ + λ Π(W̃)``, where ``Π`` projects onto the structure
(dense-sparse, low rank or N:M) by a few fitting rounds warm-started from the previous
projection, so the discrete support keeps moving. The backward pass is straight-through:
``∂L/∂W̃ := ∂L/∂Ŵ``. Three calls fit any loop: :meth:`STF.wrap` before training,
:meth:`STF.step` after each optimizer step, :meth:`STF.finalize` at the end, which turns the
last projection into compact layers. ``dsformer.STFCallback`` makes the same calls from
``transformers.Trainer``.

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
    >>> stf.step()   # after the optimizer's step: re-project when due
    False
    >>> report = stf.finalize()
    >>> type(model[0]).__name__
    'DenseSparseLinear'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsformer import surgery
from dsformer.errors import DsformerError
from dsformer.report import Report, model_bytes
from dsformer.structures import DenseSparseConfig, Factors, Structure

_FACTOR = "factor_"  # prefix of the buffers that hold a projection's factor tensors


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
        self.source_kind = source_kind
        self._template: Factors | None = None  # the projection's factors, their tensors held as buffers below

    @property
    def factors(self) -> Factors | None:
        """The last projection's factors (the warm start of the next). Their tensors are buffers
        (``factor_<field>``), so checkpoints of the model carry them and a resumed run goes on exactly."""
        if self._template is None:
            return None
        return self._template.with_tensors({f: getattr(self, _FACTOR + f) for f in self._template.tensors()})

    @torch.no_grad()
    def set_factors(self, factors: Factors) -> None:
        """Hold a new projection: its factors, and the weight they make."""
        tensors = factors.tensors()
        for field, tensor in tensors.items():
            held = getattr(self, _FACTOR + field, None)
            if held is not None and held.shape == tensor.shape and held.dtype == tensor.dtype:
                held.copy_(tensor)
            else:  # the first projection (a copy: layers fitted with one basis must not share its storage)
                self.register_buffer(_FACTOR + field, tensor.detach().clone())
        self._template = factors.with_tensors({field: torch.empty(0) for field in tensors})
        self.projected.copy_(factors.reconstruct().to(self.projected.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # value (1-λ) W̃ + λ Π(W̃), gradient identity with respect to W̃; when following, Π(W̃) is
        # approximated between refreshes by Π(W̃ᵣ) + (W̃ - W̃ᵣ), so each step's update acts at once.
        # Evaluation always sees the projection itself (λ = 1): the model as it would ship.
        ramp, base = (self.ramp, self.anchor if self.follow else w) if self.training else (1.0, w)
        w_hat = w + ramp * (self.projected.to(w.dtype) - base).detach()
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
        for name, low, high in (
            ("refresh_every", 1, None), ("iters", 1, None), ("final_iters", 0, None), ("ramp_steps", 0, None),
            ("ramp_start", 0.0, 1.0), ("pull", 0.0, 1.0),
        ):  # fmt: skip
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < low
                or (high and value > high)
            ):
                bound = f"in [{low:g}, {high:g}]" if high else f"at least {low}"
                raise DsformerError(f"STF schedule: {name} must be {bound} (got {value!r})")

    def is_default(self) -> bool:
        """Whether nothing of STF's schedule was asked for (what a method without STF may be given)."""
        return self == Schedule()

    def polish_step(self, total: int) -> int | None:
        """The step after which the factors train directly (None: never), for ``total`` training steps."""
        if not self.polish or total < 2:
            return None
        return min(total - 1, max(1, round(total * (1.0 - self.polish))))

    def ramp(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return 1.0
        return self.ramp_start + (1.0 - self.ramp_start) * step / self.ramp_steps


class STF:
    """The STF layers of one model and their shared projection schedule."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, tuple[STFLinear, Structure]],
        schedule: Schedule,
        importance: dict[str, torch.Tensor] | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
    ):
        self.model = model
        self.layers = layers
        self.schedule = schedule
        self.importance = importance or {}  # per-output-row fit weights by layer (Fisher), for every projection
        self.inputs = inputs or {}  # each layer's input second moment: every projection fits the layer's output
        self.steps = 0  # optimizer steps taken (step() counts them)
        self.support_change = 0.0  # fraction of support entries that moved at the last refresh
        self.report: Report | None = None  # set by finalize, after which the STF layers are gone

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        structure: Structure | None = None,
        targets: surgery.Patterns = None,
        exclude: surgery.Patterns = None,
        schedule: Schedule | None = None,
        importance: dict[str, torch.Tensor] | None = None,
        overrides: dict[str, Structure] | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
        start: dict[str, Factors] | None = None,
    ) -> STF:
        """Replace the target linears by :class:`STFLinear` (in place) and project them once.

        ``targets``, ``exclude`` and ``overrides`` select layers as :class:`dsformer.CompressConfig` does;
        every layer is checked before any is replaced. ``importance`` maps layer names to per-output-row
        weights (Fisher information) that every projection's fit uses; ``inputs`` maps them to the second
        moment of their inputs (:class:`dsformer.calibration.InputMoments`), which makes every projection
        data-aware. ``start`` gives every layer its first projection instead (factors fitted before, for
        example block by block by :func:`dsformer.calibration.compress_calibrated`); later ones keep their layouts.
        """
        config = surgery.CompressConfig(structure or DenseSparseConfig(), targets, exclude, overrides or {})
        structures = surgery.plan(model, config)
        latent = {}
        for name in structures:
            module = model.get_submodule(name)
            latent[name] = STFLinear(surgery.linear_weight(module), module.bias, surgery.source_kind(module))
        surgery.swap(model, latent)
        layers = {name: (latent[name], structures[name]) for name in structures}
        stf = cls(model, layers, schedule or Schedule(), importance, inputs)
        if start is None:
            stf.refresh(first=True)
        else:
            stf.start_from(start)
        stf.set_step(0)
        return stf

    def set_step(self, step: int) -> None:
        """Set λ and the following mode for training step ``step`` (0: the first)."""
        self.steps = step
        ramp = self.schedule.ramp(step)
        for layer, _ in self.layers.values():
            layer.ramp = ramp
            layer.follow = self.schedule.follow

    def step(self, step: int | None = None, refresh: bool = False) -> bool:
        """Call after each optimizer step (``step``: the steps done, when the loop counts them itself).

        Pulls the latents toward their projections, sets λ, and re-projects when due or when
        ``refresh`` is set (an epoch end, before validation); returns whether it re-projected.
        """
        if self.schedule.pull:
            with torch.no_grad():
                for layer, _ in self.layers.values():
                    layer.weight.lerp_(layer.projected.to(layer.weight.dtype), self.schedule.pull)
        self.set_step(self.steps + 1 if step is None else step)
        if refresh or self.steps % self.schedule.refresh_every == 0:
            self.refresh()
            return True
        return False

    @torch.no_grad()
    def start_from(self, start: dict[str, Factors]) -> None:
        """Hold ``start[name]`` as each layer's projection (checked against the layer's shape first)."""
        missing = sorted(set(self.layers) - set(start))
        if missing:
            raise DsformerError(f"STF start: no factors for {missing[0]} ({len(missing)} layers lack them)")
        for name, (layer, _) in self.layers.items():
            shape = tuple(start[name].reconstruct().shape)
            if shape != (layer.out_features, layer.in_features):
                raise DsformerError(
                    f"STF start: the factors for {name} make a {shape} weight, "
                    f"not {(layer.out_features, layer.in_features)}"
                )
        for name, (layer, _) in self.layers.items():
            factors = start[name]
            on_device = {f: t.to(layer.weight.device) for f, t in factors.tensors().items()}
            layer.set_factors(factors.with_tensors(on_device))
            layer.anchor.copy_(layer.weight.detach())

    @torch.no_grad()
    def refresh(self, first: bool = False, iters: int | None = None) -> float:
        """Project every latent weight, warm-started from its last projection; returns the support-change rate."""
        weights = {name: layer.weight.detach() for name, (layer, _) in self.layers.items()}
        structures = {name: structure for name, (_, structure) in self.layers.items()}
        warm = None
        if not first:  # a few rounds from the last projection, one refit config per config (fit groups follow it)
            rounds = self.schedule.iters if iters is None else iters
            refits = {id(s): s.with_rounds(rounds) for s in structures.values()}
            structures = {name: refits[id(s)] for name, s in structures.items()}
            warm = {name: layer.factors for name, (layer, _) in self.layers.items()}
        fitted = surgery.fit(weights, structures, self.importance, warm, inputs=self.inputs)
        moved = total = 0
        for name, (layer, _) in self.layers.items():
            old, new = layer.factors.support() if layer.factors is not None else None, fitted[name].support()
            if old is not None and new is not None and old.shape == new.shape:
                moved += int((old & ~new).sum())
                total += int(new.sum())
            layer.set_factors(fitted[name])
            layer.anchor.copy_(layer.weight.detach())
        self.support_change = moved / total if total else 0.0
        return self.support_change

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
        sources = {name: layer for name, (layer, _) in self.layers.items()}
        structures = {name: structure for name, (_, structure) in self.layers.items()}
        compact = surgery.build({name: layer.factors for name, layer in sources.items()}, structures, sources)
        surgery.swap(self.model, compact)
        rows = [surgery.layer_report(name, sources[name].weight.detach(), compact[name]) for name in compact]
        self.layers = {}
        self.report = Report(rows, 0.0, bytes_before, model_bytes(self.model))
        return self.report
