"""Int8 rounding of weights per row, alone and on top of every structure."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, fast_structure, model_output, relative_error
from safetensors.torch import load_file, save_file

import dsformer
from dsformer.checkpoint import read_meta
from dsformer.errors import CheckpointError
from dsformer.files import sha256
from dsformer.quantize import int8_rows, pack_bits, packed_size, quantize_int8, unpack_bits
from dsformer.surgery import compact_layers


@pytest.mark.parametrize("shape", [(8, 5), (3, 4, 2), (1, 7)])
def test_int8_rows_is_within_half_a_step_of_every_value(shape):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    rounded, size = int8_rows(t)
    step = t.reshape(shape[0], -1).abs().amax(1) / 127
    assert ((rounded - t).reshape(shape[0], -1).abs() <= step[:, None] / 2 + 1e-7).all()
    assert size == t.numel() + 4 * shape[0]
    levels = (rounded.reshape(shape[0], -1) / step[:, None]).round()
    assert levels.abs().max() <= 127


def test_int8_rows_keeps_a_zero_row():
    rounded, _ = int8_rows(torch.zeros(2, 3))
    assert torch.equal(rounded, torch.zeros(2, 3))


@pytest.mark.parametrize("structure", [None, "ds", "svd", "nm"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_quantize_counts_int8_bytes_and_changes_outputs_little(make_model, name, structure):
    model = make_model(name)
    if structure is not None:
        dsformer.compress(model, dsformer.CompressConfig(fast_structure(structure)), progress=False)
    before = model_output(model)
    report = quantize_int8(model)
    assert report.layers == 8 if name == "gpt2" else report.layers == 12
    assert 3.0 < report.ratio <= 4.0 or structure in ("ds", "nm")  # indices stay as they are
    assert report.bytes_after < report.bytes_before
    assert report.model_bytes_before - report.model_bytes_after == report.bytes_before - report.bytes_after
    assert 0 < relative_error(model_output(model), before) < 0.05
    for layer in compact_layers(model).values():  # cached products follow the rounded factors
        x = torch.randn(3, layer.in_features)
        assert relative_error(layer(x), x @ layer.materialize().T + layer.bias) < 1e-5


# ---------------------------------------------------------------- int8 storage


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 9, 12, 16])
@pytest.mark.parametrize("count", [0, 1, 5, 64])
def test_bit_packing_round_trips(bits, count):
    values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("structure", ["ds", "nm"])
def test_a_saved_index_out_of_range_is_refused(make_model, tmp_path, structure):
    model = make_model("bert")
    dsformer.compress(model, dsformer.CompressConfig(fast_structure(structure)), progress=False)
    layer = next(iter(compact_layers(model).values()))
    layer.indices[0, 0] = layer.index_bounds()["indices"]  # one past the last atom (or group position)
    folder = dsformer.save(model, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="outside 0"):
        dsformer.load(folder)
    with pytest.raises(ValueError, match="do not fit"):  # packed storage has no room for it
        dsformer.save(model, tmp_path / "bad-int8", int8=True)
    assert not (tmp_path / "bad-int8").exists()


def test_saved_indices_of_another_integer_type_are_refused(make_model, tmp_path):
    """An index stored wider than the layer holds it would wrap into range on load: refused before."""
    model = make_model("bert")
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("ds")), progress=False)
    folder = dsformer.save(model, tmp_path / "m")
    name, layer = next(iter(compact_layers(model).items()))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[f"{name}.indices"] = layer.indices.long() + 256  # uint8 on the layer: would wrap to the same values
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((folder / "dsformer.json").read_text())
    meta["weights"].update(
        bytes=(folder / "model.safetensors").stat().st_size, sha256=sha256(folder / "model.safetensors")
    )
    (folder / "dsformer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is torch.int64 but the model expects torch.uint8"):
        dsformer.load(folder)


@pytest.mark.parametrize("structure, bits", [("ds", 9), ("nm", 2)])
def test_int8_folder_packs_indices_to_the_bits_they_need(make_model, tmp_path, structure, bits):
    model = make_model("bert")
    if structure == "ds":  # more than 256 atoms: int16 indices in memory, 9 bits on disk
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(hidden_size=320, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=640, vocab_size=50)).eval()  # fmt: skip
        config = dsformer.DenseSparseConfig(ratio=1.3, k=300, iters=1, search_iters=1)
        dsformer.compress(model, dsformer.CompressConfig(config, target_modules=["intermediate.dense"]), progress=False)
    else:
        dsformer.compress(model, dsformer.CompressConfig(fast_structure("nm")), progress=False)
    folder = dsformer.save(model, tmp_path / "int8", int8=True)
    packed = read_meta(folder)["packed"]
    assert packed and all(spec["bits"] == bits for spec in packed.values())
    loaded = dsformer.load(folder)
    for name, layer in compact_layers(model).items():
        assert torch.equal(compact_layers(loaded)[name].indices, layer.indices)


@pytest.mark.parametrize("structure", [None, "ds", "svd", "nm", "ds-shared"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_int8_folder_is_smaller_and_loads_as_the_rounded_model(make_model, tmp_path, name, structure):
    model = make_model(name)
    if structure == "ds-shared":
        config = dsformer.DenseSparseConfig(ratio=2.0, iters=2, search_iters=1, share_basis=True)
        dsformer.compress(model, dsformer.CompressConfig(config), progress=False)
    elif structure is not None:
        dsformer.compress(model, dsformer.CompressConfig(fast_structure(structure)), progress=False)
    plain = dsformer.save(model, tmp_path / "fp32")
    small = dsformer.save(model, tmp_path / "int8", int8=True)  # rounds on the way: the model is untouched
    assert read_meta(small)["format_version"] == 2 and read_meta(plain)["format_version"] == 1
    report = quantize_int8(model)
    rounded = model_output(model)
    loaded = dsformer.load(small)
    assert torch.equal(model_output(loaded), rounded)  # int8 + scales dequantize to exactly the rounded floats
    saved = {f: (f / "model.safetensors").stat().st_size for f in (plain, small)}
    assert saved[plain] - saved[small] == pytest.approx(report.bytes_before - report.bytes_after, rel=0.05)
    again = dsformer.save(loaded, tmp_path / "again", int8=True)  # rounding is idempotent
    assert torch.equal(model_output(dsformer.load(again)), rounded)


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: meta.update(int8="basis"),
        lambda meta: meta.update(int8=[1, 2]),
        lambda meta: meta["int8"].append("encoder.layer.0.attention.self.query.nothing"),
        lambda meta: meta["int8"].append(next(iter(meta["layers"])) + ".indices"),
        lambda meta: meta.update(packed=["indices"]),
        lambda meta: next(iter(meta["packed"].values())).update(bits=1),
        lambda meta: next(iter(meta["packed"].values())).update(dtype="float32"),
        lambda meta: next(iter(meta["packed"].values()))["shape"].append(2),
    ],
    ids=[
        "not-a-list",
        "not-names",
        "missing-tensor",
        "not-int8",
        "packed-not-a-dict",
        "packed-bits",
        "packed-dtype",
        "packed-shape",
    ],
)
def test_int8_folder_with_a_damaged_manifest_is_refused(make_model, tmp_path, damage):
    model = make_model("bert")
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("ds")), progress=False)
    folder = dsformer.save(model, tmp_path / "int8", int8=True)
    meta = json.loads((folder / "dsformer.json").read_text())
    damage(meta)
    (folder / "dsformer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        dsformer.load(folder)
