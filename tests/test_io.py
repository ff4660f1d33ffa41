"""Save / load / export: round trips, the folder format, corrupt folders and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import STRUCTURE_NAMES, TINY_MODELS, fast_structure, model_output, relative_error
from safetensors.torch import load_file, save_file

import dsformer.checkpoint
import dsformer.files
from dsformer import CheckpointError, CompressConfig, compress, export_dense, load, save
from dsformer.checkpoint import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, read_meta
from dsformer.surgery import compact_layers

MODELS = list(TINY_MODELS)
AUTO = {"bert": transformers.AutoModel, "mpnet": transformers.AutoModel, "gpt2": transformers.AutoModelForCausalLM}


def compressed(make_model, name: str = "bert", structure: str = "ds", ratio: float = 2.0):
    model = make_model(name)
    report = compress(model, CompressConfig(fast_structure(structure, ratio)), progress=False)
    return model, report


def siblings(folder: Path) -> list[str]:
    """Names beside ``folder`` (temp or backup folders would show up here)."""
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_identical_outputs(make_model, tmp_path, name, structure):
    model, report = compressed(make_model, name, structure)
    folder = save(model, tmp_path / "saved", report=report)
    assert folder == tmp_path / "saved"
    loaded = load(folder)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert {n: (type(m), m.layout()) for n, m in compact_layers(loaded).items()} == {
        n: (type(m), m.layout()) for n, m in compact_layers(model).items()
    }
    for n, m in compact_layers(loaded).items():
        assert m.source_kind == compact_layers(model)[n].source_kind
    assert torch.equal(model_output(loaded), model_output(model))
    saved = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == saved[key].dtype and torch.equal(tensor, saved[key]), key
    if name == "gpt2":  # the tied output embedding stays tied
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert siblings(folder) == []


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_round_trip(make_model, tmp_path, structure, dtype):
    model = make_model("bert").to(dtype)
    compress(model, CompressConfig(fast_structure(structure)), progress=False)
    loaded = load(save(model, tmp_path / "saved"))
    assert next(loaded.parameters()).dtype == dtype
    assert torch.equal(model_output(loaded), model_output(model))


@pytest.mark.parametrize("name", MODELS)
def test_saved_folder_layout(make_model, tmp_path, name):
    model, report = compressed(make_model, name)
    folder = save(model, tmp_path / "saved", report=report)
    assert {"config.json", WEIGHTS_FILE, META_FILE} <= {p.name for p in folder.iterdir()}
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["format_version"] == 1 and "int8" not in meta  # float folders stay readable by format-1 readers
    assert meta["model_class"] == type(model).__name__
    assert sorted(meta["layers"]) == sorted(compact_layers(model))
    for spec in meta["layers"].values():
        assert spec["structure"] == "ds" and len(spec["shape"]) == 2 and {"k", "s"} <= set(spec["layout"])
    assert meta["weights"]["bytes"] == (folder / WEIGHTS_FILE).stat().st_size
    assert meta["report"]["totals"]["ratio_params"] == pytest.approx(report.ratio_params)
    assert read_meta(folder)["layers"] == meta["layers"]
    # plain tensors only: every stored tensor is a float or integer array, nothing pickled
    stored = load_file(folder / WEIGHTS_FILE)
    assert all(t.dtype in (torch.float32, torch.uint8, torch.int16, torch.int64) for t in stored.values())


def test_saved_files_have_usual_permissions(make_model, tmp_path):
    model, _ = compressed(make_model, "bert", "svd")
    folder = save(model, tmp_path / "saved")
    umask = os.umask(0)
    os.umask(umask)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((folder / WEIGHTS_FILE).stat().st_mode & 0o777) == 0o666 & ~umask


def test_atomic_text_files_have_usual_permissions_or_keep_their_own(tmp_path):
    from dsformer.files import atomic_write_text

    umask = os.umask(0)
    os.umask(umask)
    fresh = atomic_write_text(tmp_path / "result.json", "{}")  # not mkstemp's owner-only 0600
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask
    fresh.chmod(0o640)
    assert (atomic_write_text(fresh, "[]").stat().st_mode & 0o777) == 0o640 and fresh.read_text() == "[]"


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_export_dense_loads_with_plain_transformers(make_model, tmp_path, name, structure):
    model, _ = compressed(make_model, name, structure)
    folder = save(model, tmp_path / "saved")
    out = export_dense(folder, tmp_path / "dense")
    assert out == tmp_path / "dense"
    assert not (out / META_FILE).exists()
    dense, info = AUTO[name].from_pretrained(out, output_loading_info=True)
    assert type(dense) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not compact_layers(dense)
    assert relative_error(model_output(dense.eval()), model_output(model)) <= 1e-5
    assert siblings(out) == ["saved"]


_DENSE_ONLY = """
import sys
import torch, transformers
from safetensors.torch import save_file
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name.startswith("dsformer") for name in sys.modules)
ids = torch.arange(2, 18).view(2, 8)
with torch.no_grad():
    save_file({"logits": model(input_ids=ids).logits.contiguous()}, sys.argv[2])
"""


def test_export_dense_loads_in_a_process_without_dsformer(make_model, tmp_path):
    model, _ = compressed(make_model, "gpt2", "ds")
    out = export_dense(save(model, tmp_path / "saved"), tmp_path / "dense")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _DENSE_ONLY, str(out), str(tmp_path / "logits.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = model(input_ids=torch.arange(2, 18).view(2, 8)).logits
    assert relative_error(load_file(tmp_path / "logits.safetensors")["logits"], expected) <= 1e-5


def test_export_dense_writes_no_tokenizer_when_there_was_none(make_model, tmp_path):
    model, _ = compressed(make_model, "bert", "svd")
    folder = save(model, tmp_path / "saved")
    out = export_dense(folder, tmp_path / "dense")
    assert not any(p.name.startswith("tokenizer") or p.name == "vocab.txt" for p in out.iterdir())


# --- corrupt folders -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One saved tiny BERT (DS at 2x) and one saved at 2.8x, to copy and damage."""
    from conftest import build_bert

    root = tmp_path_factory.mktemp("pristine")
    for ratio in (2.0, 2.8):
        model = build_bert()
        compress(model, CompressConfig(fast_structure("ds", ratio)), progress=False)
        save(model, root / f"ds-{ratio:g}")
    return root


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    folder = tmp_path / "saved"
    shutil.copytree(pristine / "ds-2", folder)
    return folder


def _rewrite_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def _refresh_checksum(folder: Path) -> None:
    """Make dsformer.json describe the weight file as it is now (to reach the checks behind the checksum)."""
    weights = folder / WEIGHTS_FILE

    def edit(meta):
        meta["weights"]["bytes"] = weights.stat().st_size
        meta["weights"]["sha256"] = dsformer.files.sha256(weights)

    _rewrite_meta(folder, edit)


def _missing_folder(folder, pristine):
    shutil.rmtree(folder)


def _no_meta(folder, pristine):
    (folder / META_FILE).unlink()


def _empty_folder(folder, pristine):
    shutil.rmtree(folder)
    folder.mkdir()


def _invalid_json(folder, pristine):
    (folder / META_FILE).write_text('{"format_version": 1, "layers": {')


def _binary_json(folder, pristine):
    (folder / META_FILE).write_bytes(b"\xff\xfe\x00garbage")


def _json_list(folder, pristine):
    (folder / META_FILE).write_text("[1, 2, 3]")


def _no_format_version(folder, pristine):
    _rewrite_meta(folder, lambda m: m.pop("format_version"))


def _newer_format(folder, pristine):
    _rewrite_meta(folder, lambda m: m.update(format_version=FORMAT_VERSION + 1))


def _truncated(folder, pristine):
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _truncated_with_matching_checksum(folder, pristine):
    _truncated(folder, pristine)
    _refresh_checksum(folder)


def _flipped_byte(folder, pristine):
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[len(data) - 100] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))


def _weights_missing(folder, pristine):
    (folder / WEIGHTS_FILE).unlink()


def _other_model_weights(folder, pristine):
    shutil.copy(pristine / "ds-2.8" / WEIGHTS_FILE, folder / WEIGHTS_FILE)


def _other_model_weights_with_matching_checksum(folder, pristine):
    _other_model_weights(folder, pristine)
    _refresh_checksum(folder)


def _tensor_missing(folder, pristine):
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors.pop("encoder.layer.0.attention.self.query.basis")
    save_file(tensors, folder / WEIGHTS_FILE)
    _refresh_checksum(folder)


def _extra_tensor(folder, pristine):
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors["not.in.the.model"] = torch.zeros(3)
    save_file(tensors, folder / WEIGHTS_FILE)
    _refresh_checksum(folder)


def _unknown_structure(folder, pristine):
    _rewrite_meta(folder, lambda m: m["layers"]["encoder.layer.0.output.dense"].update(structure="zzz"))


def _layer_not_in_model(folder, pristine):
    _rewrite_meta(
        folder,
        lambda m: m["layers"].update({"encoder.layer.9.output.dense": m["layers"]["encoder.layer.0.output.dense"]}),
    )


def _unknown_model_class(folder, pristine):
    _rewrite_meta(folder, lambda m: m.update(model_class="NoSuchModel"))


def _config_unreadable(folder, pristine):
    (folder / "config.json").write_text("{ nope")


CORRUPT = {
    "missing folder": (_missing_folder, r"is not a folder"),
    "folder without dsformer.json": (_no_meta, r"has no dsformer\.json.*plain Hugging Face model"),
    "empty folder": (_empty_folder, r"has no dsformer\.json"),
    "invalid JSON": (_invalid_json, r"dsformer\.json is corrupt"),
    "binary dsformer.json": (_binary_json, r"dsformer\.json is corrupt"),
    "JSON not an object": (_json_list, r"dsformer\.json is corrupt"),
    "no format_version": (_no_format_version, r"dsformer\.json is corrupt.*format_version"),
    "newer format_version": (_newer_format, rf"format {FORMAT_VERSION + 1} by a newer dsformer.*upgrade dsformer"),
    "truncated safetensors": (_truncated, r"model\.safetensors has \d+ bytes but \d+ were saved.*truncated"),
    "truncated safetensors, checksum updated": (_truncated_with_matching_checksum, r"cannot be read as safetensors"),
    "flipped byte": (_flipped_byte, r"does not match its saved checksum"),
    "weights missing": (_weights_missing, r"model\.safetensors is missing"),
    "other model's weights": (_other_model_weights, r"model\.safetensors (has \d+ bytes|does not match)"),
    "other model's weights, checksum updated": (
        _other_model_weights_with_matching_checksum,
        r"has shape \(\d+, \d+\) but the model expects",
    ),
    "a tensor missing": (_tensor_missing, r"lacks 1 tensors.*query\.basis"),
    "an extra tensor": (_extra_tensor, r"'not\.in\.the\.model', which the model does not have"),
    "unknown structure": (_unknown_structure, r"layer 'encoder\.layer\.0\.output\.dense' does not fit BertModel"),
    "layer not in model": (_layer_not_in_model, r"layer 'encoder\.layer\.9\.output\.dense' does not fit"),
    "unknown model class": (_unknown_model_class, r"NoSuchModel is not in this transformers"),
    "config.json unreadable": (_config_unreadable, r"config\.json cannot be read"),
}


@pytest.mark.parametrize("damage,message", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_folder_raises_checkpoint_error(saved, pristine, damage, message):
    damage(saved, pristine)
    with pytest.raises(CheckpointError, match=message) as info:
        load(saved)
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(format_version=None),
        lambda m: m.update(format_version="1"),
        lambda m: m["weights"].pop("file"),
        lambda m: m["weights"].pop("bytes"),
        lambda m: m.update(dtype="Tensor"),
    ],
    ids=["format_version null", "format_version string", "weights.file missing", "weights.bytes missing", "dtype"],
)
def test_corrupt_meta_fields_raise_checkpoint_error(saved, edit):
    _rewrite_meta(saved, edit)
    with pytest.raises(CheckpointError):
        load(saved)


def test_info_of_a_plain_file_path(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        read_meta(path)


# --- atomic, careful writes ---------------------------------------------------------------------


def test_save_refuses_a_non_empty_unrelated_folder(make_model, tmp_path):
    model, _ = compressed(make_model, "bert", "svd")
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("precious")
    (dest / "sub").mkdir()
    (dest / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match=r"not empty and holds more than a dsformer output"):
        save(model, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt", "sub"]
    assert (dest / "notes.txt").read_text() == "precious"
    assert (dest / "sub" / "data.csv").read_text() == "1,2"
    assert siblings(dest) == []


def test_save_refuses_a_file(make_model, tmp_path):
    model, _ = compressed(make_model, "bert", "svd")
    dest = tmp_path / "file"
    dest.write_text("keep")
    with pytest.raises(CheckpointError, match="not a folder"):
        save(model, dest)
    assert dest.read_text() == "keep"
    assert siblings(dest) == []


def test_save_into_an_empty_folder(make_model, tmp_path):
    model, _ = compressed(make_model, "bert", "nm")
    dest = tmp_path / "empty"
    dest.mkdir()
    save(model, dest)
    assert torch.equal(model_output(load(dest)), model_output(model))


def test_save_creates_missing_parents(make_model, tmp_path):
    model, _ = compressed(make_model, "bert", "nm")
    dest = tmp_path / "a" / "b" / "model"
    save(model, dest)
    assert torch.equal(model_output(load(dest)), model_output(model))


@pytest.mark.parametrize("swap", [True, False], ids=["atomic swap", "two renames"])
def test_save_over_an_earlier_save_replaces_it(make_model, tmp_path, monkeypatch, swap):
    import dsformer.files as io_module

    real, swaps = io_module._exchange, []

    def exchange(a, b):
        swaps.append(b)
        return real(a, b) if swap else False  # False: as on a system without renameat2

    monkeypatch.setattr(io_module, "_exchange", exchange)
    first, _ = compressed(make_model, "bert", "ds")
    second, _ = compressed(make_model, "bert", "svd")
    dest = tmp_path / "out"
    save(first, dest)
    save(second, dest)
    assert swaps == [dest]  # the first save had nothing to swap with
    loaded = load(dest)
    assert {m.structure for m in compact_layers(loaded).values()} == {"svd"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the temporary nor the old folder is left
    assert torch.equal(model_output(loaded), model_output(second))
    assert siblings(dest) == []


def test_save_refuses_a_plain_hugging_face_folder(make_model, tmp_path, tiny_bert_folder):
    """A folder dsformer did not write (here a user's Hugging Face model) is never replaced."""
    dest = tmp_path / "hf"
    shutil.copytree(tiny_bert_folder, dest)
    before = sorted(p.name for p in dest.iterdir())
    model, _ = compressed(make_model, "bert", "svd")
    with pytest.raises(CheckpointError, match="more than a dsformer output"):
        save(model, dest)
    assert sorted(p.name for p in dest.iterdir()) == before and not (dest / META_FILE).exists()


def _failing_save_model(model, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 1000)  # half-written file
    raise RuntimeError("disk full (simulated)")


def test_failed_save_leaves_no_folder_and_no_temp(make_model, tmp_path, monkeypatch):
    model, _ = compressed(make_model, "bert", "ds")
    monkeypatch.setattr(dsformer.checkpoint, "save_model", _failing_save_model)
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, dest)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_earlier_save(make_model, tmp_path, monkeypatch):
    first, _ = compressed(make_model, "bert", "ds")
    dest = save(first, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    second, _ = compressed(make_model, "bert", "svd")
    monkeypatch.setattr(dsformer.checkpoint, "save_model", _failing_save_model)
    with pytest.raises(RuntimeError, match="disk full"):
        save(second, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert siblings(dest) == []
    monkeypatch.undo()
    assert torch.equal(model_output(load(dest)), model_output(first))


def test_failed_export_leaves_no_temp(make_model, tmp_path, monkeypatch):
    model, _ = compressed(make_model, "bert", "svd")
    folder = save(model, tmp_path / "saved")

    def broken(self, *args, **kwargs):
        raise RuntimeError("export failed (simulated)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="export failed"):
        export_dense(folder, tmp_path / "dense")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
