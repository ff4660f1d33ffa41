"""The Triton kernels of DS's sparse stage (``dsformer.kernels.triton_ds``) against plain products.

Without a GPU they run in Triton's CPU interpreter (slow, so the shapes are tiny); on a GPU the
same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fast_structure, relative_error, requires_cuda
from torch.nn import functional as F

from dsformer import kernels
from dsformer.errors import DsformerError
from dsformer.hardware import triton_installed, triton_interpreting
from dsformer.kernels import triton_ds
from dsformer.kernels.gather import column_plan
from dsformer.structures import DenseSparseLinear, backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float16 stores Z (rows) or the output in half precision: about 1e-3 relative
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


# conftest sets TRITON_INTERPRET=1 on machines without a GPU, before anything imports Triton
pytestmark = [
    pytest.mark.skipif(not triton_installed(), reason="Triton is not installed"),
    pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(), reason="no GPU and no Triton interpreter"),
]


def random_ell(n: int, k: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(n)]).to(torch.int16)
    return indices, torch.randn(n, s, generator=gen)


def dense_weight(indices: torch.Tensor, values: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    k = basis.shape[0]
    return torch.zeros(indices.shape[0], k).scatter_(1, indices.long(), values.float()) @ basis.float()


CASES = {  # name: (tokens, N, d, k, s); 19 tokens take two token blocks of 16, N = 37 a partial block
    "decode": (1, 40, 24, 12, 5),
    "short": (7, 33, 20, 16, 9),
    "blocks": (19, 37, 30, 8, 3),
}


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("bias, gelu", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_row_kernel_matches_the_product(case, bias, gelu, dtype):
    tokens, n, d, k, s = case
    indices, values = random_ell(n, k, s)
    gen = torch.Generator().manual_seed(1)
    basis, x, b = torch.randn(k, d, generator=gen), torch.randn(tokens, d, generator=gen), torch.randn(n, generator=gen)
    want = x @ dense_weight(indices, values, basis).T + (b if bias else 0)
    want = F.gelu(want) if gelu else want
    on = {"device": DEVICE, "dtype": dtype}
    got = triton_ds.ds_rows(
        x.to(**on), basis.to(**on), indices.to(DEVICE), values.to(**on), b.to(**on) if bias else None, gelu=gelu
    )
    assert got.dtype == dtype and got.shape == (tokens, n)
    assert relative_error(got.float().cpu(), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_column_kernel_matches_the_product(case, bias, dtype):
    tokens, n, d, k, s = case  # the weight is (C B)ᵀ: n inputs, d outputs
    indices, values = random_ell(n, k, s)
    gen = torch.Generator().manual_seed(2)
    basis, x, b = torch.randn(k, d, generator=gen), torch.randn(tokens, n, generator=gen), torch.randn(d, generator=gen)
    want = x @ dense_weight(indices, values, basis) + (b if bias else 0)
    on = {"device": DEVICE, "dtype": dtype}
    plan = column_plan(indices.to(DEVICE), values.to(**on), k)
    got = triton_ds.ds_columns(x.to(**on), plan, basis.to(**on), b.to(**on) if bias else None)
    assert got.dtype == dtype and got.shape == (tokens, d)
    assert relative_error(got.float().cpu(), want) < TOLERANCE[dtype]


def test_unused_atoms_and_empty_inputs():
    indices = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.int16, device=DEVICE)  # atoms 2, 3 unused
    values, basis = torch.randn(3, 2, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    plan = column_plan(indices, values, 4)
    x = torch.randn(2, 3, device=DEVICE)
    want = x @ dense_weight(indices.cpu(), values.cpu(), basis.cpu()).to(DEVICE)
    assert relative_error(triton_ds.ds_columns(x, plan, basis, None), want) < 1e-5
    assert triton_ds.ds_rows(torch.randn(0, 5, device=DEVICE), basis, indices, values, None).shape == (0, 3)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["rows", "columns"])
def test_layer_triton_path_matches_its_reference(shape):
    gen = torch.Generator().manual_seed(0)
    (factors,) = fast_structure("ds", 2.0).fit([torch.randn(*shape, generator=gen)])
    layer = DenseSparseLinear(factors, torch.randn(shape[0], generator=gen)).requires_grad_(False).to(DEVICE)
    x = torch.randn(2, 3, shape[1], generator=gen).to(DEVICE)
    want = layer.reference(x)
    assert relative_error(layer.run("triton", x), want) < 1e-5
    layer.activation, layer.backend = "gelu", "triton"  # the kernel applies it before storing each output
    assert relative_error(layer(x), F.gelu(want)) < 1e-5


def test_triton_path_is_refused_where_it_cannot_run(monkeypatch):
    """Off CUDA and outside the interpreter the path raises, so calibration skips it; CPU layers never list it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (factors,) = fast_structure("ds", 2.0).fit([torch.randn(96, 64)])
    layer = DenseSparseLinear(factors).requires_grad_(False)
    assert "triton" not in backends.available(layer)
    with pytest.raises(NotImplementedError, match="CUDA"):
        layer.run("triton", torch.randn(2, 64))
    # asked by name: an error that says what the path needs, not a silent reference run
    with pytest.raises(DsformerError, match="it needs a CUDA device and Triton installed"):
        kernels.use_backend(layer, "triton")


@requires_cuda
def test_auto_on_cuda_times_the_triton_path():
    (factors,) = fast_structure("ds", 2.0).fit([torch.randn(96, 64)])
    layer = DenseSparseLinear(factors).requires_grad_(False).cuda().half()
    assert "triton" in backends.available(layer)
    x = torch.randn(1, 64, device="cuda", dtype=torch.half)
    want = layer.reference(x)
    kernels.use_backend(layer, "auto")
    assert relative_error(layer(x).float(), want.float()) < 5e-3


def test_gpu_layer_benchmark_runs(tmp_path):
    """The decode benchmark for a lent GPU runs end to end (here in the interpreter, on a tiny layer)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_layer.py"
    spec = importlib.util.spec_from_file_location("gpu_layer", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "layer.json"
    argv = ["--out", "48", "--in", "32", "--layouts", "2", "--tokens", "1", "--dtype", "float32", "--device", DEVICE]
    script.main([*argv, "--calls", "2", "--repeats", "2", "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["relative_error"] < 1e-5 and r["byte_limit"] > 1 for r in rows)


@pytest.mark.parametrize(
    "kernel, block_t, kept",
    [("rows", 1, 6), ("rows", 4, 6), ("rows", 8, 4), ("rows", 16, 5), ("columns", 1, 8), ("columns", 16, 3)],
)
def test_each_token_block_tunes_over_tiles_that_fit_in_registers(kernel, block_t, kept):
    from dsformer.kernels import triton_kernels as tk

    a, b, tiles, select = {
        "rows": ("BLOCK_N", "BLOCK_S", tk.ROW_TILES, tk.for_rows),
        "columns": ("BLOCK_A", "BLOCK_B", tk.COLUMN_TILES, tk.for_columns),
    }[kernel]
    chosen = select(tk.configs(tiles, a, b), block_t)
    assert len(chosen) == kept
    assert all(block_t * c.kwargs[a] * c.kwargs[b] <= 64 * 32 * c.num_warps for c in chosen)
    assert set(getattr(tk, kernel)) == set(tk.TOKEN_BLOCKS) >= {triton_ds._token_block(t) for t in range(1, 70)}
    # 16 and 4,096 tokens share the token block of 16 but are tuned apart
    assert "T_TUNE" in getattr(tk, kernel)[16].keys
    assert [triton_ds._tuning_bucket(t) for t in (1, 2, 3, 16, 17, 4096)] == [1, 2, 4, 16, 32, 4096]


def test_kernels_are_compiled_where_there_is_a_gpu():
    # the interpreter would pass every test on a GPU too, and measure nothing
    assert DEVICE == "cpu" or not triton_interpreting()
