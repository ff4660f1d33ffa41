"""Model surgery on tiny BERT / MPNet / GPT-2: target selection, replacement, merge and the report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    STRUCTURE_NAMES,
    TINY_MODELS,
    default_targets,
    fast_structure,
    model_output,
    relative_error,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsformer import (
    CompressConfig,
    DsformerError,
    InfeasibleRatioError,
    Report,
    TargetError,
    compress,
    find_targets,
    merge,
)
from dsformer.structures import CompactLinear, DenseSparseLinear, LowRankConfig, LowRankLinear, NMConfig
from dsformer.surgery import compact_layers

MODELS = list(TINY_MODELS)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, Conv1D))]


def dense_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


# --- target selection -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_default_targets_are_the_block_linears(make_model, name):
    model = make_model(name)
    targets = find_targets(model)
    assert targets == default_targets(name)
    assert not any("pooler" in t or "lm_head" in t or "embed" in t for t in targets)


@pytest.mark.parametrize(
    "name,patterns,expected",
    [
        ("bert", "all-linear", default_targets("bert") + ["pooler.dense"]),
        ("mpnet", "all-linear", default_targets("mpnet") + ["pooler.dense"]),
        ("gpt2", "all-linear", default_targets("gpt2")),  # the tied output embedding is not a target
        ("bert", ["encoder.layer.1.attention.self.key"], ["encoder.layer.1.attention.self.key"]),
        ("bert", "query", ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]),
        (
            "bert",
            ["query", "self.value"],
            [f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "value") for i in (0, 1)],
        ),
        (
            "bert",
            [r"re:encoder\.layer\.1\..*dense"],
            [f"encoder.layer.1.{s}" for s in ("attention.output.dense", "intermediate.dense", "output.dense")],
        ),
        ("bert", ["pooler.dense"], ["pooler.dense"]),
        ("mpnet", ["re:.*attn\\.[qkv]"], [f"encoder.layer.{i}.attention.attn.{p}" for i in (0, 1) for p in "qkv"]),
        ("gpt2", ["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        ("gpt2", ["mlp.c_proj"], ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    ],
)
def test_target_patterns(make_model, name, patterns, expected):
    assert sorted(find_targets(make_model(name), patterns)) == sorted(expected)


@pytest.mark.parametrize(
    "name,exclude,removed",
    [
        ("bert", "query", ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]),
        ("bert", ["re:encoder\\.layer\\.0\\..*"], default_targets("bert")[:6]),
        ("bert", ["encoder.layer.1.output.dense"], ["encoder.layer.1.output.dense"]),
        ("gpt2", ["re:.*mlp.*"], [t for t in default_targets("gpt2") if ".mlp." in t]),
    ],
)
def test_exclude_modules(make_model, name, exclude, removed):
    targets = find_targets(make_model(name), exclude_modules=exclude)
    assert targets == [t for t in default_targets(name) if t not in removed]


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (
            {"target_modules": ["nosuchlayer"]},
            ["nosuchlayer", "matches no module", "encoder.layer.0.attention.self.query"],
        ),
        ({"target_modules": ["query", "nosuchlayer"]}, ["nosuchlayer"]),
        ({"target_modules": "re:.*nosuch.*"}, ["re:.*nosuch.*"]),
        ({"exclude_modules": ["nosuchlayer"]}, ["exclusion", "nosuchlayer"]),
        ({"target_modules": ["LayerNorm"]}, ["LayerNorm", "not a linear layer"]),
        ({"target_modules": ["embeddings"]}, ["embeddings", "not a linear layer"]),
        ({"target_modules": ["encoder.layer.0.attention"]}, ["BertAttention", "not a linear layer"]),
    ],
)
def test_bad_targets_raise_target_error(make_model, kwargs, words):
    with pytest.raises(TargetError) as info:
        find_targets(make_model("bert"), **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message
    assert not message.startswith("'")  # not KeyError's quoting
    assert isinstance(info.value, DsformerError) and isinstance(info.value, KeyError)


def test_suffix_matches_whole_name_parts_only(make_model):
    """``"ense"`` is not a suffix of ``...output.dense`` in the dotted sense, so it matches nothing."""
    with pytest.raises(TargetError, match="ense"):
        find_targets(make_model("bert"), ["ense"])


def test_unknown_override_raises_before_any_change(make_model):
    model = make_model("bert")
    before = copy.deepcopy(model.state_dict())
    config = CompressConfig(fast_structure("svd"), overrides={"nosuchlayer": NMConfig(ratio=2.0)})
    with pytest.raises(TargetError, match=r"override 'nosuchlayer' matches no target"):
        compress(model, config, progress=False)
    assert not compact_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_override_of_an_excluded_layer_raises(make_model):
    config = CompressConfig(fast_structure("svd"), exclude_modules="query", overrides={"query": NMConfig(ratio=2.0)})
    with pytest.raises(TargetError, match="override"):
        compress(make_model("bert"), config, progress=False)


def test_regex_over_whole_blocks_selects_their_linears(make_model):
    assert find_targets(make_model("bert"), [r"re:encoder\.layer\.0\..*"]) == default_targets("bert")[:6]


# --- replacement, running, merging -------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_compress_runs_and_merge_restores_plain_model(make_model, name, structure):
    model = make_model(name)
    original_types = {n: type(m) for n, m in model.named_modules()}
    dense_out = model_output(model)
    report = compress(model, CompressConfig(fast_structure(structure)), progress=False)

    layers = compact_layers(model)
    assert sorted(layers) == sorted(default_targets(name))
    assert [r.name for r in report.layers] == default_targets(name)
    for layer in layers.values():
        assert layer.structure == structure
        assert layer.source_kind == ("conv1d" if name == "gpt2" else "linear")
    assert not any(isinstance(m, (nn.Linear, Conv1D)) for n, m in model.named_modules() if n in layers)

    compact_out = model_output(model)
    assert compact_out.shape == dense_out.shape
    assert bool(torch.isfinite(compact_out).all())

    merged = merge(model)
    assert merged is model
    assert not compact_layers(model)
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    merged_out = model_output(model)
    assert relative_error(merged_out, compact_out) <= 1e-5


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_gpt2_conv1d_merge_restores_conv1d(make_model, structure):
    model = make_model("gpt2")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, Conv1D)}
    compress(model, CompressConfig(fast_structure(structure)), progress=False)
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (c_attn.out_features, c_attn.in_features) == (192, 64)  # Conv1D (64, 192) stores W transposed
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = c_attn(x)
    merge(model)
    for n, shape in shapes.items():
        conv = model.get_submodule(n)
        assert type(conv) is Conv1D and tuple(conv.weight.shape) == shape
    with torch.no_grad():
        assert relative_error(model.get_submodule("transformer.h.0.attn.c_attn")(x), expected) <= 1e-5
    # tied output embedding untouched
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_compact_layer_approximates_original_weight(make_model):
    model = make_model("bert")
    originals = {n: dense_weight(model.get_submodule(n)).detach().clone() for n in default_targets("bert")}
    report = compress(model, CompressConfig(fast_structure("ds")), progress=False)
    for row in report.layers:
        layer = model.get_submodule(row.name)
        error = relative_error(layer.materialize().detach(), originals[row.name])
        assert row.rel_error == pytest.approx(error, rel=1e-4)
        assert 0 < row.rel_error < 1


def test_only_named_targets_are_replaced(make_model):
    model = make_model("bert")
    compress(model, CompressConfig(fast_structure("ds"), target_modules=["query"]), progress=False)
    assert sorted(compact_layers(model)) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.attention.self.query",
    ]
    assert isinstance(model.get_submodule("encoder.layer.0.attention.self.key"), nn.Linear)


def test_overrides_give_per_layer_structures(make_model):
    model = make_model("bert")
    config = CompressConfig(
        fast_structure("ds"),
        overrides={
            r"re:.*intermediate\.dense": LowRankConfig(ratio=2.0),
            "encoder.layer.1.output.dense": NMConfig(ratio=2.0),
        },
    )
    report = compress(model, config, progress=False)
    kinds = {r.name: r.structure for r in report.layers}
    assert kinds["encoder.layer.0.intermediate.dense"] == kinds["encoder.layer.1.intermediate.dense"] == "svd"
    assert kinds["encoder.layer.1.output.dense"] == "nm"
    assert kinds["encoder.layer.0.output.dense"] == "ds"
    assert isinstance(model.get_submodule("encoder.layer.0.intermediate.dense"), LowRankLinear)
    assert isinstance(model.get_submodule("encoder.layer.0.attention.self.query"), DenseSparseLinear)
    assert list(kinds.values()).count("ds") == 9


@pytest.mark.parametrize(
    "config,error",
    [
        (CompressConfig(fast_structure("ds", 1000.0)), "infeasible"),
        (CompressConfig(NMConfig(ratio=1.0)), "> 1"),
        # every layer but the last is feasible: still nothing may be replaced
        (
            CompressConfig(
                fast_structure("svd"), overrides={"encoder.layer.1.output.dense": LowRankConfig(ratio=500.0)}
            ),
            "encoder.layer.1.output.dense",
        ),
        (
            CompressConfig(fast_structure("ds"), overrides={"encoder.layer.1.output.dense": NMConfig(n=3, m=7)}),
            "encoder.layer.1.output.dense",
        ),
    ],
)
def test_infeasible_config_raises_before_any_replacement(make_model, config, error):
    model = make_model("bert")
    before = copy.deepcopy(model.state_dict())
    out = model_output(model)
    with pytest.raises(InfeasibleRatioError, match=error) as info:
        compress(model, config, progress=False)
    assert "layer " in str(info.value)  # names the layer
    assert not compact_layers(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model_output(model), out)


def test_importance_drives_fwsvd(make_model):
    model = make_model("bert")
    name = "encoder.layer.0.attention.self.query"
    w = model.get_submodule(name).weight.detach().clone()
    importance = torch.exp(2 * torch.randn(64, generator=torch.Generator().manual_seed(3)))
    compress(
        model,
        CompressConfig(LowRankConfig(ratio=2.0), target_modules=[name]),
        importance={name: importance},
        progress=False,
    )
    (expected,) = LowRankConfig(ratio=2.0).fit([w], importance=[importance])
    torch.testing.assert_close(model.get_submodule(name).materialize().detach(), expected.reconstruct())


# --- report -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2.0, 2.8])
@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_report_json_and_ratios(make_model, name, structure, ratio):
    model = make_model(name)
    report = compress(model, CompressConfig(fast_structure(structure, ratio)), progress=False)
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) >= {"layers", "totals"}
    assert len(data["layers"]) == len(default_targets(name))
    for row in data["layers"]:
        assert {"name", "shape", "structure", "params", "bytes", "rel_error"} <= set(row)
        assert row["structure"] == structure
        out_f, in_f = row["shape"]
        layer = model.get_submodule(row["name"])
        assert (layer.out_features, layer.in_features) == (out_f, in_f)
        assert row["params"] == layer.value_params() <= out_f * in_f / ratio
        assert row["bytes"] == layer.weight_bytes() > 0
        assert 0 <= row["rel_error"] < 1
    totals = data["totals"]
    assert {"ratio_params", "ratio_bytes", "ratio_model_bytes", "seconds"} <= set(totals)
    assert totals["ratio_params"] >= ratio * (1 - 1e-9)
    if structure != "nm":  # DS and low rank spend (nearly) all of the budget
        assert totals["ratio_params"] <= ratio * 1.1
    assert 0 < totals["ratio_bytes"] <= totals["ratio_params"]
    assert totals["ratio_model_bytes"] > 1
    assert totals["seconds"] >= 0
    assert report.model_bytes_after < report.model_bytes_before

    again = Report.from_json(data)
    assert again.totals() == pytest.approx(report.totals())
    table = report.table()
    assert all(r.name in table for r in report.layers)


def test_report_ratio_counts_values_only_and_bytes_include_indices(make_model):
    model = make_model("bert")
    report = compress(model, CompressConfig(fast_structure("ds")), progress=False)
    dense = sum(r.dense_params for r in report.layers)
    assert report.ratio_params == pytest.approx(dense / sum(r.params for r in report.layers))
    assert report.ratio_bytes == pytest.approx(4 * dense / sum(r.bytes for r in report.layers))
    assert report.ratio_bytes < report.ratio_params  # the uint8 indices cost something


def test_compress_twice_finds_no_block_linears(make_model):
    model = make_model("bert")
    compress(model, CompressConfig(fast_structure("svd")), progress=False)
    with pytest.raises(TargetError, match="target_modules"):
        compress(model, CompressConfig(fast_structure("svd")), progress=False)


def test_compact_layers_are_compact_linear(make_model):
    model = make_model("mpnet")
    compress(model, CompressConfig(fast_structure("nm")), progress=False)
    assert all(isinstance(m, CompactLinear) for m in compact_layers(model).values())
