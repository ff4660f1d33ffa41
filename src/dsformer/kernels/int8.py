"""Int8 matrix products for inference: int8 weights (one scale per output row), int8 activations
(one scale per token, computed on the fly), int32 accumulation (``torch._int_mm``), fp32 out.

Every GEMM of a compact layer can run this way: DS's basis stage (the sparse stage stays a
float gather), both factors of low rank, and a materialized dense weight. The numerics change
(about 1% relative error per product on MiniLM's shapes), so ``auto`` never picks it: ask for it
with ``use_backend(model, "int8")``. This module registers the ``int8`` backend of every compact
layer (the materialized weight) and of low rank (both factors); DS's is in
:mod:`dsformer.kernels.dense_sparse`. ``int8_linears`` gives a dense model the same treatment, the
baseline that int8 compact layers must beat.

Example:
    >>> import torch
    >>> from dsformer.kernels.int8 import int8_weight, int8_linear
    >>> w, x = torch.randn(64, 32), torch.randn(5, 32)
    >>> y = int8_linear(x, int8_weight(w))
    >>> bool((y - x @ w.T).norm() < 0.02 * (x @ w.T).norm())
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dsformer.quantize import to_int8
from dsformer.structures import CompactLinear, LowRankLinear
from dsformer.structures.backends import Backend, register_backend
from dsformer.surgery import swap


class Int8Weight(NamedTuple):
    """A ``(out, in)`` weight as int8, stored transposed ``(in, out)`` for the product, with ``(out,)`` scales."""

    q_t: torch.Tensor
    scale: torch.Tensor


def int8_weight(weight: torch.Tensor) -> Int8Weight:
    q, scale = to_int8(weight.detach())
    return Int8Weight(q.T.contiguous(), scale)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., in) @ W.T (+ bias)``, with ``x`` quantized per token (absmax) for the int8 product."""
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
    y = _int_mm(q, weight.q_t).float().mul_(scale).mul_(weight.scale)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.q_t.shape[1])


def _int_mm(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """``a @ b`` in int32. On CUDA (``pad`` defaults to it), where ``torch._int_mm`` needs more than
    16 rows and both widths a multiple of 8, the operands are zero-padded and the result cut back."""
    if not (a.device.type == "cuda" if pad is None else pad):
        return torch._int_mm(a, b)
    (m, k), n = a.shape, b.shape[1]
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if pad_m or pad_k:
        a = nn.functional.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = nn.functional.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n]


class Int8DenseLinear(nn.Module):
    """A plain linear computing with :func:`int8_linear` (inference only): the dense int8 baseline."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight8 = int8_weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight8, self.bias)


def int8_linears(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named ``nn.Linear`` modules of ``model`` (in place) by :class:`Int8DenseLinear`."""
    swap(model, {name: Int8DenseLinear(model.get_submodule(name)) for name in names})
    return model


def _bias(layer: CompactLinear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def _materialized(layer: CompactLinear, x: torch.Tensor) -> torch.Tensor:
    """The materialized weight as int8 (structures whose factors are not GEMM operands)."""
    weight8 = layer.cached("int8", lambda: int8_weight(layer.materialize()), *layer.factor_tensors())
    return int8_linear(x, weight8, _bias(layer))


def _low_rank(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """Both thin GEMMs in int8."""
    right8, left8 = layer.cached(
        "int8_factors", lambda: (int8_weight(layer.right), int8_weight(layer.left)), layer.left, layer.right
    )
    return int8_linear(int8_linear(x, right8), left8, _bias(layer))


register_backend(CompactLinear, Backend("int8", run=_materialized, exact=False, slots=("int8",)))
register_backend(
    LowRankLinear,
    Backend(
        "int8",
        run=_low_rank,
        exact=False,
        slots=("int8_factors",),
        work=lambda layer: layer.rank * (layer.out_features + layer.in_features),
    ),
)
