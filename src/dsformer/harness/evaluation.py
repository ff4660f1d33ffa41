"""Predictions and official metrics of a model on task examples (validation during training, test after).

Example (a tiny untrained model on made-up sentences):
    >>> import tempfile
    >>> from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    >>> from dsformer.harness.evaluation import evaluate
    >>> from dsformer.harness.tasks import TASKS, Example
    >>> vocab = tempfile.mktemp()
    >>> _ = open(vocab, "w").write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film"]))
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1,
    ...                                                  num_attention_heads=2, intermediate_size=32))
    >>> sorted(evaluate(model, BertTokenizerFast(vocab=vocab), [Example("good film", None, 1.0)], TASKS["mr"]))
    ['accuracy']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsformer.harness.metrics import compute
from dsformer.harness.squad import STRIDE, evaluate_qa, training_windows
from dsformer.harness.tasks import Example, TaskSpec


def encode(
    tokenizer: Any, examples: list[Example], max_length: int, spec: TaskSpec | None = None, stride: int = STRIDE
) -> list[dict]:
    """Tokenize once, unpadded (batches are padded to their own longest example); with ``spec``, each
    feature carries its label (a class index, or a float score for regression). For question answering
    (``spec.is_qa``) the features are the training windows with their span labels
    (:func:`dsformer.harness.squad.training_windows`)."""
    if spec is not None and spec.is_qa:
        return training_windows(tokenizer, examples, max_length, stride)[0]
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    features = [{key: enc[key][i] for key in enc.keys()} for i in range(len(examples))]
    if spec is not None:
        for feature, example in zip(features, examples, strict=True):
            feature["labels"] = float(example.label) if spec.is_regression else int(example.label)
    return features


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer: Any, examples: list[Example], spec: TaskSpec, max_length: int = 128,
    batch_size: int = 128, bf16: bool = False,
) -> list[float]:  # fmt: skip
    """Predictions (class indices or scores), batched by length for speed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features = encode(tokenizer, examples, max_length)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    preds: list[float] = [0.0] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad([features[i] for i in idx], return_tensors="pt")
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        values = logits[:, 0] if spec.is_regression else logits.argmax(-1)
        for i, v in zip(idx, values.tolist(), strict=True):
            preds[i] = v
    model.train(was_training)
    return preds


def evaluate(
    model: nn.Module, tokenizer: Any, examples: list[Example], spec: TaskSpec, max_length: int | None = None,
    batch_size: int = 128, bf16: bool = False, stride: int = STRIDE,
) -> dict[str, float]:  # fmt: skip
    """The task's official metrics on ``examples`` (``max_length`` default: the task's own)."""
    max_length = max_length or spec.max_length
    if spec.is_qa:
        return evaluate_qa(model, tokenizer, examples, max_length, stride, batch_size, bf16)
    preds = predict(model, tokenizer, examples, spec, max_length, batch_size, bf16)
    return compute(spec.metrics, preds, [e.label for e in examples])
