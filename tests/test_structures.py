"""Invariants of the weight structures (dense-sparse, low rank, N:M) on single matrices."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import relative_error, requires_cuda
from torch import nn

from dsformer import InfeasibleRatioError
from dsformer.errors import DsformerError
from dsformer.structures import (
    DenseSparseConfig,
    DenseSparseLinear,
    LowRankConfig,
    LowRankLinear,
    NMConfig,
    NMLinear,
)
from dsformer.structures.dense_sparse import max_ratio
from dsformer.structures.dense_sparse.layout import dense_coefficients
from dsformer.structures.dense_sparse.solver import alternate, initial_state, weight_vectors

SHAPES = {"tall": (96, 64), "wide": (64, 96), "square": (48, 48)}
RATIOS = [2.0, 2.8]


def ds(ratio: float | None = 2.0, **options) -> DenseSparseConfig:
    """A DS config with few rounds (fast), other options as given."""
    return DenseSparseConfig(ratio=ratio, **{"iters": 4, "search_iters": 2, "search_points": 3, **options})


CONFIGS = {"ds": ds, "svd": lambda ratio: LowRankConfig(ratio=ratio), "nm": lambda ratio: NMConfig(ratio=ratio)}
LAYERS = {"ds": DenseSparseLinear, "svd": LowRankLinear, "nm": NMLinear}


def weight(shape: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def union_of_subspaces(n: int, d: int, k: int, s: int, noise: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """``n`` vectors of dimension ``d``, each a combination of ``s`` of ``k`` shared atoms, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, d, generator=gen)
    coeffs = torch.zeros(n, k)
    support = torch.rand(n, k, generator=gen).argsort(-1)[:, :s]
    coeffs.scatter_(-1, support, torch.randn(n, s, generator=gen))
    return coeffs @ basis + noise * torch.randn(n, d, generator=gen)


def fit_one(config, w: torch.Tensor, **options):
    (factors,) = config.fit([w], **options)
    return factors


def fit_layer(structure: str, shape: tuple[int, int], ratio: float, seed: int = 0):
    w = weight(shape, seed)
    config = CONFIGS[structure](ratio)
    factors = fit_one(config, w)
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 1))
    return w, factors, config.layer(factors, bias)


def svd_error(w: torch.Tensor, rank: int) -> float:
    return relative_error(fit_one(LowRankConfig(rank=rank), w).reconstruct(), w)


grid = pytest.mark.parametrize(
    "structure,shape,ratio",
    [(st, SHAPES[sh], r) for st in CONFIGS for sh in SHAPES for r in RATIOS],
    ids=[f"{st}-{sh}-{r:g}" for st in CONFIGS for sh in SHAPES for r in RATIOS],
)


# --- every structure --------------------------------------------------------------------------


@grid
def test_compact_forward_equals_materialized_linear(structure, shape, ratio):
    _, _, layer = fit_layer(structure, shape, ratio)
    assert isinstance(layer, LAYERS[structure])
    x = torch.randn(5, 3, shape[1])
    with torch.no_grad():
        y = layer(x)
        expected = x @ layer.materialize().T + layer.bias
    assert y.shape == (5, 3, shape[0])
    assert relative_error(y, expected) <= 1e-5


@grid
def test_value_params_within_budget(structure, shape, ratio):
    _, factors, layer = fit_layer(structure, shape, ratio)
    out_f, in_f = shape
    budget = out_f * in_f / ratio
    assert layer.value_params() == factors.layout.value_params
    assert layer.value_params() <= budget
    if structure == "ds":  # the budget fixes s for the chosen k: at most one vector's worth is left over
        assert layer.value_params() > budget - (out_f + in_f)
    if structure == "svd":  # the rank is the largest the budget allows
        assert layer.value_params() > budget - (out_f + in_f)
    assert 0 < layer.weight_bytes()


@grid
def test_reconstruct_equals_layer_materialize(structure, shape, ratio):
    w, factors, layer = fit_layer(structure, shape, ratio)
    with torch.no_grad():
        dense = layer.materialize()
    assert dense.shape == shape
    assert torch.equal(factors.reconstruct(), dense)
    assert relative_error(dense, w) < 1.0


@grid
def test_merge_gives_plain_linear_with_materialized_weight(structure, shape, ratio):
    _, _, layer = fit_layer(structure, shape, ratio)
    dense = layer.merge()
    assert type(dense) is nn.Linear
    assert torch.equal(dense.weight, layer.materialize().detach())
    assert torch.equal(dense.bias, layer.bias.detach())


@grid
def test_from_layout_then_load_state_dict_reproduces_forward(structure, shape, ratio):
    _, _, layer = fit_layer(structure, shape, ratio)
    empty = type(layer).from_layout(shape, layer.layout(), bias=True, dtype=torch.float32)
    assert empty.layout() == layer.layout()
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(4, shape[1])
    with torch.no_grad():
        assert torch.equal(empty(x), layer(x))


@pytest.mark.parametrize("structure", list(CONFIGS))
def test_layer_without_bias(structure):
    w = weight((96, 64))
    config = CONFIGS[structure](2.0)
    layer = config.layer(fit_one(config, w), None)
    assert layer.bias is None
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert relative_error(layer(x), x @ layer.materialize().T) <= 1e-5
    empty = type(layer).from_layout((96, 64), layer.layout(), bias=False, dtype=torch.float32)
    empty.load_state_dict(layer.state_dict())
    assert layer.merge().bias is None


@pytest.mark.parametrize("structure", list(CONFIGS))
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0, -2.0, math.nan, math.inf])
def test_ratio_not_above_one_raises(structure, ratio):
    with pytest.raises(InfeasibleRatioError, match=r"> 1"):
        CONFIGS[structure](ratio).fit([weight((96, 64))])


@pytest.mark.parametrize("structure", list(CONFIGS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_ratio_above_feasible_max_raises_with_range(structure, shape):
    with pytest.raises(InfeasibleRatioError) as info:
        CONFIGS[structure](1000.0).fit([weight(shape)])
    message = str(info.value)
    assert f"{shape[0]}x{shape[1]}" in message
    found = re.search(r"feasible ratios for this shape are ([\d.]+) to ([\d.]+)", message)
    assert found, message
    assert 1.0 <= float(found.group(1)) < float(found.group(2)) < 1000


@pytest.mark.parametrize("structure", ["ds", "svd"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_max_ratio_is_the_boundary(structure, shape):
    """The largest feasible ratio (one basis vector, one coefficient per row) fits; just above it does not."""
    top = max_ratio(*shape)
    factors = fit_one(CONFIGS[structure](top), weight(shape))
    assert factors.layout.value_params == shape[0] + shape[1]
    with pytest.raises(InfeasibleRatioError, match=f"{top:.3g}"):
        CONFIGS[structure](top * 1.01).fit([weight(shape)])


# --- dense-sparse ---------------------------------------------------------------------------------


def test_ds_fixed_k_spends_the_budget_on_s():
    w = weight((96, 64))
    factors = fit_one(ds(2.0, k=30), w)
    assert (factors.layout.k, factors.layout.s) == (30, (96 * 64 // 2 - 30 * 64) // 96)
    assert factors.basis.shape == (30, 64) and factors.values.shape == (96, factors.layout.s)


@pytest.mark.parametrize(
    "options,k,s",
    [
        ({"ratio": None, "k": 32, "delta": 0.25}, 32, 8),
        ({"ratio": None, "gamma": 0.5, "delta": 0.25}, 32, 8),
        ({"ratio": None, "gamma": 0.25, "delta": 1.0}, 16, 16),
        ({"ratio": 2.0, "gamma": 0.5}, 32, (96 * 64 // 2 - 32 * 64) // 96),
    ],
)
def test_ds_gamma_delta_fix_the_layout(options, k, s):
    factors = fit_one(ds(**options), weight((96, 64)))
    assert (factors.layout.k, factors.layout.s) == (k, s)
    assert factors.indices.shape == (96, s)
    assert bool((factors.indices >= 0).all() and (factors.indices < k).all())


@pytest.mark.parametrize(
    "options,message",
    [
        ({"ratio": 2.0, "k": 5}, r"k must be in \d+\.\.\d+"),  # below the low-rank rank: budget left unused
        ({"ratio": 2.0, "k": 100}, r"k must be in 1\.\.64"),
        ({"ratio": None, "k": 16}, r"give a ratio, or both k"),
        ({"ratio": None, "gamma": 0.5}, r"give a ratio, or both k"),
    ],
)
def test_ds_bad_layout_options_raise(options, message):
    with pytest.raises(InfeasibleRatioError, match=message):
        ds(**options).fit([weight((96, 64))])


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_ds_fit_is_deterministic(shape):
    w = weight(shape)
    torch.manual_seed(1)
    a = fit_one(ds(2.0), w)
    torch.manual_seed(2)
    b = fit_one(ds(2.0), w)
    assert a.layout == b.layout
    for name in ("basis", "values", "indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _batch_errors(V, state) -> torch.Tensor:
    k = state.basis.shape[-2]
    return (V - dense_coefficients(state.indices, state.values, k) @ state.basis).pow(2).sum((-2, -1))


@pytest.mark.parametrize(
    "data,k,s",
    [
        ("random", 24, 8),
        ("random", 19, 19),  # s == k: low rank
        ("subspaces", 32, 8),
        ("subspaces", 40, 4),
    ],
)
def test_ds_error_never_increases_across_rounds(data, k, s):
    if data == "random":
        V = torch.stack([weight((96, 64), seed) for seed in range(3)])
    else:
        V = torch.stack([union_of_subspaces(96, 64, 32, 8, seed=seed) for seed in range(3)])
    state = initial_state(V, k, s)
    previous = _batch_errors(V, state)
    scale = V.pow(2).sum((-2, -1))
    for _ in range(8):
        state = alternate(V, state, 1)
        now = _batch_errors(V, state)
        assert bool((now <= previous + 1e-5 * scale).all()), (now, previous)
        # the error the fit tracks is the true error
        torch.testing.assert_close(state.error, now, rtol=1e-3, atol=1e-5 * float(scale.max()))
        assert state.indices.shape == (3, 96, s) and state.basis.shape == (3, k, 64)
        previous = now


def test_ds_beats_svd_on_union_of_subspaces():
    w = union_of_subspaces(96, 64, k=32, s=8)
    ds_factors = fit_one(ds(2.0, iters=10, search_points=4), w)
    svd_factors = fit_one(LowRankConfig(ratio=2.0), w)
    assert ds_factors.layout.value_params <= 96 * 64 / 2
    assert svd_factors.layout.value_params <= 96 * 64 / 2
    ds_err = relative_error(ds_factors.reconstruct(), w)
    svd_err = relative_error(svd_factors.reconstruct(), w)
    assert ds_err < 0.75 * svd_err, (ds_err, svd_err)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("ratio", RATIOS)
def test_ds_never_worse_than_svd_at_equal_budget(shape, ratio):
    """The search includes the s == k layout, which starts at the SVD optimum and never gets worse."""
    w = weight(shape)
    ds_err = relative_error(fit_one(ds(ratio), w).reconstruct(), w)
    svd_err = relative_error(fit_one(LowRankConfig(ratio=ratio), w).reconstruct(), w)
    assert ds_err <= svd_err * (1 + 1e-4), (ds_err, svd_err)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("rank", [4, 12])
def test_ds_with_s_equal_k_matches_svd(shape, rank):
    w = weight(shape)
    factors = fit_one(ds(None, k=rank, delta=1.0), w)
    assert factors.layout.s == factors.layout.k == rank
    assert factors.layout.value_params == rank * (shape[0] + shape[1])
    assert relative_error(factors.reconstruct(), w) == pytest.approx(svd_error(w, rank), rel=1e-4)


@pytest.mark.parametrize("data", ["random", "subspaces"])
def test_ds_warm_start_keeps_layout_and_does_not_increase_error(data):
    w = weight((96, 64)) if data == "random" else union_of_subspaces(96, 64, 32, 8)
    config = ds(2.0, iters=3)
    first = fit_one(config, w)
    second = fit_one(config, w, warm=[first])
    assert second.layout == first.layout
    assert relative_error(second.reconstruct(), w) <= relative_error(first.reconstruct(), w) * (1 + 1e-5)


def test_ds_layers_of_one_shape_fitted_together_match_single_fits():
    ws = [weight((96, 64), seed) for seed in range(3)]
    config = ds(2.0, k=24)
    together = config.fit(ws)
    for w, factors in zip(ws, together, strict=True):
        alone = fit_one(config, w)
        assert alone.layout == factors.layout
        torch.testing.assert_close(factors.reconstruct(), alone.reconstruct(), rtol=1e-4, atol=1e-4)


def test_ds_mixed_shapes_keep_their_order():
    ws = [weight((96, 64)), weight((64, 96)), weight((96, 64), 1), weight((48, 48))]
    out = ds(2.0).fit(ws)
    assert [tuple(f.reconstruct().shape) for f in out] == [tuple(w.shape) for w in ws]


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["tall", "wide"])
def test_ds_low_precision_input(dtype, tol, shape):
    w32 = weight(shape)
    config = ds(2.0, k=24)
    low = fit_one(config, w32.to(dtype))
    full = fit_one(config, w32)
    assert low.basis.dtype == low.values.dtype == dtype
    assert low.layout == full.layout
    assert relative_error(low.reconstruct(), w32) <= relative_error(full.reconstruct(), w32) + 5 * tol
    layer = config.layer(low, torch.zeros(shape[0], dtype=dtype))
    x = torch.randn(4, shape[1]).to(dtype)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == dtype
        assert relative_error(y, x.float() @ layer.materialize().float().T) <= tol


def test_ds_index_dtype_is_compact():
    layer = ds(2.0).layer(fit_one(ds(2.0), weight((96, 64))))
    assert layer.indices.dtype == torch.uint8
    assert layer.weight_bytes() == 4 * layer.value_params() + layer.indices.numel()


def test_ds_wide_basis_uses_int16_indices_and_round_trips():
    config = ds(None, k=260, delta=0.02, iters=1)
    factors = fit_one(config, weight((320, 300)))
    layer = config.layer(factors)
    assert layer.indices.dtype == torch.int16
    assert int(layer.indices.max()) < 260 and int(layer.indices.min()) >= 0
    empty = DenseSparseLinear.from_layout((320, 300), layer.layout(), bias=False, dtype=torch.float32)
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(2, 300)
    with torch.no_grad():
        assert torch.equal(empty(x), layer(x))
        assert relative_error(layer(x), x @ factors.reconstruct().T) <= 1e-5


def test_ds_search_points_one_is_a_valid_search():
    factors = fit_one(ds(2.0, search_points=1), weight((96, 64)))
    assert factors.layout.value_params <= 96 * 64 / 2


@pytest.mark.parametrize(
    "shape, ratio, multiple, aligned",
    [
        ((1536, 384), 2.8, 16, True),
        ((384, 384), 2.8, 32, True),
        ((384, 1536), 2.0, 16, True),
        ((96, 64), 2.0, 1, False),  # any k
        ((20, 12), 2.0, 64, False),  # no multiple of 64 fits: the search keeps every layout
    ],
)
def test_ds_k_multiple_aligns_the_searched_layouts(shape, ratio, multiple, aligned):
    layouts = DenseSparseConfig(ratio=ratio, k_multiple=multiple).candidates(*shape)
    assert layouts and all(lay.ratio >= ratio - 1e-9 for lay in layouts)
    assert all(lay.k % multiple == 0 for lay in layouts) == aligned or multiple == 1


@pytest.mark.parametrize("option", [{"k_multiple": 0}, {"iters": 0}, {"search_points": 0}, {"delta": 1.5}])
def test_ds_options_out_of_range_are_refused(option):
    with pytest.raises(DsformerError, match=next(iter(option))):
        DenseSparseConfig(ratio=2.0, **option)


def test_ds_fit_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_one(ds(2.0), weight((48, 48)))
    assert torch.equal(torch.rand(3), expected)


# --- N:M ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("ratio", RATIOS)
def test_nm_groups_keep_exactly_n_largest(shape, ratio):
    w = weight(shape)
    factors = fit_one(NMConfig(ratio=ratio), w)
    lay = factors.layout
    assert lay.m / lay.n >= ratio
    if ratio == 2.0:
        assert (lay.n, lay.m) == (2, 4)
    groups = factors.reconstruct().view(shape[0], shape[1] // lay.m, lay.m)
    assert bool(((groups != 0).sum(-1) == lay.n).all())
    original = w.view(shape[0], shape[1] // lay.m, lay.m).abs()
    kept = groups != 0
    smallest_kept = original.masked_fill(~kept, math.inf).amin(-1)
    largest_dropped = original.masked_fill(kept, -math.inf).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())
    assert torch.equal(groups[kept], w.view_as(groups)[kept])


@pytest.mark.parametrize("ratio,nm", [(2.0, (2, 4)), (4.0, (1, 4)), (1.5, (2, 3)), (1.3, (3, 4))])
def test_nm_picks_smallest_ratio_at_or_above_target(ratio, nm):
    factors = fit_one(NMConfig(ratio=ratio), weight((48, 48)))
    assert (factors.layout.n, factors.layout.m) == nm


@pytest.mark.parametrize("n,m", [(2, 5), (4, 4), (0, 4)])
def test_nm_bad_fixed_pattern_raises(n, m):
    with pytest.raises(InfeasibleRatioError, match="nm"):
        NMConfig(n=n, m=m).fit([weight((96, 64))])


def test_nm_input_size_without_group_raises():
    with pytest.raises(InfeasibleRatioError, match="37"):
        NMConfig(ratio=2.0).fit([weight((8, 37))])


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_importance_weighted_ds_fit_favours_the_important_rows(shape):
    w = weight(shape)
    importance = torch.exp(2 * torch.randn(shape[0], generator=torch.Generator().manual_seed(5)))
    config = DenseSparseConfig(ratio=2.0, iters=4, search_iters=1)
    (weighted,) = config.fit([w], importance=[importance])
    (plain,) = config.fit([w])

    def weighted_error(factors) -> float:
        return float((importance.sqrt()[:, None] * (factors.reconstruct() - w)).norm())

    assert weighted_error(weighted) < weighted_error(plain)
    # uniform importance is the plain fit; a warm start keeps the layout
    (uniform,) = config.fit([w], importance=[torch.full((shape[0],), 3.0)])
    assert torch.allclose(uniform.reconstruct(), plain.reconstruct(), atol=1e-5)
    (again,) = config.fit([w], warm=[weighted], importance=[importance])
    assert again.layout == weighted.layout and weighted_error(again) <= weighted_error(weighted) * 1.001


def test_importance_weighted_ds_fit_refuses_bad_weights():
    w = weight((12, 8))
    with pytest.raises(ValueError, match="positive, one per output row"):
        DenseSparseConfig(ratio=2.0).fit([w], importance=[torch.ones(8)])
    with pytest.raises(ValueError, match="positive"):
        DenseSparseConfig(ratio=2.0).fit([w], importance=[torch.zeros(12)])
    with pytest.raises(ValueError, match="share_basis"):
        DenseSparseConfig(ratio=2.0, share_basis=True).fit([w, w], importance=[torch.ones(12), None])


# --- low rank -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fwsvd_reduces_weighted_error(shape):
    w = weight(shape)
    importance = torch.exp(2 * torch.randn(shape[0], generator=torch.Generator().manual_seed(5)))
    config = LowRankConfig(ratio=2.0)
    (weighted,) = config.fit([w], importance=[importance])
    (plain,) = config.fit([w])
    assert weighted.layout == plain.layout

    def weighted_error(factors) -> float:
        return float((importance.sqrt()[:, None] * (factors.reconstruct() - w)).norm())

    assert weighted_error(weighted) < weighted_error(plain)
    # the plain SVD is still the best in the unweighted norm
    assert relative_error(plain.reconstruct(), w) <= relative_error(weighted.reconstruct(), w) + 1e-6


def test_svd_uniform_importance_is_plain_svd():
    w = weight((96, 64))
    (a,) = LowRankConfig(ratio=2.0).fit([w], importance=[torch.full((96,), 3.0)])
    (b,) = LowRankConfig(ratio=2.0).fit([w])
    torch.testing.assert_close(a.reconstruct(), b.reconstruct(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 48])
def test_svd_bad_rank_raises(rank):
    with pytest.raises(InfeasibleRatioError, match="rank must be in 1..47"):
        LowRankConfig(rank=rank).fit([weight((48, 48))])


# --- CUDA -----------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("structure", list(CONFIGS))
def test_cuda_fit_and_forward_match_cpu(structure):
    w = weight((96, 64))
    config = CONFIGS[structure](2.0)
    gpu = fit_one(config, w.cuda())
    cpu = fit_one(config, w)
    assert gpu.reconstruct().is_cuda
    assert relative_error(gpu.reconstruct().cpu(), w) <= relative_error(cpu.reconstruct(), w) * 1.01 + 1e-6
    layer = config.layer(gpu, torch.zeros(96, device="cuda"))
    x = torch.randn(4, 64, device="cuda")
    with torch.no_grad():
        assert relative_error(layer(x), x @ layer.materialize().T) <= 1e-4


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_ds_low_precision(dtype):
    w = weight((96, 64), dtype=dtype).cuda()
    factors = fit_one(ds(2.0), w)
    assert factors.basis.dtype == dtype and factors.basis.is_cuda
    assert relative_error(factors.reconstruct().float(), w.float()) < 1.0


def test_vectors_are_the_longer_side():
    assert weight_vectors(weight((96, 64))).shape == (96, 64)
    assert weight_vectors(weight((64, 96))).shape == (96, 64)
    assert weight_vectors(weight((48, 48), dtype=torch.float16)).dtype == torch.float32


def test_ds_search_cut_short_keeps_each_layers_best():
    """With fewer rounds than the halving needs, every layer still ends with its best candidate."""
    w = weight((96, 64), seed=3)
    config = DenseSparseConfig(ratio=2.0, iters=3, search_iters=3, search_points=4)
    (chosen,) = config.fit([w])
    V = weight_vectors(w)[None]
    errors = {
        lay.k: float(alternate(V, initial_state(V, lay.k, lay.s), 3).error[0]) for lay in config.candidates(96, 64)
    }
    assert chosen.layout.k == min(errors, key=errors.get)


@pytest.mark.parametrize(
    ("k", "dtype"),
    [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16), (32769, torch.int32)],
)
def test_indices_are_stored_in_the_narrowest_type_that_holds_them(k, dtype):
    from dsformer.structures.dense_sparse.layout import index_dtype

    assert index_dtype(k) == dtype and torch.iinfo(dtype).max >= k - 1


@pytest.mark.parametrize(
    "structure, sized_by_ratio",
    [
        (DenseSparseConfig(), True),
        (DenseSparseConfig(k=8), False),
        (DenseSparseConfig(gamma=0.5), False),
        (DenseSparseConfig(ratio=None, k=8, delta=0.25), False),
        (LowRankConfig(), True),
        (LowRankConfig(rank=4), False),
        (NMConfig(), False),
    ],
    ids=["ds", "ds-k", "ds-gamma", "ds-no-ratio", "svd", "svd-rank", "nm"],
)
def test_a_structure_is_sized_by_its_ratio_alone_unless_an_option_fixes_a_size(structure, sized_by_ratio):
    """What a global budget may choose for each layer (and what makes it a causal LM's default)."""
    assert structure.sized_by_ratio == sized_by_ratio
