"""The fast backends of dense-sparse layers: the dense stage as a GEMM, the sparse stage on its own kernel.

- ``gather``: the sparse stage as weighted bags of rows (:mod:`dsformer.kernels.gather`: a compiled
  CPU kernel where it builds, else embedding-bags; CUDA too);
- ``int8``: the same with the basis GEMM in int8 (:mod:`dsformer.kernels.int8`; changes the numerics);
- ``triton``: the sparse stage as Triton kernels on CUDA (:mod:`dsformer.kernels.triton_ds`).

Each does ``k·d + s·N`` multiply-adds per token where the reference does ``k·(d + N)``, and applies a
fused GELU (row layers) before it stores each output.
"""

from __future__ import annotations

import functools

import torch

from dsformer import hardware
from dsformer.errors import DsformerError
from dsformer.kernels import decode, gather, native, triton_ds
from dsformer.kernels.int8 import int8_linear, int8_weight
from dsformer.structures import DenseSparseLinear
from dsformer.structures.backends import Backend, register_backend


def _sparse(name: str, layer: DenseSparseLinear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:  # the kernels index the input with the layer's own indices
        raise RuntimeError(f"a {layer.in_features}-feature layer got input of shape {tuple(x.shape)}")
    if name == "gather" and _decodes(layer, x):
        return _decode(layer, x, gelu)
    if name == "triton" and not triton_ds.runs_on(x):
        raise NotImplementedError(f"the triton backend needs CUDA and Triton (input on {x.device})")
    basis, values = layer.basis.detach(), layer.values.detach()  # inference only: the kernels skip autograd
    bias = layer.bias.detach() if layer.bias is not None else None
    plan = None
    if not layer.rows:
        # built (and its indices checked) once, not per call: the check reads every index
        plan = layer.cached("plan", lambda: gather.column_plan(_checked(layer), values, layer.k), layer.values,
                            layer.indices)  # fmt: skip
    if name == "triton":
        if layer.rows:
            return triton_ds.ds_rows(x, basis, layer.indices, values, bias, gelu=gelu)
        return triton_ds.ds_columns(x, plan, basis, bias)
    dense_stage = None
    if name == "int8":  # the basis GEMM in int8; the sparse stage stays a float gather
        # rows: Zᵀ = B Xᵀ; columns: Y = U B, that is U times the weight Bᵀ
        weight8 = layer.cached("int8_basis", lambda: int8_weight(basis if layer.rows else basis.T), layer.basis)
        dense_stage = functools.partial(int8_linear, weight=weight8)
    if layer.rows:
        indices = layer.cached("indices", lambda: native.readable(_checked(layer)), layer.indices)
        return gather.ds_rows(x, basis, indices, values, bias, dense_stage, gelu=gelu)
    return gather.ds_columns(x, plan, basis, bias, dense_stage)


def _decodes(layer: DenseSparseLinear, x: torch.Tensor) -> bool:
    """Whether ``x`` takes the decode path: a few float32 or bfloat16 tokens, in the layer's own type, on a CPU
    where the compiled kernel runs."""
    return (
        x.numel() <= decode.TOKENS * x.shape[-1]
        and x.dtype in decode.DTYPES
        and x.dtype == layer._parameters["basis"].dtype
        and x.device.type == "cpu"
        and native.available()
        and not torch.compiler.is_compiling()
    )


def _decode(layer: DenseSparseLinear, x: torch.Tensor, gelu: bool) -> torch.Tensor:
    # the plan is built (and its indices checked) once; it holds views of the basis and bias, so it is keyed on them
    params = layer._parameters  # not through nn.Module's attribute lookup: paid by every layer at every step
    values, basis, bias, indices = params["values"], params["basis"], params.get("bias"), layer._buffers["indices"]
    sources = (values, indices, basis) if bias is None else (values, indices, basis, bias)
    build = decode.row_plan if layer.rows else decode.column_plan
    plan = layer.cached("decode_plan", lambda: build(_checked(layer), values, basis, bias), *sources)
    return decode.rows(x, plan, gelu) if layer.rows else decode.columns(x, plan)  # GELU is fused into rows only


def _checked(layer: DenseSparseLinear) -> torch.Tensor:
    """The layer's indices, proved to name atoms of its basis: the compiled kernel reads rows with them
    unchecked. Run when a backend first builds its plan for the layer, not per call."""
    indices, atoms = layer.indices, layer.basis.shape[0]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= atoms):
        raise DsformerError(f"indices of a {layer.describe()} layer reach outside its {atoms} atoms: refused")
    return indices


def _backend(name: str, **options) -> Backend:
    def fused(layer: DenseSparseLinear, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        if activation == "gelu" and layer.rows:  # the kernel applies it before storing each output
            return _sparse(name, layer, x, gelu=True)
        return None

    def work(layer: DenseSparseLinear) -> int:  # the dense stage, then s multiply-adds per output vector
        lay = layer.layout_shapes
        return lay.k * lay.d + lay.s * lay.n

    return Backend(name, run=functools.partial(_sparse, name), fused=fused, work=work, **options)


def _on_gpu(layer: DenseSparseLinear) -> bool:
    return layer.basis.device.type == "cuda" and hardware.triton_installed()


register_backend(DenseSparseLinear, _backend("gather", slots=("indices", "plan", "decode_plan")))
register_backend(DenseSparseLinear, _backend("int8", exact=False, slots=("indices", "plan", "int8_basis")))
register_backend(
    DenseSparseLinear,
    _backend("triton", available=_on_gpu, needs="a CUDA device and Triton installed", slots=("plan",)),
)
