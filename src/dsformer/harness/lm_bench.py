"""Speed of a causal LM with compact layers against its dense original: prefill and greedy decode with the
KV cache at batch 1, end to end and per layer (the timing rules of :mod:`dsformer.harness.bench`).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from dsformer.harness.lm_bench import greedy
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=100)).eval()
    >>> tokens, seconds = greedy(model, torch.tensor([[5, 6, 7]]), new_tokens=4)
    >>> len(tokens), seconds > 0
    (4, True)
"""

from __future__ import annotations

import functools
import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

from dsformer.errors import DsformerError
from dsformer.harness.bench import alternate, compared, dense_original, layer_timings, token_inputs, token_minor_inputs
from dsformer.kernels import calibrate, use_backend
from dsformer.surgery import compact_layers

PROMPT = 32  # tokens before a timed decode


def is_causal_lm_model(model: nn.Module) -> bool:
    """Whether ``model`` generates text (a ``...ForCausalLM`` with a KV cache)."""
    return type(model).__name__.endswith("ForCausalLM") and hasattr(model, "generate")


@torch.inference_mode()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy generation with the KV cache: the ``new_tokens`` token ids after ``prompt (1, P)``, and the seconds
    its decode steps took (the forward of the prompt, the prefill, is not counted)."""
    # transformers 5 calls the KV cache `cache`; 4.x `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out[name], out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, device = [int(token)], prompt.device
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))  # a host read per step, as every generation loop makes
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def bench_lm(
    model: nn.Module,
    prefill: int = 512,
    new_tokens: int = 32,
    prompt: int = PROMPT,
    backend: str = "auto",
    repeats: int = 5,
    layers: bool = True,
) -> dict[str, Any]:
    """Prefill and decode speed of a causal LM with compact layers against its merged dense copy.

    Prefill: one forward of ``1 x prefill`` tokens filling the KV cache (logits of the last position only,
    as generation computes them). Decode: ``new_tokens`` greedy tokens at batch 1 with the KV cache after a
    seeded random ``prompt`` of that many tokens; the steps after the prompt's forward are timed, and tokens
    per second are steps over their time. Dense and compact runs alternate; medians. Per layer
    (``layers``): every compact layer at one token and at ``1 x prefill`` against its merged linear, with
    its multiply-add and byte limits. ``generations`` holds both models' greedy tokens.
    """
    if new_tokens < 2:
        raise DsformerError(f"--new-tokens {new_tokens}: time at least 2 tokens (the first comes from the prompt)")
    model.eval()
    device = next(model.parameters()).device
    compact = compact_layers(model)
    use_backend(model, backend)
    calibrate(model, [(1, prefill), (1, 1)])
    dense = dense_original(model)
    long = token_inputs(model, 1, prefill, device)["input_ids"]
    start = token_inputs(model, 1, prompt, device)["input_ids"]
    models = {"dense": dense, "compact": model}
    fill = alternate(
        {name: functools.partial(m, input_ids=long, use_cache=True, logits_to_keep=1) for name, m in models.items()},
        device,
        repeats,
    )
    generations = {name: greedy(m, start, new_tokens)[0] for name, m in models.items()}  # a warm-up too
    decode: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            decode[name].append(greedy(m, start, new_tokens)[1])
    step = {name: statistics.median(t) / (new_tokens - 1) for name, t in decode.items()}
    result: dict[str, Any] = {
        "prefill": prefill,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "backend": backend,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "repeats": repeats,
        "prefill_end_to_end": compared(fill["dense"], fill["compact"], prefill),
        "decode_end_to_end": {
            "dense_ms_per_token": 1000 * step["dense"],
            "compact_ms_per_token": 1000 * step["compact"],
            "dense_tokens_per_s": 1 / step["dense"],
            "compact_tokens_per_s": 1 / step["compact"],
            "speedup": step["dense"] / step["compact"],
        },
        "generations": generations,
    }
    if layers:
        result["decode_layers"], result["decode_parts"] = layer_timings(compact, 1, 1, device, max(repeats, 20))
        minor = token_minor_inputs(compact, lambda: model(input_ids=long, use_cache=True, logits_to_keep=1))
        timed = layer_timings(compact, 1, prefill, device, repeats, minor)
        result["prefill_layers"], result["prefill_parts"] = timed
    return result


def bench_lm_table(result: dict[str, Any]) -> str:
    """A plain-text table of one :func:`bench_lm` result."""
    f, d = result["prefill_end_to_end"], result["decode_end_to_end"]
    lines = [
        f"causal LM, backend {result['backend']}, {result['dtype']}, median of {result['repeats']} alternating runs",
        f"  prefill 1 x {result['prefill']}: dense {f['dense_ms']:.1f} ms, compact {f['compact_ms']:.1f} ms -> "
        f"{f['speedup']:.2f}x ({f['compact_tokens_per_s']:.0f} tokens/s against {f['dense_tokens_per_s']:.0f})",
        f"  decode at batch 1, {result['new_tokens']} greedy tokens after {result['prompt']}: dense "
        f"{d['dense_ms_per_token']:.2f} ms, compact {d['compact_ms_per_token']:.2f} ms a token -> {d['speedup']:.2f}x "
        f"({d['compact_tokens_per_s']:.1f} tokens/s against {d['dense_tokens_per_s']:.1f})",
    ]
    for label in ("decode", "prefill"):
        for part, p in sorted(result.get(f"{label}_parts", {}).items()):
            lines.append(
                f"  {label}, {part} linears ({p['layers']}): dense {p['dense_ms']:.2f} ms, compact "
                f"{p['compact_ms']:.2f} ms -> {p['speedup']:.2f}x"
            )
    for name, r in result.get("decode_layers", {}).items():
        lines.append(
            f"  one token: {name[-40:]:<40} {r['layout']:<12} {r['backend']:<9} {r['dense_ms']:>7.3f} "
            f"{r['compact_ms']:>7.3f} ms {r['speedup']:>5.2f}x (byte limit {r['byte_limit']:.2f}x)"
        )
    return "\n".join(lines)
