"""The decode path of dense-sparse layers: what it computes, when the gather backend takes it, how it is timed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import relative_error
from torch.nn import functional as F

from dsformer import kernels
from dsformer.errors import DsformerError
from dsformer.kernels import choice, decode, native
from dsformer.structures import DenseSparseLinear
from dsformer.structures.dense_sparse.layout import DenseSparseFactors, DenseSparseLayout

native_only = pytest.mark.skipif(not native.available(), reason="no native kernel for this CPU, or no C compiler")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels.json"


def coefficients(n: int, k: int, s: int, index_type: torch.dtype, seed: int = 0):
    """ELL indices (distinct per row) and values, and the dense ``C (n, k)`` they stand for."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.rand(n, k, generator=gen).argsort(dim=1)[:, :s].to(index_type)
    values = torch.randn(n, s, generator=gen)
    return indices, values, torch.zeros(n, k).scatter_(1, indices.long(), values)


CASES = {  # n vectors, k atoms, s entries, index type: uint8 (k <= 256), int16, int32; n not a multiple of 16
    "uint8": (37, 200, 9, torch.uint8),
    "int16": (50, 300, 7, torch.int16),
    "int32": (16, 40, 5, torch.int32),
    "wide": (300, 40, 3, torch.uint8),  # a column plan's indices name one of 300 inputs: int16
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [(1,), (1, 1), (3,), (2, 3)], ids=["one", "batch-of-one", "three", "2x3"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decode_rows_and_columns_compute_the_plain_product(native_variant, case, bias, tokens, dtype):
    """Factors and input in ``dtype``, sums in float32: against the float32 product of the same (rounded) numbers,
    within float32's error, or bfloat16's rounding of the output."""
    n, k, s, index_type = case
    d = 25  # bfloat16 rows of an odd length: the scalar tails run
    indices, values, c = coefficients(n, k, s, index_type)
    values = values.to(dtype)
    c = c.to(dtype).float()
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(k, d, generator=gen).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    # rows: y = C B x (+ bias over n)
    x = torch.randn(*tokens, d, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    want = x.float() @ (c @ basis.float()).T + (b.float() if bias else 0)
    plan = decode.row_plan(indices, values, basis, b)
    got = decode.rows(x, plan)
    assert got.dtype == dtype and relative_error(got.float(), want) < tolerance
    assert relative_error(decode.rows(x, plan, gelu=True).float(), F.gelu(want)) < tolerance
    # columns: y = Bᵀ Cᵀ x (+ bias over d), the input of n entries
    x = torch.randn(*tokens, n, generator=gen).to(dtype)
    b = torch.randn(d, generator=gen).to(dtype) if bias else None
    want = x.float() @ c @ basis.float() + (b.float() if bias else 0)
    got = decode.columns(x, decode.column_plan(indices, values, basis, b))
    assert got.shape == (*tokens, d) and got.dtype == dtype and relative_error(got.float(), want) < tolerance


@native_only
def test_decode_refuses_an_input_in_another_type_than_its_plan():
    indices, values, _ = coefficients(20, 30, 4, torch.uint8)
    plan = decode.row_plan(indices, values, torch.randn(30, 8))
    with pytest.raises(ValueError, match="bfloat16"):
        decode.rows(torch.randn(1, 8).bfloat16(), plan)


def test_column_plan_places_every_entry_once_in_groups_of_similar_bags():
    indices, values, c = coefficients(60, 40, 6, torch.uint8)
    basis = torch.randn(40, 8)
    plan = decode.column_plan(indices, values, basis)
    lanes = plan.atoms.reshape(-1, 16)
    assert sorted(a for a in plan.atoms.tolist() if a >= 0) == list(range(40))
    assert plan.groups == 3 and plan.starts[-1] * 16 == plan.index.numel()
    # each atom's entries are the column of C that it scales, lane by lane
    for g in range(plan.groups):
        rows = slice(int(plan.starts[g]), int(plan.starts[g + 1]))
        for lane, atom in enumerate(lanes[g].tolist()):
            if atom < 0:
                assert not plan.values[rows, lane].any()
                continue
            got = torch.zeros(60).index_add_(0, plan.index[rows, lane].long(), plan.values[rows, lane])
            assert torch.equal(got, c[:, atom])
    # atoms sorted by bag length, longest first: padding only evens out similar bags
    used = (c != 0).sum(0)
    firsts = [int(used[a]) for a in lanes[:, 0].tolist()]
    assert firsts == sorted(firsts, reverse=True)


def ds_layer(out: int, inp: int, k: int = 300, s: int = 12, seed: int = 0) -> DenseSparseLinear:
    layout = DenseSparseLayout(out, inp, k=k, s=s)
    gen = torch.Generator().manual_seed(seed)
    indices = torch.rand(layout.n, layout.k, generator=gen).argsort(dim=1)[:, : layout.s]
    basis, values = torch.randn(layout.k, layout.d, generator=gen), torch.randn(layout.n, layout.s, generator=gen)
    layer = DenseSparseLinear(DenseSparseFactors(layout, basis, values, indices), torch.randn(out, generator=gen))
    return layer.requires_grad_(False)


@native_only
@pytest.mark.parametrize("shape", [(600, 300), (300, 600)], ids=["rows", "columns"])
def test_gather_takes_the_decode_path_up_to_four_tokens_and_the_bags_above(shape):
    layer = ds_layer(*shape)
    kernels.use_backend(layer, "gather")
    slots = layer.__dict__.setdefault("_kernel_cache", {})
    bags = "indices" if layer.rows else "plan"
    for lead, path in [((1, 1), "decode_plan"), ((4,), "decode_plan"), ((5,), bags), ((1, 8), bags)]:
        slots.clear()
        x = torch.randn(*lead, shape[1])
        assert relative_error(layer(x), layer.reference(x)) < 1e-5
        assert set(slots) - {"coefficients"} == {path}, lead  # (the reference caches its dense coefficients)


@native_only
def test_the_decode_plan_follows_edited_factors_and_refuses_bad_indices():
    layer = ds_layer(600, 300)
    kernels.use_backend(layer, "gather")
    x = torch.randn(1, 300)
    layer(x)
    with torch.no_grad():
        layer.values.mul_(2.0)  # in place: the plan is rebuilt from the new values
        layer.bias.add_(1.0)
    assert relative_error(layer(x), layer.reference(x)) < 1e-5
    layer.indices[3, 2] = 300  # one past the basis: the kernel would read outside it
    with pytest.raises(DsformerError, match="reach outside its 300 atoms"):
        layer(x)


@native_only
def test_auto_times_decode_sizes_with_the_weights_evicted_and_prefill_sizes_hot(kernel_cache):
    if not native.evict([torch.ones(16)]):
        pytest.skip("this CPU cannot evict lines from its caches")
    layer = ds_layer(600, 300)
    kernels.use_backend(layer, "auto")
    for lead in [(1, 1), (1, 64)]:
        x = torch.randn(*lead, 300)
        assert relative_error(layer(x), layer.reference(x)) < 1e-5
    entries = json.loads(kernel_cache.read_text())
    cold = {key.split("|T=")[1].split("|")[0]: entry.get("cold", False) for key, entry in entries.items()}
    assert cold == {"1": True, "64": False}
    cpu = torch.device("cpu")
    assert choice.timed_cold(8, cpu) and not choice.timed_cold(9, cpu)
    assert not choice.timed_cold(1, torch.device("meta"))


def test_layer_tensors_finds_factors_bias_and_cached_plans():
    layer = ds_layer(600, 300)
    found = {t.data_ptr() for t in choice.layer_tensors(layer)}
    assert {layer.basis.data_ptr(), layer.values.data_ptr(), layer.indices.data_ptr(), layer.bias.data_ptr()} <= found
    if native.available():
        kernels.use_backend(layer, "gather")
        layer(torch.randn(1, 300))
        plan = layer.__dict__["_kernel_cache"]["decode_plan"][1]
        assert {plan.index.data_ptr(), plan.values.data_ptr()} <= {t.data_ptr() for t in choice.layer_tensors(layer)}


@native_only
@pytest.mark.parametrize("shape", [(600, 300), (300, 600)], ids=["rows", "columns"])
@pytest.mark.parametrize("lead", [(1, 1), (1, 8)], ids=["decode", "bags"])
def test_an_input_of_the_wrong_width_is_refused_on_every_path(shape, lead):
    layer = ds_layer(*shape)
    kernels.use_backend(layer, "gather")
    with pytest.raises(RuntimeError, match=f"a {shape[1]}-feature layer"):
        layer(torch.randn(*lead, shape[1] - 1))
    plan = decode.row_plan(layer.indices, layer.values, layer.basis) if layer.rows else None
    if plan is not None:
        with pytest.raises(ValueError, match="takes"):
            decode.rows(torch.randn(1, shape[1] + 1), plan)


@native_only
def test_a_basis_stored_transposed_is_read_as_the_rows_it_holds():
    layout = DenseSparseLayout(40, 24, k=30, s=5)
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(24, 30, generator=gen).T  # (k, d) as a transposed view: strides (1, 30)
    indices = torch.rand(40, 30, generator=gen).argsort(dim=1)[:, :5]
    layer = DenseSparseLinear(DenseSparseFactors(layout, basis, torch.randn(40, 5, generator=gen), indices))
    layer.requires_grad_(False)
    assert not layer.basis.is_contiguous()
    kernels.use_backend(layer, "gather")
    x = torch.randn(1, 24, generator=gen)
    assert relative_error(layer(x), layer.reference(x)) < 1e-5
