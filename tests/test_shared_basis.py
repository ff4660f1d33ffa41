"""DS with one basis shared by every target layer of a shape (``share_basis`` / ``--method ds-shared``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, model_output, relative_error

import dsformer
from dsformer import kernels
from dsformer.errors import CheckpointError
from dsformer.quantize import quantize_int8
from dsformer.stf import STF
from dsformer.structures import DenseSparseConfig
from dsformer.structures.dense_sparse import DenseSparseLinear
from dsformer.surgery import compact_layers


def shared(ratio: float = 2.0) -> DenseSparseConfig:
    return DenseSparseConfig(ratio=ratio, iters=3, search_iters=1, search_points=2, share_basis=True)


def bases(model) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, layer in compact_layers(model).items():
        groups.setdefault(layer.basis.data_ptr(), []).append(name)
    return groups


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_shared_fit_is_one_basis_and_meets_the_group_budget(shape):
    weights = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    factors = shared().fit(weights)
    assert all(f.basis is factors[0].basis for f in factors)
    lay = factors[0].layout
    assert (lay.out_features, lay.in_features) == shape
    group_params = lay.k * lay.d + 3 * lay.s * lay.n
    assert group_params <= 3 * shape[0] * shape[1] / 2.0
    for w, f in zip(weights, factors, strict=True):
        assert relative_error(f.reconstruct(), w) < 1.0


def test_shared_fit_refuses_mixed_shapes():
    with pytest.raises(ValueError, match="one shape"):
        shared().fit([torch.randn(8, 4), torch.randn(4, 8)])


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_compress_ties_one_basis_per_shape_and_counts_it_once(make_model, name):
    model = make_model(name)
    report = dsformer.compress(model, dsformer.CompressConfig(shared()), progress=False)
    groups = bases(model)
    shapes = {(layer.out_features, layer.in_features) for layer in compact_layers(model).values()}
    assert len(groups) == len(shapes)
    owners = [layer for layer in compact_layers(model).values() if "basis" not in layer.borrowed]
    assert len(owners) == len(groups)
    assert report.totals()["ratio_params"] == pytest.approx(2.0, abs=0.02)
    unique = {p.data_ptr(): p.numel() for layer in compact_layers(model).values() for p in (layer.basis, layer.values)}
    assert report.totals()["params"] == sum(unique.values())


def test_saved_model_loads_with_its_bases_tied(tmp_path, make_model):
    model = make_model("bert")
    dsformer.compress(model, dsformer.CompressConfig(shared()), progress=False)
    dsformer.save(model, tmp_path / "m")
    loaded = dsformer.load(tmp_path / "m")
    assert torch.equal(model_output(loaded), model_output(model))
    assert sorted(map(sorted, bases(loaded).values())) == sorted(map(sorted, bases(model).values()))


def saved_shared(tmp_path, make_model) -> tuple:
    """A tiny BERT with shared bases, saved: its dsformer.json and what it holds."""
    model = make_model("bert")
    dsformer.compress(model, dsformer.CompressConfig(shared()), progress=False)
    dsformer.save(model, tmp_path / "m")
    meta_file = tmp_path / "m" / "dsformer.json"
    return meta_file, json.loads(meta_file.read_text())


@pytest.mark.parametrize("tied", [["basis"], {"basis": 3}, "encoder.layer.0.attention.self.query", {"basis": "nosuch"}])
def test_a_damaged_tie_is_refused(tmp_path, make_model, tied):
    meta_file, meta = saved_shared(tmp_path, make_model)
    name = next(n for n, spec in meta["layers"].items() if "tied" in spec)
    meta["layers"][name]["tied"] = tied
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tied|shared"):
        dsformer.load(tmp_path / "m")


def test_a_tie_to_a_basis_of_another_size_is_refused(tmp_path, make_model):
    """A layer tied to a smaller basis would keep indexing up to its own k: refused before any kernel runs."""
    meta_file, meta = saved_shared(tmp_path, make_model)
    name = next(n for n, spec in meta["layers"].items() if "tied" in spec)
    meta["layers"][name]["layout"].update(k=meta["layers"][name]["layout"]["k"] - 1, s=1)  # a basis one atom short
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be shared"):
        dsformer.load(tmp_path / "m")


def test_a_layout_of_another_shape_than_its_module_is_refused(tmp_path, make_model):
    meta_file, meta = saved_shared(tmp_path, make_model)
    meta["layers"]["encoder.layer.0.attention.self.query"]["shape"] = [64, 128]  # the module is 64x64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit BertModel"):
        dsformer.load(tmp_path / "m")


def test_stf_trains_a_shared_basis_and_finalizes_it_tied(make_model):
    model = make_model("bert")
    stf = STF.wrap(model, shared())
    model.train()
    model(**{"input_ids": torch.randint(2, 100, (2, 8))}).last_hidden_state.sum().backward()
    with torch.no_grad():
        for layer, _ in stf.layers.values():
            layer.weight -= 1e-2 * layer.weight.grad
    stf.refresh()
    report = stf.finalize()
    model.eval()
    assert all(isinstance(m, DenseSparseLinear) for m in compact_layers(model).values())
    assert len(bases(model)) == 3  # one per weight shape: attention 64x64, FFN 128x64 and 64x128
    assert report.totals()["ratio_params"] == pytest.approx(2.0, abs=0.05)


def test_backends_and_int8_handle_a_shared_basis(make_model):
    model = make_model("bert")
    dsformer.compress(model, dsformer.CompressConfig(shared()), progress=False)
    want = model_output(model)
    kernels.use_backend(model, "gather")
    assert relative_error(model_output(model), want) < 1e-5
    before = sum(layer.weight_bytes() for layer in compact_layers(model).values())
    report = quantize_int8(model)
    assert report.bytes_before == before
