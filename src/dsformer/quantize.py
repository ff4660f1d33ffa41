"""Int8 weights with one scale per row: quantization on its own, or on top of a factorization.

``quantize_int8`` rounds, in place, every compact layer's float factors (dense-sparse: basis and
values; low rank: both factors; N:M: the kept values) and, in a model without compact layers,
every linear that ``compress`` would target, to symmetric int8 with one fp32 scale per row
(absmax). It keeps the dequantized values in the model's float tensors, so the model computes
exactly what int8 storage dequantized at load computes, and it reports the bytes that storage
takes (1 byte per value, 4 per row scale, indices as they are stored).

Example:
    >>> import torch
    >>> from dsformer.quantize import int8_rows
    >>> w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    >>> int8_rows(w)[0]
    tensor([[ 1.0000, -0.5039,  0.2520],
            [ 0.0000,  0.0000,  0.0000]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsformer.compress import compact_layers, find_targets
from dsformer.structures.base import tensor_bytes


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` rounded to int8 with one absmax scale per row (first dimension); and its int8 bytes."""
    rows = t.detach().reshape(t.shape[0], -1).float()
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    q = (rows / scale).round().clamp(-127, 127)
    return (q * scale).reshape(t.shape).to(t.dtype), t.numel() + 4 * t.shape[0]


@dataclass
class QuantReport:
    layers: int
    bytes_before: int  # the quantized layers' weights as they were (indices included)
    bytes_after: int  # the same as int8 values + fp32 row scales (indices as stored)
    model_bytes_before: int  # every parameter and buffer
    model_bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after

    def to_json(self) -> dict[str, float]:
        return {**self.__dict__, "ratio": self.ratio}


@torch.no_grad()
def quantize_int8(model: nn.Module) -> QuantReport:
    """Round the weights of ``model`` to int8 per row, in place (see the module docstring)."""
    model_before = tensor_bytes(*model.parameters(), *model.buffers())
    before = after = count = 0
    compact = compact_layers(model)
    if compact:
        seen: set[int] = set()  # a basis shared by several layers is stored, and rounded, once
        for layer in compact.values():
            for tensor in layer.factor_tensors():
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                before += tensor_bytes(tensor)
                if tensor.is_floating_point():
                    rounded, size = int8_rows(tensor)
                    tensor.copy_(rounded)
                    after += size
                else:
                    after += tensor_bytes(tensor)
            count += 1
    else:
        for name in find_targets(model):
            weight = model.get_submodule(name).weight
            rounded, size = int8_rows(weight)
            before += tensor_bytes(weight)
            weight.copy_(rounded)
            after += size
            count += 1
    return QuantReport(count, before, after, model_before, model_before - before + after)
