"""Latency measurement shared by the run summary and the benchmarks.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from dsformer.bench import latency_ms
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> latency_ms(model, batch=1, seq=8, repeats=3) > 0
    True
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def latency_ms(model: nn.Module, batch: int = 1, seq: int = 64, repeats: int = 20, warmup: int = 3) -> float:
    """Median forward latency in milliseconds on token ids of shape ``(batch, seq)``."""
    model.eval()
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
