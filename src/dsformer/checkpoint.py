"""Save and load compressed models; export them back to plain dense Hugging Face folders.

A saved folder holds the model's Hugging Face ``config.json``, its tokenizer files, one
``model.safetensors`` of plain tensors (bases, values, indices and every other weight) and
``dsformer.json``: the format version, the model class, each compact layer's structure and
layout, the report and the weight file's size and SHA-256. Nothing is pickled. Every folder is
written beside its destination and moved into place only when complete.

Example:
    >>> import tempfile
    >>> from transformers import BertConfig, BertModel
    >>> from dsformer import compress, load, save
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> _ = compress(model, progress=False)
    >>> folder = tempfile.mkdtemp() + "/tiny-ds"
    >>> _ = save(model, folder)
    >>> type(load(folder)).__name__
    'BertModel'
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from dsformer import structures
from dsformer.errors import CheckpointError, DsformerError
from dsformer.files import atomic_folder, check_output, sha256, write_json, write_manifest
from dsformer.quantize import from_int8, index_tensors, int8_targets, pack_bits, packed_size, to_int8, unpack_bits
from dsformer.report import Report
from dsformer.structures import CompactLinear
from dsformer.surgery import compact_layers, is_linear, linear_weight, merge, swap
from dsformer.version import __version__

FORMAT_VERSION = 2  # the newest format this version reads; folders with int8 weights are 2, others 1
INT8_SCALE = ".int8_scale"  # suffix of the per-row scales stored beside an int8 tensor
_INDEX_BYTES = {"uint8": 1, "int16": 2, "int32": 4, "int64": 8}  # dtypes a packed index tensor may have
PACKED = ".packed"  # suffix of an index tensor stored bit-packed (format 2: its bits, shape and dtype in meta)
META_FILE = "dsformer.json"
EXPORT_FILE = "dsformer-export.json"
WEIGHTS_FILE = "model.safetensors"
MANIFESTS = (META_FILE, EXPORT_FILE)  # what lists a dsformer folder's files: an output may replace such a folder


def check_model_output(path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Refuse an output that would destroy anything but an earlier dsformer folder (``files.check_output``)."""
    return check_output(path, MANIFESTS, source)


def save(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    report: Report | None = None,
    extra_files: dict[str, Any] | None = None,
    int8: bool = False,
) -> Path:
    """Save a compressed model (with its tokenizer, if given) as a folder that :func:`load` reads.

    ``extra_files`` maps file names to JSON-able data written into the same folder (metrics).
    ``int8`` stores the weights that :func:`dsformer.quantize.quantize_int8` rounds as int8 with one
    fp32 scale per row, and the index tensors bit-packed (format 2): a model already rounded by it
    is stored exactly, any other is rounded on the way (the model in memory is left as it is).
    """
    compact = compact_layers(model)
    layers = {name: _layer_spec(layer, compact) for name, layer in compact.items()}
    with atomic_folder(path, MANIFESTS) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        metadata = {"format": "pt", "dsformer": __version__}
        int8_keys: list[str] = []
        packed: dict[str, Any] = {}
        try:
            if int8:
                tensors, int8_keys, packed = _int8_state(model)
                save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
            else:
                save_model(model, str(tmp / WEIGHTS_FILE), metadata=metadata)
        except SafetensorError as err:  # a full disk, most often: nothing is published
            raise CheckpointError(f"cannot write the weights of {path}: {err}") from None
        meta = {
            "format_version": 2 if int8 else 1,
            "dsformer_version": __version__,
            "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "layers": layers,
            "weights": {
                "file": WEIGHTS_FILE,
                "bytes": (tmp / WEIGHTS_FILE).stat().st_size,
                "sha256": sha256(tmp / WEIGHTS_FILE),
            },
            "report": report.to_json() if report is not None else None,
        }
        if int8:
            meta["int8"] = int8_keys
            meta["packed"] = packed
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
        write_manifest(tmp, META_FILE, meta)  # last: it lists the folder's files
    return Path(path)


def _layer_spec(layer: CompactLinear, compact: dict[str, CompactLinear]) -> dict[str, Any]:
    """What rebuilds ``layer`` at load: structure, shape, bias, source kind, layout, and the layer that owns
    each tensor it borrows (stored once, with its owner)."""
    spec = {
        "structure": layer.structure,
        "shape": [layer.out_features, layer.in_features],
        "bias": layer.bias is not None,
        "source": layer.source_kind,
        "layout": layer.layout(),
    }
    owners = {
        id(getattr(other, tensor)): name
        for tensor in layer.borrowed
        for name, other in compact.items()
        if tensor not in other.borrowed and hasattr(other, tensor)
    }
    if layer.borrowed:
        spec["tied"] = {tensor: owners[id(getattr(layer, tensor))] for tensor in sorted(layer.borrowed)}
    return spec


_MODEL_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a saved model's parameters may be


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a saved folder's ``dsformer.json``."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give a folder that dsformer compress or finetune wrote")
    meta_path = folder / META_FILE
    if not meta_path.exists():
        hint = (
            " (it looks like a plain Hugging Face model: compress it first)"
            if (folder / "config.json").exists()
            else ""
        )
        raise CheckpointError(f"{folder} has no {META_FILE}, so it is not a dsformer model{hint}")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["format_version"]
        weights = meta["weights"]
        valid = (
            isinstance(version, int)
            and isinstance(meta["layers"], dict)
            and isinstance(meta["model_class"], str)
            and isinstance(weights["file"], str)
            and Path(weights["file"]).name == weights["file"] not in ("", ".", "..")  # a file of this folder
            and isinstance(weights["bytes"], int)
            and isinstance(weights["sha256"], str)
            and meta.get("dtype", "float32") in _MODEL_DTYPES
            and isinstance(meta.get("int8", []), list)
            and all(isinstance(key, str) for key in meta.get("int8", []))
            and isinstance(meta.get("packed", {}), dict)
            and all(
                isinstance(spec, dict)
                and isinstance(spec.get("bits"), int)
                and 1 <= spec["bits"] <= 32
                and isinstance(spec.get("shape"), list)
                and all(isinstance(n, int) and n >= 0 for n in spec["shape"])
                and spec.get("dtype") in _INDEX_BYTES
                and spec["bits"] <= 8 * _INDEX_BYTES[spec["dtype"]]
                for spec in meta.get("packed", {}).values()
            )
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path} is corrupt ({type(err).__name__}: {err}); save the model again") from None
    if not valid:
        raise CheckpointError(f"{meta_path} is corrupt (a field has the wrong type); save the model again")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was saved in format {version} by a newer dsformer ({meta.get('dsformer_version')}); "
            f"this is dsformer {__version__} (format {FORMAT_VERSION}): upgrade dsformer"
        )
    return meta


def _check_weights(folder: Path, meta: dict[str, Any]) -> Path:
    weights = folder / meta["weights"]["file"]
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing; the folder is incomplete, save the model again")
    if weights.is_symlink() or not weights.is_file():  # a device or a link elsewhere: never read it
        raise CheckpointError(f"{weights} is not a plain file of its folder; save the model again")
    size = weights.stat().st_size
    if size != meta["weights"]["bytes"]:
        raise CheckpointError(
            f"{weights} has {size} bytes but {meta['weights']['bytes']} were saved: "
            "the file is truncated or was replaced"
        )
    if sha256(weights, limit=size) != meta["weights"]["sha256"]:
        raise CheckpointError(f"{weights} does not match its saved checksum: the file is corrupt or was changed")
    return weights


def _int8_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """The state dict with every tied tensor once, the int8 targets as int8 plus their row scales, and
    the index tensors bit-packed; returns the tensors, the int8 keys and the packed keys' specs."""
    targets = {t.data_ptr() for t in int8_targets(model)}
    indices = index_tensors(model)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    keys, packed = [], {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # an alias of a tensor already stored (tied weights, a shared basis)
            continue
        seen.add(tensor.data_ptr())
        if tensor.data_ptr() in targets:
            tensors[key], tensors[key + INT8_SCALE] = to_int8(tensor)
            keys.append(key)
        elif tensor.data_ptr() in indices:
            bits = indices[tensor.data_ptr()][1]
            tensors[key + PACKED] = pack_bits(tensor, bits)
            dtype = str(tensor.dtype).removeprefix("torch.")
            packed[key] = {"bits": bits, "shape": list(tensor.shape), "dtype": dtype}
        else:
            tensors[key] = tensor.detach().contiguous()
    return tensors, keys, packed


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by :func:`save` into an identical model (eval mode)."""
    import transformers

    folder = Path(path)
    meta = read_meta(folder)
    weights = _check_weights(folder, meta)
    model_cls = getattr(transformers, meta["model_class"], None)
    if not isinstance(model_cls, type) or not issubclass(model_cls, transformers.PreTrainedModel):
        raise CheckpointError(
            f"model class {meta['model_class']} is not in this transformers version; upgrade transformers"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'} cannot be read: {err}") from None
    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = model_cls(config).to(dtype)
    swap(model, _compact_layers(model, meta["layers"], dtype, meta["model_class"]))
    _load_tensors(model, weights, meta.get("int8", []), dtype, meta.get("packed", {}))
    for name, layer in compact_layers(model).items():  # the kernels index with them unchecked
        for key, bound in layer.index_bounds().items():
            indices = getattr(layer, key)
            low, high = (int(indices.min()), int(indices.max())) if indices.numel() else (0, 0)
            if low < 0 or high >= bound:
                raise CheckpointError(
                    f"{weights}: {name}.{key} holds {low if low < 0 else high}, outside 0..{bound - 1}: "
                    "the file is corrupt or does not belong to this layout"
                )
    return model.to(device).eval()


def _compact_layers(
    model: nn.Module, specs: dict[str, Any], dtype: torch.dtype, model_class: str
) -> dict[str, CompactLinear]:
    """Empty compact layers of the recorded layouts, each checked against the linear it replaces, with
    borrowed tensors tied to their owners (of the same shape)."""
    layers = {}
    for name, spec in specs.items():
        try:
            module = model.get_submodule(name)
            shape = tuple(int(n) for n in spec["shape"])
            if not is_linear(module) or tuple(linear_weight(module).shape) != shape:
                raise ValueError(f"it records a {shape[0]}x{shape[1]} linear where the model has {module}")
            layer = structures.get(spec["structure"]).layer.from_layout(shape, spec["layout"], spec["bias"], dtype)
        except (AttributeError, KeyError, ValueError, TypeError, DsformerError) as err:
            raise CheckpointError(f"{META_FILE} layer {name!r} does not fit {model_class}: {err}") from None
        layer.source_kind = spec.get("source", "linear")
        layers[name] = layer
    for name, spec in specs.items():
        legacy = {"basis": spec["basis_from"]} if "basis_from" in spec else {}  # how 0.1 recorded a shared basis
        tied = spec.get("tied", legacy)
        if not isinstance(tied, dict) or not all(isinstance(v, str) for v in (*tied, *tied.values())):
            raise CheckpointError(f"{META_FILE} layer {name!r}: 'tied' must map tensor names to layer names")
        for tensor, owner in tied.items():
            try:
                layers[name].borrow(layers[owner], tensor)
            except (KeyError, AttributeError, ValueError, TypeError) as err:
                raise CheckpointError(
                    f"{META_FILE} layer {name!r}: its {tensor} cannot be shared with {owner!r}: {err}"
                ) from None
    return layers


def _load_tensors(
    model: nn.Module,
    weights: Path,
    int8: list[str] = (),
    dtype: torch.dtype = torch.float32,
    packed: dict[str, Any] | None = None,
) -> None:
    expected = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {err}") from None
    for key in int8:
        q, scale = stored.pop(key, None), stored.pop(key + INT8_SCALE, None)
        if q is None or scale is None or q.dtype != torch.int8 or scale.shape != q.shape[:1]:
            raise CheckpointError(
                f"{weights}: the int8 tensor {key!r} or its scales are missing or malformed; save the model again"
            )
        stored[key] = from_int8(q, scale, dtype)
    for key, spec in (packed or {}).items():
        bits, shape, count = spec["bits"], tuple(spec["shape"]), math.prod(spec["shape"])
        data = stored.pop(key + PACKED, None)
        if data is None or data.dtype != torch.uint8 or data.numel() != packed_size(count, bits):
            raise CheckpointError(
                f"{weights}: the packed tensor {key!r} is missing or has the wrong size; save the model again"
            )
        stored[key] = unpack_bits(data, bits, count).reshape(shape).to(getattr(torch, spec["dtype"]))
    for key, tensor in stored.items():
        if key not in expected:
            raise CheckpointError(
                f"{weights} holds {key!r}, which the model does not have: the files do not belong together"
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{weights}: {key} has shape {tuple(tensor.shape)} but the model expects {tuple(expected[key].shape)}"
            )
        if not expected[key].is_floating_point() and tensor.dtype != expected[key].dtype:  # indices would wrap
            raise CheckpointError(f"{weights}: {key} is {tensor.dtype} but the model expects {expected[key].dtype}")
    missing = model.load_state_dict(stored, strict=False).missing_keys
    # Tied weights are stored once (save_model drops the aliases); the rest must all be present.
    shared = {t.data_ptr() for k, t in model.state_dict().items() if k in stored}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in shared]
    if untied:
        raise CheckpointError(f"{weights} lacks {len(untied)} tensors the model needs, e.g. {untied[0]!r}")


def export_dense(path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write a plain dense Hugging Face folder (loadable without dsformer) from a saved compact model."""
    folder = Path(path)
    check_model_output(output, source=folder)
    model = merge(load(folder))
    tokenizer = load_tokenizer(folder)
    with atomic_folder(output, MANIFESTS) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, EXPORT_FILE, {"exported_from": str(folder.resolve()), "dsformer_version": __version__})
    return Path(output)


# Any of these in a local folder means it carries a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def load_tokenizer(source: str | os.PathLike) -> Any:
    """The tokenizer of a local folder or hub name, or ``None`` when there is none.

    A local folder without tokenizer files gets ``None``: transformers 5 would otherwise build an
    empty tokenizer that maps every word to ``[UNK]``.
    """
    from transformers import AutoTokenizer

    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError):
        return None
