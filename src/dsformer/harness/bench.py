"""Speed of a compact model against its dense original, measured in one run, as ratios.

The dense original is the same model with every compact layer merged back to a plain linear:
the architecture and FLOPs of the model before compression. Dense and compact forwards are
timed alternately (so a machine that slows down mid-run slows both), and the medians are
compared. Per layer, each compact layer is timed on its own input shape against a dense linear
of the same shape, beside two limits of what its structure could reach: the ratio of
multiply-adds (``flop_limit``, what bounds large batches) and of weight bytes (``byte_limit``,
what bounds one token).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from dsformer.harness.bench import latency_ms
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> latency_ms(model, batch=1, seq=8, repeats=3) > 0
    True
"""

from __future__ import annotations

import copy
import functools
import statistics
from typing import Any

import torch
from torch import nn

from dsformer.kernels import calibrate, choose, native, seconds, use_backend
from dsformer.kernels.choice import layer_tensors, timed_cold
from dsformer.kernels.gather import SHORT
from dsformer.kernels.int8 import int8_linears
from dsformer.structures import backends
from dsformer.surgery import compact_layers, merge


def token_inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def latency_ms(model: nn.Module, batch: int = 1, seq: int = 64, repeats: int = 20, warmup: int = 3) -> float:
    """Median forward latency in milliseconds on token ids of shape ``(batch, seq)``."""
    model.eval()
    device = next(model.parameters()).device
    inputs = token_inputs(model, batch, seq, device)
    times = [seconds(lambda: model(**inputs), device) for _ in range(warmup + repeats)]
    return 1000 * statistics.median(times[warmup:])


@torch.inference_mode()
def alternate(
    fns: dict[str, Any], device: torch.device, repeats: int, warmup: int = 2, before: dict[str, Any] | None = None
) -> dict[str, float]:
    """Median seconds of each callable, timed in turns (``a b a b ...``) after a warm-up of each; ``before[name]``
    runs untimed before each timed call of ``name``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before and name in before:
                before[name]()
            times[name].append(seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def dense_original(model: nn.Module) -> nn.Module:
    """``model`` with every compact layer merged back to a plain linear, made as a user's model is made:
    outside inference mode (a copy made inside it ran SmolLM2's bf16 prefill 1.6x slower on one CPU; the
    cause was not pinned down)."""
    with torch.inference_mode(False):
        return merge(copy.deepcopy(model)).eval()


def compared(dense_s: float, compact_s: float, tokens: int) -> dict[str, float]:
    """Dense and compact seconds for ``tokens`` tokens as milliseconds, tokens per second and the speedup."""
    return {
        "dense_ms": 1000 * dense_s,
        "compact_ms": 1000 * compact_s,
        "dense_tokens_per_s": tokens / dense_s,
        "compact_tokens_per_s": tokens / compact_s,
        "speedup": dense_s / compact_s,
    }


def _part(name: str) -> str:
    """Which part of a block a linear belongs to: ``ffn`` or ``attention``."""
    if "attention" in name or "attn" in name:
        return "attention"
    return "ffn" if any(key in name for key in ("intermediate", "output.dense", "mlp", "ffn", "fc")) else "attention"


@torch.inference_mode()
def bench_model(
    model: nn.Module,
    batch: int = 32,
    seq: int = 128,
    backend: str = "auto",
    repeats: int = 10,
    layers: bool = True,
) -> dict[str, Any]:
    """End-to-end and per-layer speed of ``model`` (with compact layers) against its merged dense copy.

    Returns a JSON-able dict: ``end_to_end`` (median ms, tokens per second, ``speedup``),
    ``layers`` (per compact layer: the backend ``auto`` chose, ms, speedup, limits) and ``parts``
    (attention and FFN linears summed).
    """
    model.eval()
    device = next(model.parameters()).device
    tokens = batch * seq
    compact = compact_layers(model)
    use_backend(model, backend)
    calibrate(model, [(batch, seq)])
    dense = dense_original(model)
    inputs = token_inputs(model, batch, seq, device)
    runs = {"dense": lambda: dense(**inputs), "compact": lambda: model(**inputs)}
    if backend == "int8":  # int8 compact layers also face the dense model with int8 linears
        dense8 = int8_linears(dense_original(model), list(compact))
        runs["dense_int8"] = lambda: dense8(**inputs)
    total = alternate(runs, device, repeats)
    result: dict[str, Any] = {
        "batch": batch,
        "seq": seq,
        "backend": backend,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "repeats": repeats,
        "end_to_end": compared(total["dense"], total["compact"], tokens),
    }
    if "dense_int8" in total:
        result["end_to_end"]["dense_int8_ms"] = 1000 * total["dense_int8"]
        result["end_to_end"]["speedup_vs_dense_int8"] = total["dense_int8"] / total["compact"]
    if layers:
        minor = token_minor_inputs(compact, lambda: model(**inputs))
        result["layers"], result["parts"] = layer_timings(compact, batch, seq, device, repeats, minor)
    return result


@torch.inference_mode()
def token_minor_inputs(compact: dict[str, nn.Module], forward: Any) -> set[str]:
    """The compact layers whose input arrives token-minor (tokens adjacent in memory) in a real ``forward()``: a
    gather layer before them keeps that layout (see :mod:`dsformer.kernels.gather`), which the layer is then
    timed on; every other layer gets token-major input, as a dense model would."""
    seen: set[str] = set()
    hooks = [
        layer.register_forward_pre_hook(
            lambda _, args, name=name: seen.add(name) if args[0].dim() >= 2 and args[0].stride(-2) == 1 else None
        )
        for name, layer in compact.items()
    ]
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.inference_mode()
def layer_timings(
    compact: dict[str, nn.Module],
    batch: int,
    seq: int,
    device: torch.device,
    repeats: int,
    token_minor: set[str] = frozenset(),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each compact layer on its own ``(batch, seq)`` input against its merged linear, and the sums per part
    of a block (attention, FFN): the backend it runs on, ms, speedup, and its multiply-add and byte limits.
    The layers named in ``token_minor`` (:func:`token_minor_inputs`) get their input in that layout."""
    rows, parts = {}, {}
    for name, layer in compact.items():
        with torch.inference_mode(False):  # as dense_original makes its linears
            linear = layer.merge()
        x = torch.randn(batch, seq, layer.in_features, generator=torch.Generator().manual_seed(1))
        x = x.to(device, linear.weight.dtype)
        # the compact layer gets its input as the layer before it leaves it in the model; the dense one gets
        # it as a dense model would (token-major)
        xc = x
        if name in token_minor and seq > 1:  # short sequences are gathered as one: tokens adjacent across them
            xc = x.mT.contiguous().mT if seq >= SHORT else x.reshape(-1, x.shape[-1]).mT.contiguous().mT.view(x.shape)
        backend = layer.backend if layer.backend != "auto" else choose(layer, xc)
        # the backend alone: an activation fused into the layer (surgery.fuse_activations) is not part of the linear
        compact_call = functools.partial(layer.run, backend, xc)
        before = None
        if timed_cold(batch * seq, device):  # decode-sized: weights from memory, as auto times it
            before = {"dense": lambda linear=linear: native.evict(layer_tensors(linear)),
                      "compact": lambda layer=layer: native.evict(layer_tensors(layer))}  # fmt: skip
        t = alternate({"dense": functools.partial(linear, x), "compact": compact_call}, device, repeats, before=before)
        dense_bytes = layer.out_features * layer.in_features * linear.weight.element_size()
        row = {
            "shape": [layer.out_features, layer.in_features],
            "layout": layer.describe(),
            "backend": backend,
            "dense_ms": 1000 * t["dense"],
            "compact_ms": 1000 * t["compact"],
            "speedup": t["dense"] / t["compact"],
            "flop_limit": layer.out_features * layer.in_features / backends.backend_of(layer, backend).work_for(layer),
            "byte_limit": dense_bytes / layer.weight_bytes(),
        }
        row["of_flop_limit"] = row["speedup"] / row["flop_limit"]
        row["of_byte_limit"] = row["speedup"] / row["byte_limit"]
        rows[name] = row
        part = parts.setdefault(_part(name), {"dense_ms": 0.0, "compact_ms": 0.0, "layers": 0})
        part["dense_ms"] += row["dense_ms"]
        part["compact_ms"] += row["compact_ms"]
        part["layers"] += 1
    for part in parts.values():
        part["speedup"] = part["dense_ms"] / part["compact_ms"]
    return rows, parts


def bench_table(result: dict[str, Any]) -> str:
    """A plain-text table of one :func:`bench_model` result."""
    e = result["end_to_end"]
    lines = [
        f"batch {result['batch']} x {result['seq']} tokens, backend {result['backend']}, "
        f"{result.get('dtype', 'float32')}, "
        f"median of {result['repeats']} alternating runs",
        f"  end to end: dense {e['dense_ms']:.1f} ms, compact {e['compact_ms']:.1f} ms -> {e['speedup']:.2f}x "
        f"({e['compact_tokens_per_s']:.0f} tokens/s against {e['dense_tokens_per_s']:.0f})",
    ]
    if "dense_int8_ms" in e:
        lines.append(
            f"  against the dense model with int8 linears: {e['dense_int8_ms']:.1f} ms -> "
            f"{e['speedup_vs_dense_int8']:.2f}x"
        )
    for part, p in sorted(result.get("parts", {}).items()):
        lines.append(
            f"  {part} linears ({p['layers']}): dense {p['dense_ms']:.1f} ms, compact {p['compact_ms']:.1f} ms "
            f"-> {p['speedup']:.2f}x"
        )
    if result.get("layers"):
        head = f"  {'layer':<44} {'layout':<12} {'backend':<9} {'dense ms':>8} {'ms':>7} {'speedup':>7} {'flop lim':>8}"
        lines += [head + f" {'byte lim':>8}"]
        for name, r in result["layers"].items():
            lines.append(
                f"  {name[-44:]:<44} {r['layout']:<12} {r['backend']:<9} {r['dense_ms']:>8.2f} {r['compact_ms']:>7.2f} "
                f"{r['speedup']:>6.2f}x {r['flop_limit']:>7.2f}x {r['byte_limit']:>7.2f}x"
            )
    return "\n".join(lines)
