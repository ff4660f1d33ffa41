"""The decode path of dense-sparse layers: a few tokens at a time, every factor read once per token.

At a decode step (one token per sequence) a layer's time is the time to stream its factors from
memory, not its multiply-adds. The bags kernel of :mod:`dsformer.kernels.gather` sums each
output's bag along one chain and goes through PyTorch for the basis product; this path is one
call of the compiled kernel (:mod:`dsformer.kernels.native`) per layer:

- row vectors: ``z = B x`` (one dot product per atom), then each output ``Σⱼ values · z[index]``
  over a plan that stores the ELL coefficients 16 outputs at a time, interleaved (entry ``j`` of
  output ``l`` at ``16 j + l``), so each step is one vector load of indices, one of values and one
  gather;
- column vectors: ``u = Cᵀ x``, each atom's bag of the inputs that use it (atoms sorted by bag
  length and grouped by 16, each group padded to its longest bag), then ``y = u B``.

Factors and input in float32 or bfloat16 (read as stored, summed in float32, the output rounded to
the input's type). The plans are copies of the coefficients in another order, built once per layer (the cost in memory
of this path). Tokens are taken one at a time (the factors stay in cache after the first), so the
path pays off for a few tokens; the ``gather`` backend uses it up to :data:`TOKENS`.

Example:
    >>> import torch
    >>> from dsformer.kernels import decode, native
    >>> basis, x = torch.randn(4, 3), torch.randn(1, 3)
    >>> indices, values = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3]], dtype=torch.uint8), torch.randn(4, 2)
    >>> want = x @ (torch.zeros(4, 4).scatter_(1, indices.long(), values) @ basis).T
    >>> got = decode.rows(x, decode.row_plan(indices, values, basis)) if native.available() else want
    >>> torch.allclose(got, want, atol=1e-5)
    True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from dsformer.kernels import gather, native

# inputs of at most this many tokens take the decode path: on SmolLM2's layer shapes with the factors streamed
# from memory it beat the bags path at 1, 2 and 4 tokens on every shape, and lost at 8 on a column layer
# (benchmarks/decode_layers.py; the tokens after the first find the factors in cache). A power of two: `auto`
# times a token count rounded up to one, so 5 to 7 tokens are timed, and run, on the bags path
TOKENS = 4
GROUP = 16  # outputs (rows) or atoms (columns) whose entries are interleaved


class RowPlan(NamedTuple):
    """A row layer's ELL coefficients, 16 outputs at a time: ``(ceil(N / 16), s, 16)``, padding entries 0;
    with the layer's basis and bias (detached views, not copies)."""

    index: torch.Tensor
    values: torch.Tensor
    outputs: int  # N
    index_type: int  # the kernel's code for the index dtype
    basis: torch.Tensor
    bias: torch.Tensor | None


class ColumnPlan(NamedTuple):
    """A column layer's coefficients by atom, 16 atoms at a time with bags padded to the group's longest."""

    index: torch.Tensor  # (E, 16): which input each entry reads
    values: torch.Tensor  # (E, 16)
    starts: torch.Tensor  # (groups + 1,) int32: each group's first row of E, then E
    atoms: torch.Tensor  # (groups * 16,) int32: the atom of each lane, -1 for padding lanes
    inputs: int  # N
    groups: int
    index_type: int
    basis: torch.Tensor  # (k, d)
    bias: torch.Tensor | None


DTYPES = (torch.float32, torch.bfloat16)  # of the factors and the input: sums are in float32 either way


def _factor(basis: torch.Tensor) -> torch.Tensor:
    """The basis as the kernel reads it: float32 or bfloat16 as stored (a view), any other float as float32."""
    basis = basis.detach()  # the kernel reads rows in order
    return (basis if basis.dtype in DTYPES else basis.float()).contiguous()


def _interleaved(t: torch.Tensor) -> torch.Tensor:
    n, s = t.shape
    groups = -(-n // GROUP)
    padded = torch.cat([t, t.new_zeros(groups * GROUP - n, s)])
    return padded.reshape(groups, GROUP, s).transpose(1, 2).contiguous()


def row_plan(
    indices: torch.Tensor, values: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None
) -> RowPlan:
    """The decode plan of a row layer: its ELL ``indices (N, s)`` (checked: the kernel trusts them), ``values``,
    ``basis (k, d)`` and ``bias``."""
    index, basis = _interleaved(native.readable(indices)), _factor(basis)
    return RowPlan(
        index, _interleaved(values.detach().to(basis.dtype)), indices.shape[0], native.INDEX_TYPES[index.dtype],
        basis, None if bias is None else bias.detach().float().contiguous(),
    )  # fmt: skip


def column_plan(
    indices: torch.Tensor, values: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None
) -> ColumnPlan:
    """The decode plan of a column layer: its ELL ``indices (N, s)`` (checked), ``values``, ``basis (k, d)``,
    ``bias``."""
    k, basis = basis.shape[0], _factor(basis)
    by_atom = gather.column_plan(indices, values.detach().to(basis.dtype), k)
    offsets = by_atom.offsets.long()
    lengths = offsets.diff()
    order = torch.argsort(lengths, descending=True, stable=True)  # similar lengths share a group: less padding
    groups = -(-k // GROUP)
    lanes = torch.cat([order, order.new_full((groups * GROUP - k,), -1)])
    longest = torch.cat([lengths[order], lengths.new_zeros(groups * GROUP - k)]).reshape(groups, GROUP).amax(1)
    starts = torch.cat([longest.new_zeros(1), longest.cumsum(0)])
    position = torch.empty_like(order)
    position[order] = torch.arange(k)
    atom = torch.repeat_interleave(torch.arange(k), lengths)  # the atom of each CSR entry
    row = starts[position[atom] // GROUP] + torch.arange(atom.numel()) - offsets[atom]
    lane = position[atom] % GROUP
    index = by_atom.vectors.new_zeros(int(starts[-1]), GROUP)
    vals = torch.zeros(int(starts[-1]), GROUP, dtype=basis.dtype)
    index[row, lane] = by_atom.vectors
    vals[row, lane] = by_atom.values
    return ColumnPlan(
        index, vals, starts.int(), lanes.int(), indices.shape[0], groups, native.INDEX_TYPES[index.dtype], basis,
        None if bias is None else bias.detach().float().contiguous(),
    )  # fmt: skip


def rows(x: torch.Tensor, plan: RowPlan, gelu: bool = False) -> torch.Tensor:
    """``x (..., d) -> (..., N)`` for a row layer, ``gelu`` applied before each output is stored; ``x`` in the
    plan's dtype."""
    # lean on purpose: at a decode step each microsecond here is paid by every layer
    k, d = plan.basis.shape
    if x.dtype != plan.basis.dtype or x.shape[-1] != d:
        raise ValueError(f"input {tuple(x.shape)} {x.dtype}; the plan takes {d} features in {plan.basis.dtype}")
    x = x.contiguous()
    y = x.new_empty((*x.shape[:-1], plan.outputs))
    failed = _library().dsformer_decode_rows(
        x.data_ptr(), x.numel() // d, plan.basis.data_ptr(), k, d, plan.index.data_ptr(), plan.index_type,
        plan.values.data_ptr(), plan.outputs, plan.index.shape[1], None if plan.bias is None else plan.bias.data_ptr(),
        gelu, y.data_ptr(), x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the decode kernel could not allocate its scratch")
    return y


def columns(x: torch.Tensor, plan: ColumnPlan) -> torch.Tensor:
    """``x (..., N) -> (..., d)`` for a column layer; ``x`` in the plan's dtype."""
    k, d = plan.basis.shape
    if x.dtype != plan.basis.dtype or x.shape[-1] != plan.inputs:
        raise ValueError(
            f"input {tuple(x.shape)} {x.dtype}; the plan takes {plan.inputs} features in {plan.basis.dtype}"
        )
    x = x.contiguous()
    y = x.new_empty((*x.shape[:-1], d))
    failed = _library().dsformer_decode_columns(
        x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], plan.index.data_ptr(), plan.index_type,
        plan.values.data_ptr(), plan.starts.data_ptr(), plan.atoms.data_ptr(), plan.groups, plan.basis.data_ptr(), k,
        d, None if plan.bias is None else plan.bias.data_ptr(), y.data_ptr(), x.dtype == torch.bfloat16,
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the decode kernel could not allocate its scratch")
    return y


_library = functools.cache(native.library)  # the variant is fixed for the process
