"""Extractive question answering (SQuAD v1.1): windows over long contexts, span labels, span decoding.

A context longer than the model's window is cut into windows of ``max_length`` tokens (question
included) that overlap by ``stride`` tokens, as the BERT paper and the Hugging Face examples do.
A training window holds the answer's first and last token as its labels, or the ``[CLS]`` position
where the answer lies outside it; a question whose answer fits in no window (an answer longer
than a window) is dropped and counted, so no window learns a wrong span. At evaluation, each
window proposes its ``n_best`` starts and ends; the best-scoring span inside the context, at most
``max_answer_tokens`` long, over all windows of a question, is its answer, cut from the context
by the tokens' character offsets.

Example (a tiny untrained model):
    >>> import tempfile
    >>> from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast
    >>> from dsformer.harness.data.squad import Question
    >>> from dsformer.harness.squad import evaluate_qa, training_windows
    >>> vocab = tempfile.mktemp()
    >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "where", "is", "paris", "in", "france"]
    >>> _ = open(vocab, "w").write("\\n".join(words))
    >>> tok = BertTokenizerFast(vocab=vocab)
    >>> q = Question("q1", "where is paris", "paris is in france", ("france",), (12,))
    >>> windows, dropped = training_windows(tok, [q], max_length=16, stride=4)
    >>> [(w["start_positions"], w["end_positions"]) for w in windows], dropped
    ([(8, 8)], 0)
    >>> model = BertForQuestionAnswering(BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=32))
    >>> sorted(evaluate_qa(model, tok, [q], max_length=16, stride=4))
    ['exact_match', 'f1']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dsformer.errors import DataError
from dsformer.harness.data.squad import Question
from dsformer.harness.metrics import squad_scores

STRIDE = 128  # tokens shared by consecutive windows of one context
N_BEST = 20  # starts and ends each window proposes
MAX_ANSWER_TOKENS = 30


def check_stride(max_length: int, stride: int) -> None:
    """Consecutive windows may share less than half a window: more would make windows that add nothing."""
    if stride >= max_length // 2:
        raise DataError(f"--doc-stride {stride} must be under half the window (--max-length {max_length})")


def _windows(tokenizer: Any, questions: list[Question], max_length: int, stride: int) -> Any:
    check_stride(max_length, stride)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("question answering needs a fast tokenizer (character offsets of its tokens)")
    try:
        return tokenizer(
            [q.question.lstrip() for q in questions], [q.context for q in questions], truncation="only_second",
            max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions for a question too long to window
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot cut the contexts into windows of {max_length} tokens: {first}") from None


def _context_span(sequence_ids: list[int | None]) -> range:
    """The context's tokens in a window (none for an empty context)."""
    if 1 not in sequence_ids:
        return range(0)
    return range(sequence_ids.index(1), len(sequence_ids) - sequence_ids[::-1].index(1))


def training_windows(
    tokenizer: Any, questions: list[Question], max_length: int = 384, stride: int = STRIDE
) -> tuple[list[dict], int]:
    """Every window of every question with its span labels, and how many questions were dropped because their
    answer fits in no window."""
    enc = _windows(tokenizer, questions, max_length, stride)
    owners = enc["overflow_to_sample_mapping"]
    keys = [k for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")]
    windows: list[tuple[int, dict]] = []
    answered: set[int] = set()
    for i, offsets in enumerate(enc["offset_mapping"]):
        q = questions[owners[i]]
        context = _context_span(enc.sequence_ids(i))
        begin, end = q.starts[0], q.starts[0] + len(q.answers[0])
        start = stop = 0  # [CLS]: the answer is not in this window
        if context and offsets[context[0]][0] <= begin and offsets[context[-1]][1] >= end:
            start = next(t for t in context if offsets[t][1] > begin)
            stop = next(t for t in reversed(context) if offsets[t][0] < end)
            answered.add(owners[i])
        windows.append((owners[i], {**{k: enc[k][i] for k in keys}, "start_positions": start, "end_positions": stop}))
    kept = [window for owner, window in windows if owner in answered]
    return kept, len(questions) - len(answered)


def _best_span(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: list, context_tokens: range, max_answer_tokens: int
) -> tuple[float, int, int] | None:
    starts = np.argsort(start_logits)[::-1][:N_BEST]
    ends = np.argsort(end_logits)[::-1][:N_BEST]
    best = None
    for s in starts:
        for e in ends:
            if s not in context_tokens or e not in context_tokens or e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best


@torch.no_grad()
def predict_answers(
    model: nn.Module, tokenizer: Any, questions: list[Question], max_length: int = 384, stride: int = STRIDE,
    batch_size: int = 64, bf16: bool = False, max_answer_tokens: int = MAX_ANSWER_TOKENS,
) -> list[str]:  # fmt: skip
    """Each question's answer: the best span over its windows (an empty string where no window has one)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    enc = _windows(tokenizer, questions, max_length, stride)
    owners = enc["overflow_to_sample_mapping"]
    keys = [k for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")]
    order = sorted(range(len(owners)), key=lambda i: len(enc["input_ids"][i]))
    best: list[tuple[float, int, int] | None] = [None] * len(questions)
    try:
        for at in range(0, len(order), batch_size):
            idx = order[at : at + batch_size]
            batch = tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx], return_tensors="pt")
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(**{k: v.to(device) for k, v in batch.items()})
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                context = _context_span(enc.sequence_ids(i))
                span = _best_span(starts[row], ends[row], enc["offset_mapping"][i], context, max_answer_tokens)
                owner = owners[i]
                if span is not None and (best[owner] is None or span[0] > best[owner][0]):
                    best[owner] = span
    finally:
        model.train(was_training)
    return [q.context[span[1] : span[2]] if span else "" for q, span in zip(questions, best, strict=True)]


def evaluate_qa(
    model: nn.Module, tokenizer: Any, questions: list[Question], max_length: int = 384, stride: int = STRIDE,
    batch_size: int = 64, bf16: bool = False,
) -> dict[str, float]:  # fmt: skip
    """SQuAD v1.1's exact match and F1 (fractions) of the model's answers, each against its best gold answer."""
    answers = predict_answers(model, tokenizer, questions, max_length, stride, batch_size, bf16)
    return squad_scores(answers, [q.answers for q in questions])
