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
    >>> from dsformer.bench import latency_ms
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

from dsformer.compress import compact_layers, merge
from dsformer.hardware import describe
from dsformer.kernels import calibrate, choose, seconds, use_backend
from dsformer.kernels.int8 import int8_linears


def _inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def latency_ms(model: nn.Module, batch: int = 1, seq: int = 64, repeats: int = 20, warmup: int = 3) -> float:
    """Median forward latency in milliseconds on token ids of shape ``(batch, seq)``."""
    model.eval()
    device = next(model.parameters()).device
    inputs = _inputs(model, batch, seq, device)
    times = [seconds(lambda: model(**inputs), device) for _ in range(warmup + repeats)]
    return 1000 * statistics.median(times[warmup:])


@torch.inference_mode()
def alternate(fns: dict[str, Any], device: torch.device, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, timed in turns (``a b a b ...``) after a warm-up of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


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
    ``layers`` (per compact layer: the path ``auto`` chose, ms, speedup, limits) and ``parts``
    (attention and FFN linears summed).
    """
    model.eval()
    device = next(model.parameters()).device
    tokens = batch * seq
    compact = compact_layers(model)
    use_backend(model, backend)
    calibrate(model, [(batch, seq)])
    dense = merge(copy.deepcopy(model)).eval()
    inputs = _inputs(model, batch, seq, device)
    runs = {"dense": lambda: dense(**inputs), "compact": lambda: model(**inputs)}
    if backend == "int8":  # int8 compact layers also face the dense model with int8 linears
        dense8 = int8_linears(merge(copy.deepcopy(model)).eval(), list(compact))
        runs["dense_int8"] = lambda: dense8(**inputs)
    total = alternate(runs, device, repeats)
    result: dict[str, Any] = {
        "batch": batch,
        "seq": seq,
        "backend": backend,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "repeats": repeats,
        "end_to_end": {
            "dense_ms": 1000 * total["dense"],
            "compact_ms": 1000 * total["compact"],
            "dense_tokens_per_s": tokens / total["dense"],
            "compact_tokens_per_s": tokens / total["compact"],
            "speedup": total["dense"] / total["compact"],
        },
    }
    if "dense_int8" in total:
        result["end_to_end"]["dense_int8_ms"] = 1000 * total["dense_int8"]
        result["end_to_end"]["speedup_vs_dense_int8"] = total["dense_int8"] / total["compact"]
    if not layers:
        return result
    rows, parts = {}, {}
    for name, layer in compact.items():
        linear = layer.merge()
        x = torch.randn(batch, seq, layer.in_features, generator=torch.Generator().manual_seed(1))
        x = x.to(device, linear.weight.dtype)
        # a narrowing layer gets its input as the compact layer before it leaves it (token-minor, see
        # dsformer.kernels.gather); the dense one gets it as a dense model would (token-major)
        xc = x.mT.contiguous().mT if layer.in_features > layer.out_features else x
        path = layer.backend if layer.backend != "auto" else choose(layer, xc)
        # the path alone: an activation fused into the layer (kernels.fuse_activations) is not part of the linear
        compact_call = functools.partial(layer.run, path, xc)
        t = alternate({"dense": functools.partial(linear, x), "compact": compact_call}, device, repeats)
        dense_bytes = layer.out_features * layer.in_features * linear.weight.element_size()
        row = {
            "shape": [layer.out_features, layer.in_features],
            "layout": layer.describe(),
            "path": path,
            "dense_ms": 1000 * t["dense"],
            "compact_ms": 1000 * t["compact"],
            "speedup": t["dense"] / t["compact"],
            "flop_limit": layer.out_features * layer.in_features / layer.work(path),
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
    result["layers"], result["parts"] = rows, parts
    return result


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
        head = f"  {'layer':<44} {'layout':<12} {'path':<9} {'dense ms':>8} {'ms':>7} {'speedup':>7} {'flop lim':>8}"
        lines += [head + f" {'byte lim':>8}"]
        for name, r in result["layers"].items():
            lines.append(
                f"  {name[-44:]:<44} {r['layout']:<12} {r['path']:<9} {r['dense_ms']:>8.2f} {r['compact_ms']:>7.2f} "
                f"{r['speedup']:>6.2f}x {r['flop_limit']:>7.2f}x {r['byte_limit']:>7.2f}x"
            )
    return "\n".join(lines)


def bench_record(results: list[dict[str, Any]], command: str, source: str) -> dict[str, Any]:
    """What ``dsformer bench --output`` stores: the runs, the command, the model and the hardware."""
    return {"command": command, "model": source, "runs": results, "hardware": describe()}
