"""Execution backends: every path of every structure computes what the reference computes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, fast_structure, model_inputs, model_output, relative_error, requires_cuda
from torch.nn import functional as F

import dsformer
from dsformer import kernels
from dsformer.errors import DsformerError
from dsformer.kernels import choice, native
from dsformer.kernels.gather import column_plan
from dsformer.structures import DenseSparseLinear, backends, structure_config
from dsformer.structures.dense_sparse.layout import DenseSparseFactors, DenseSparseLayout

SHAPES = {"rows": (96, 64), "columns": (64, 96), "square": (48, 48)}


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    """Each test times into its own cache file."""
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels.json"


def layer_of(structure: str, shape: tuple[int, int], bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen)
    (factors,) = fast_structure(structure, 2.0).fit([w])
    b = torch.randn(shape[0], generator=gen) if bias else None
    return structure_config(structure).layer(factors, b).requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 5), (1, 1)], ids=["2d", "3d", "one-token"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("structure", ["ds", "svd", "nm"])
def test_every_backend_matches_the_reference(structure, shape, lead, bias):
    layer = layer_of(structure, shape, bias)
    x = torch.randn(*lead, shape[1], generator=torch.Generator().manual_seed(1))
    want = layer.reference(x)
    for name in backends.available(layer):
        kernels.use_backend(layer, name)
        got = layer(x)
        assert got.shape == (*lead, shape[0])
        # int8 rounds weights and activations: about 1% per product, two products for low rank
        assert relative_error(got, want) < (0.03 if name == "int8" else 1e-5), name


@pytest.mark.parametrize("structure", ["ds", "svd", "nm"])
def test_auto_never_takes_the_int8_path(structure, kernel_cache):
    layer = layer_of(structure, (96, 64))
    kernels.use_backend(layer, "auto")
    layer(torch.ones(2, 8, 64))
    assert "int8" in backends.available(layer) and "int8" not in json.dumps(json.loads(kernel_cache.read_text()))


def test_dense_int8_baseline_and_the_int8_path_stay_near_the_float_product():
    """Both round weights per row and activations per token: about 1% from the float product."""
    from dsformer.kernels.int8 import int8_linears

    layer = layer_of("ds", (96, 64))
    dense = torch.nn.Sequential(layer.merge())
    int8_linears(dense, ["0"])
    kernels.use_backend(layer, "int8")
    x = torch.randn(3, 64)
    reference = x @ layer.materialize().T + layer.bias
    assert relative_error(dense(x), reference) < 0.02 and relative_error(layer(x), reference) < 0.03


def test_gather_output_feeds_the_next_layer_without_a_copy():
    """A row layer returns a token-minor view; the column layer after it reads that storage as is."""
    up, down = layer_of("ds", (96, 64)), layer_of("ds", (64, 96), seed=1)
    kernels.use_backend(up, "gather")
    kernels.use_backend(down, "gather")
    x = torch.randn(2, 20, 64)  # sequences of 16 tokens or more: gathered one at a time
    hidden = torch.nn.functional.gelu(up(x))
    assert hidden.transpose(1, 2).is_contiguous()
    assert relative_error(down(hidden), down.reference(torch.nn.functional.gelu(up.reference(x)))) < 1e-5


def test_bench_finds_the_layers_whose_input_arrives_token_minor():
    from dsformer.harness.bench import token_minor_inputs

    up, down = layer_of("ds", (96, 64)), layer_of("ds", (64, 96), seed=1)
    x = torch.randn(2, 20, 64)
    for backend, minor in (("gather", {"down"}), ("dense", set())):
        kernels.use_backend(up, backend)
        kernels.use_backend(down, backend)
        assert token_minor_inputs({"up": up, "down": down}, lambda: down(F.gelu(up(x)))) == minor


def test_column_plan_groups_every_entry_by_atom():
    indices = torch.tensor([[0, 2], [2, 3], [0, 3]])
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    plan = column_plan(indices, values, k=5)
    assert plan.offsets.tolist() == [0, 2, 2, 4, 6, 6]  # atoms 1 and 4 are unused: empty groups; then the total
    assert plan.vectors.tolist() == [0, 2, 0, 1, 1, 2]
    assert plan.values.tolist() == [1.0, 5.0, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("structure", ["ds", "svd", "nm"])
def test_auto_times_once_per_token_bucket_and_caches_on_disk(structure, kernel_cache):
    layer = layer_of(structure, (96, 64))
    kernels.use_backend(layer, "auto")
    want = layer.reference(torch.ones(3, 64))
    assert relative_error(layer(torch.ones(3, 64)), want) < 1e-5
    layer(torch.ones(4, 64))  # same bucket as 3 tokens
    layer(torch.ones(9, 64))
    layer(torch.ones(2, 4, 64))  # 8 tokens in sequences of 4
    assert set(kernels.describe_choices(torch.nn.Sequential(layer))["0"]) == {"4/4", "16/16", "8/4"}
    saved = json.loads(kernel_cache.read_text())
    assert len(saved) == 3
    for entry in saved.values():
        assert entry["choice"] in backends.available(layer)
        assert entry["choice"] == min(entry["seconds"], key=entry["seconds"].get)
    # a fresh layer of the same layout reuses the file instead of timing again
    again = layer_of(structure, (96, 64))
    kernels.use_backend(again, "auto")
    saved_before = kernel_cache.stat().st_mtime_ns
    again(torch.ones(3, 64))
    assert kernel_cache.stat().st_mtime_ns == saved_before


def test_unreadable_cache_is_timed_again(kernel_cache):
    kernel_cache.parent.mkdir(parents=True)
    kernel_cache.write_text("{not json")
    layer = layer_of("ds", (96, 64))
    kernels.use_backend(layer, "auto")
    layer(torch.ones(2, 64))
    assert len(json.loads(kernel_cache.read_text())) == 1


def test_training_always_takes_the_reference_path():
    layer = layer_of("ds", (96, 64)).requires_grad_(True)
    kernels.use_backend(layer, "gather")
    layer(torch.randn(4, 64)).square().sum().backward()
    assert layer.values.grad is not None and layer.basis.grad is not None


def test_dense_path_follows_edited_factors():
    layer = layer_of("ds", (96, 64))
    kernels.use_backend(layer, "dense")
    x = torch.randn(3, 64)
    layer(x)
    layer.values.mul_(2)
    assert relative_error(layer(x), layer.reference(x)) < 1e-5


@pytest.mark.parametrize("backend", ["dense", "gather", "auto"])
def test_a_model_cast_inside_inference_mode_runs_on_every_backend(backend):
    """Its factors become inference tensors, which keep no version counter for the backends' caches to read."""
    layer = layer_of("ds", (96, 64))
    with torch.inference_mode():
        layer = layer.to(torch.float64)
        assert layer.basis.is_inference()
        kernels.use_backend(layer, backend)
        for tokens in (1, 3):
            x = torch.randn(tokens, 64, dtype=torch.float64)
            assert relative_error(layer(x), layer.reference(x)) < 1e-5


def test_unknown_backend_is_refused():
    with pytest.raises(
        DsformerError, match="unknown backend 'fast'; choose one of auto, dense, gather, int8, reference"
    ):
        kernels.use_backend(layer_of("ds", (96, 64)), "fast")
    with pytest.raises(DsformerError, match="has no backend 'gather'"):
        layer_of("svd", (96, 64)).run("gather", torch.ones(1, 64))


def test_use_backend_keeps_reference_where_a_path_is_missing():
    model = torch.nn.Sequential(layer_of("ds", (96, 64)), layer_of("svd", (64, 96)))
    assert kernels.use_backend(model, "gather") == 2
    assert [m.backend for m in model] == ["gather", "reference"]


def test_a_path_no_layer_has_is_an_error_that_lists_what_they_have():
    model = torch.nn.Sequential(layer_of("svd", (96, 64)), layer_of("svd", (64, 96)))
    lists = "none of the 2 compact layers has it here; they have dense, int8, reference"
    with pytest.raises(DsformerError, match=lists):
        kernels.use_backend(model, "gather")  # low rank declares no gather anywhere: no "needs" clause
    assert [m.backend for m in model] == ["reference", "reference"]  # nothing was changed


@pytest.mark.parametrize("backend", ["auto", "gather", "dense"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_compressed_models_agree_on_every_backend(make_model, name, backend):
    model = make_model(name)
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("ds")), progress=False)
    want = model_output(model)
    kernels.use_backend(model, backend)
    assert relative_error(model_output(model), want) < 1e-5


def test_gather_runs_under_torch_compile():
    model = TINY_MODELS["bert"]()
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("ds")), progress=False)
    want = model_output(model)
    kernels.use_backend(model, "auto")
    kernels.calibrate(model, [(2, 8)])  # the choices are fixed before tracing
    compiled = torch.compile(model)
    assert relative_error(model_output(compiled, model_inputs()), want) < 1e-5


@requires_cuda
@pytest.mark.parametrize("structure", ["ds", "svd", "nm"])
def test_backends_agree_on_cuda(structure):
    layer = layer_of(structure, (96, 64)).cuda()
    x = torch.randn(2, 5, 64, device="cuda")
    want = layer.reference(x)
    for name in [*backends.available(layer), "auto"]:
        kernels.use_backend(layer, name)
        # int8 rounds weights and activations (and pads to torch._int_mm's CUDA shapes)
        assert relative_error(layer(x), want) < (0.03 if name == "int8" else 1e-4), name


@pytest.mark.parametrize(
    "structure, shape, path, expected",
    [
        ("ds", (96, 64), "gather", lambda lay: lay["k"] * 64 + lay["s"] * 96),
        ("ds", (64, 96), "gather", lambda lay: lay["k"] * 64 + lay["s"] * 96),
        ("ds", (96, 64), "reference", lambda lay: lay["k"] * (64 + 96)),
        ("ds", (96, 64), "dense", lambda lay: 96 * 64),
        ("svd", (96, 64), "reference", lambda lay: lay["rank"] * (96 + 64)),
        ("nm", (96, 64), "reference", lambda lay: 96 * 64),
    ],
)
def test_work_counts_the_multiply_adds_of_each_path(structure, shape, path, expected):
    layer = layer_of(structure, shape)
    assert backends.backend_of(layer, path).work_for(layer) == expected(layer.layout())


def test_auto_keeps_no_dense_copy_unless_it_chose_dense():
    layer = layer_of("ds", (96, 64))
    kernels.use_backend(layer, "auto")
    choice = kernels.choose(layer, torch.ones(2, 4, 64))
    kept = set(layer.__dict__.get("_kernel_cache", {}))
    assert kept <= set(backends.backend_of(layer, choice).slots)
    assert ("dense" in kept) == (choice == "dense")


native_only = pytest.mark.skipif(
    not native.available(), reason="no native kernel variant for this CPU, or no C compiler"
)


@pytest.mark.parametrize(
    "lead", [(1, 1), (4, 1), (2, 3), (1, 40), (5,)], ids=["decode", "batch-decode", "short", "prefill", "2d"]
)
@pytest.mark.parametrize("shape", [(600, 300), (300, 600)], ids=["rows", "columns"])
def test_gather_reads_int16_indices_as_stored_at_every_token_count(shape, lead):
    """A basis of more than 256 atoms stores int16 indices; the gather reads them without a wider copy, from one
    token (a decode step) to a prefill, the short sequences of a batch decoding gathered as one."""
    out, inp = shape
    layout = DenseSparseLayout(out, inp, k=300, s=12)
    gen = torch.Generator().manual_seed(0)
    indices = torch.rand(layout.n, layout.k, generator=gen).argsort(dim=1)[:, : layout.s]
    basis, values = torch.randn(layout.k, layout.d, generator=gen), torch.randn(layout.n, layout.s, generator=gen)
    layer = DenseSparseLinear(DenseSparseFactors(layout, basis, values, indices), torch.randn(out, generator=gen))
    layer.requires_grad_(False)
    assert layer.indices.dtype == torch.int16
    x = torch.randn(*lead, inp, generator=gen)
    kernels.use_backend(layer, "gather")
    assert relative_error(layer(x), layer.reference(x)) < 1e-5
    cache = layer.__dict__["_kernel_cache"]  # what the kernel reads: (key, value) per slot
    if "decode_plan" in cache:  # fewer than 8 tokens: the decode path's plan
        assert x.numel() // inp < 8
        read = cache["decode_plan"][1].index
    else:
        read = cache["indices"][1] if layer.rows else cache["plan"][1].vectors
    assert read.dtype == torch.int16


@pytest.mark.parametrize("index_type", [torch.int32, torch.int16, torch.uint8], ids=str)
@pytest.mark.parametrize("row_len", [1, 16, 37, 64, 128, 200], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("sequences", [1, 3])
def test_native_bags_match_the_embedding_bag(native_variant, row_len, sequences, index_type):
    gen = torch.Generator().manual_seed(row_len)
    rows = torch.randn(sequences, 11, row_len, generator=gen)
    index = torch.randint(0, 11, (7, 4), generator=gen, dtype=torch.int32)
    weights = torch.randn(7, 4, generator=gen)
    want = torch.stack([F.embedding_bag(index, r, per_sample_weights=weights, mode="sum") for r in rows])
    index = index.to(index_type)  # read as stored: the kernel has a path per index type
    got = native.weighted_bags(rows, index.reshape(-1), weights.reshape(-1), bag_size=4)
    assert torch.allclose(got, want, atol=1e-5)
    # the same entries as variable bags, some of them empty (an atom no output uses)
    offsets = torch.tensor([0, 3, 3, 10, 28, 28], dtype=torch.int32)
    want = torch.stack(
        [
            F.embedding_bag(index.reshape(-1), r, offsets, per_sample_weights=weights.reshape(-1), mode="sum",
                            include_last_offset=True)
            for r in rows
        ]
    )  # fmt: skip
    got = native.weighted_bags(rows, index.reshape(-1), weights.reshape(-1), offsets=offsets)
    assert torch.allclose(got, want, atol=1e-5)
    assert not got[:, [1, 4]].any()
    # bias added in the kernel, output written token-major
    bias = torch.randn(5, generator=gen)
    got = native.weighted_bags(
        rows, index.reshape(-1), weights.reshape(-1), offsets=offsets, bias=bias, token_major=True
    )
    assert got.shape == (sequences, row_len, 5)
    assert torch.allclose(got, (want + bias[:, None]).mT, atol=1e-5)


@native_only
def test_native_bags_refuse_what_they_cannot_run():
    rows, index, weights = torch.randn(1, 4, 8), torch.zeros(4, dtype=torch.int32), torch.ones(4)
    with pytest.raises(ValueError, match="exactly one"):
        native.weighted_bags(rows, index, weights)
    with pytest.raises(ValueError, match="int32, int16 or uint8"):
        native.weighted_bags(rows, index.long(), weights, bag_size=2)
    with pytest.raises(ValueError, match="float32 CPU"):
        native.weighted_bags(rows.double(), index, weights, bag_size=2)
    with pytest.raises(ValueError, match="one length"):
        native.weighted_bags(rows, index, weights[:3], bag_size=2)
    with pytest.raises(ValueError, match="divide"):
        native.weighted_bags(rows, index, weights, bag_size=3)
    with pytest.raises(ValueError, match="entry count"):
        native.weighted_bags(rows, index, weights, offsets=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="one value per bag"):
        native.weighted_bags(rows, index, weights, bag_size=2, bias=torch.ones(3))


@pytest.mark.parametrize("backend", ["gather", "auto", "int8"])
def test_an_input_that_needs_gradients_gets_them_on_any_backend(backend):
    layer = layer_of("ds", SHAPES["rows"]).requires_grad_(False)  # frozen layer, trainable input
    kernels.use_backend(layer, backend)
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer(x).sum().backward()
    want = layer.materialize().sum(0).expand(2, 5, 64)
    assert x.grad is not None and torch.allclose(x.grad, want, atol=1e-4)


def test_gather_falls_back_to_the_embedding_bag(monkeypatch):
    layer = layer_of("ds", SHAPES["rows"])
    x = torch.randn(2, 5, 64)
    kernels.use_backend(layer, "gather")
    want = layer(x)
    monkeypatch.setattr(native, "available", lambda: False)
    assert torch.allclose(layer(x), want, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "gather", "dense"])
def test_fused_gelu_computes_the_same_model(backend):
    model = TINY_MODELS["bert"]()
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("ds")), progress=False)
    want = model_output(model)
    kernels.use_backend(model, backend)
    ups = [m.intermediate for m in model.modules() if hasattr(m, "intermediate")]
    assert ups and all(
        u.dense.activation == "gelu" and isinstance(u.intermediate_act_fn, torch.nn.Identity) for u in ups
    )
    assert relative_error(model_output(model), want) < 1e-5
    # merging puts the activation back where it came from; so does the reference backend
    merged = dsformer.merge(__import__("copy").deepcopy(model))
    assert all(
        type(m.intermediate.intermediate_act_fn).__name__ == "GELUActivation"
        for m in merged.modules()
        if hasattr(m, "intermediate")
    )
    assert relative_error(model_output(merged), want) < 1e-4
    kernels.use_backend(model, "reference")
    assert all(u.dense.activation is None for u in ups)
    assert relative_error(model_output(model), want) < 1e-5


def test_native_gelu_matches_torch(native_variant):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 9, 50, generator=gen) * 3
    index = torch.randint(0, 9, (6, 3), generator=gen, dtype=torch.int32)
    weights, bias = torch.randn(6, 3, generator=gen), torch.randn(6, generator=gen)
    plain = native.weighted_bags(rows, index.reshape(-1), weights.reshape(-1), bag_size=3, bias=bias)
    fused = native.weighted_bags(rows, index.reshape(-1), weights.reshape(-1), bag_size=3, bias=bias, gelu=True)
    assert (fused - F.gelu(plain)).abs().max() < 2e-6


@pytest.mark.parametrize("m, k, n", [(1, 24, 40), (5, 30, 37), (20, 16, 8)])
def test_int8_product_padded_to_cuda_shapes_is_the_same_product(m, k, n):
    from dsformer.kernels.int8 import _int_mm

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=gen, dtype=torch.int8)
    assert torch.equal(_int_mm(a, b, pad=True), a.int() @ b.int())


def test_a_path_whose_triton_kernel_cannot_build_is_dropped_and_other_errors_are_not(monkeypatch):
    layer = layer_of("ds", (96, 64))

    class OutOfResources(Exception):
        pass

    OutOfResources.__module__ = "triton.runtime.errors"  # what Triton raises when a config needs too much
    for error, dropped in ((OutOfResources("shared memory"), True), (ValueError("a bug"), False)):

        def run(path, x, error=error):
            raise error

        monkeypatch.setattr(layer, "run", run)
        if dropped:
            with pytest.warns(UserWarning, match="OutOfResources"):
                assert not choice._runs(layer, "triton", torch.randn(2, 64))
        else:
            with pytest.raises(ValueError):
                choice._runs(layer, "triton", torch.randn(2, 64))


def test_native_gelu_holds_over_the_whole_float_range(native_variant):
    import ctypes

    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([-1e30, -100.0, 0.0, 100.0, 1e30])])
    out = torch.empty_like(x)
    native._library().dsformer_gelu(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), x.numel())
    assert torch.isfinite(out).all() and (out - F.gelu(x)).abs().max() < 2e-6


CROSS = {"neon": ("aarch64-linux-gnu-gcc", "qemu-aarch64", ())}  # variant: compiler, emulator, extra flags


@pytest.mark.parametrize("name", list(CROSS))
def test_a_variant_for_another_cpu_matches_a_plain_loop_under_emulation(name, tmp_path):
    """The ARM64 build, cross-compiled and run under qemu (Debian: gcc-aarch64-linux-gnu, qemu-user)."""
    import shutil
    import subprocess
    from pathlib import Path

    compiler, emulator, flags = CROSS[name]
    if not (shutil.which(compiler) and shutil.which(emulator)):
        pytest.skip(f"needs {compiler} and {emulator}")
    source, isa = native.VARIANTS[name]
    check = Path(__file__).with_name("native") / "check_bags.c"
    program = tmp_path / "check"
    subprocess.run([compiler, "-O3", "-fopenmp", "-static", *isa, *flags, "-o", program, check, source, "-lm"],
                   check=True, capture_output=True)  # fmt: skip
    result = subprocess.run([emulator, program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.count(" ok\n") == 56 + 24  # weighted bags, then the decode path
