"""Int8 weights with one scale per row: quantization on its own, or on top of a factorization.

``quantize_int8`` rounds, in place, every compact layer's float factors (dense-sparse: basis and
values; low rank: both factors; N:M: the kept values) and, in a model without compact layers,
every linear that ``compress`` would target, to symmetric int8 with one fp32 scale per row
(absmax). It keeps the dequantized values in the model's float tensors, so the model computes
exactly what int8 storage dequantized at load computes, and it reports the bytes that storage
takes (1 byte per value, 4 per row scale, indices bit-packed). ``dsformer.save(..., int8=True)``
(``dsformer quantize``) writes those tensors as int8 with their scales and packs every index
tensor to the bits its values need (``ceil(log2 k)`` for a DS layer: 9 bits instead of int16 at
``k = 300``; 2 bits for 2:4): the file really is that small, and :func:`dsformer.load` restores
the same floats and indices.

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

from dsformer.structures.base import tensor_bytes
from dsformer.surgery import compact_layers, find_targets


def to_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as int8 values (its shape) and one fp32 absmax scale per row (the first dimension).

    Idempotent on its own output: rounding ``from_int8(*to_int8(t))`` again gives the same int8.
    """
    rows = t.detach().reshape(t.shape[0], -1).float()
    scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(t.shape), scale


def from_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor that int8 ``q`` with per-row ``scale`` stands for."""
    return (q.reshape(q.shape[0], -1).float() * scale.float()[:, None]).reshape(q.shape).to(dtype)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers below ``2**bits`` as a flat uint8 CPU tensor of ``ceil(n * bits / 8)`` bytes.

    >>> packed = pack_bits(torch.tensor([5, 0, 300, 511]), 9)
    >>> packed.numel(), unpack_bits(packed, 9, 4).tolist()
    (5, [5, 0, 300, 511])
    """
    flat = values.detach().reshape(-1).cpu().long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values from {int(flat.min())} to {int(flat.max())} do not fit in {bits} bits")
    # 8 values at a time fill `bits` whole bytes; chunks keep the bit matrices small on large layers
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    out = [_pack_chunk(padded[i : i + _CHUNK], bits) for i in range(0, padded.numel(), _CHUNK)]
    packed = torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)
    return packed[: packed_size(flat.numel(), bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` integers that :func:`pack_bits` packed (int64, CPU)."""
    data = packed.detach().reshape(-1).cpu()
    data = torch.cat([data, data.new_zeros(packed_size(-(-count // 8) * 8, bits) - data.numel())])
    step = _CHUNK // 8 * bits  # bytes that hold _CHUNK values
    out = [_unpack_chunk(data[i : i + step], bits) for i in range(0, data.numel(), step)]
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long))[:count]


_CHUNK = 1 << 16  # values per chunk, a multiple of 8


def _pack_chunk(values: torch.Tensor, bits: int) -> torch.Tensor:
    bit_matrix = ((values[:, None] >> torch.arange(bits)) & 1).to(torch.uint8)  # little-endian bits
    return (bit_matrix.reshape(-1, 8).long() << torch.arange(8)).sum(1).to(torch.uint8)


def _unpack_chunk(data: torch.Tensor, bits: int) -> torch.Tensor:
    stream = ((data.long()[:, None] >> torch.arange(8)) & 1).to(torch.uint8).reshape(-1, bits)
    return (stream.long() << torch.arange(bits)).sum(1)


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` values packed at ``bits`` each."""
    return -(-count * bits // 8)


def index_bits(bound: int) -> int:
    """Bits that integers below ``bound`` need."""
    return max(1, (bound - 1).bit_length())


def index_tensors(model: nn.Module) -> dict[int, tuple[torch.Tensor, int]]:
    """The index tensors of compact layers that packing makes smaller, by storage address: (tensor, bits)."""
    found = {}
    for layer in compact_layers(model).values():
        for name, bound in layer.index_bounds().items():
            indices, bits = getattr(layer, name), index_bits(bound)
            if bits < 8 * indices.element_size():
                found[indices.data_ptr()] = (indices, bits)
    return found


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` rounded to int8 with one absmax scale per row (first dimension); and its int8 bytes."""
    q, scale = to_int8(t)
    return from_int8(q, scale, t.dtype), t.numel() + 4 * t.shape[0]


def int8_targets(model: nn.Module) -> list[torch.Tensor]:
    """The float weights int8 storage rounds, each once: every compact layer's float factors or, in a
    model without compact layers, the weights of the linears ``compress`` would target."""
    compact = compact_layers(model)
    if compact:
        tensors = [t for layer in compact.values() for t in layer.factor_tensors() if t.is_floating_point()]
    else:
        tensors = [model.get_submodule(name).weight for name in find_targets(model)]
    unique: dict[int, torch.Tensor] = {}
    for t in tensors:  # a basis shared by several layers is stored, and rounded, once
        unique.setdefault(t.data_ptr(), t)
    return list(unique.values())


@dataclass
class QuantReport:
    layers: int
    bytes_before: int  # the quantized layers' weights as they were (indices included)
    bytes_after: int  # the same as int8 values + fp32 row scales + bit-packed indices
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
    compact = compact_layers(model)
    targets = int8_targets(model)
    rounded = {t.data_ptr() for t in targets}
    before = after = 0
    for t in targets:
        before += tensor_bytes(t)
        q, size = int8_rows(t)
        t.copy_(q)
        after += size
    # the integer tensors of compact layers (indices) keep their values; storage packs their bits
    kept: dict[int, torch.Tensor] = {}
    for layer in compact.values():
        for t in layer.factor_tensors():
            if t.data_ptr() not in rounded:
                kept.setdefault(t.data_ptr(), t)
    packed = index_tensors(model)
    fixed = sum(tensor_bytes(t) for t in kept.values())
    fixed_after = sum(
        packed_size(t.numel(), packed[ptr][1]) if ptr in packed else tensor_bytes(t) for ptr, t in kept.items()
    )
    before += fixed
    after += fixed_after
    count = len(compact) or len(targets)
    return QuantReport(count, before, after, model_before, model_before - before + after)
