"""The backend of every compact layer: set by name, or chosen by timing (``auto``), with a per-machine cache.

``auto`` times every exact backend of a layer on its input shape the first time it meets a
token count (rounded up to a power of two) and keeps the fastest. Choices are cached in memory
per layer and on disk per machine (``$DSFORMER_CACHE`` or ``~/.cache/dsformer/kernels.json``),
keyed by layout, shape, token bucket, dtype, device and thread count, so a second run skips the
timing. Under ``torch.compile`` a layer never times anything: call ``calibrate`` before compiling.

Example:
    >>> import torch
    >>> from dsformer.kernels import use_backend
    >>> from dsformer.structures import DenseSparseConfig, DenseSparseLinear
    >>> (factors,) = DenseSparseConfig(ratio=2.0, iters=3).fit([torch.randn(96, 64)])
    >>> layer = DenseSparseLinear(factors).requires_grad_(False)
    >>> x = torch.randn(5, 64)
    >>> want = layer(x)
    >>> use_backend(layer, "gather")
    1
    >>> torch.allclose(layer(x), want, atol=1e-4)
    True
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsformer.errors import DsformerError
from dsformer.files import atomic_write_text, cache_dir
from dsformer.hardware import describe
from dsformer.kernels import native
from dsformer.structures import CompactLinear, backends
from dsformer.structures.backends import available, backend_of, registered, set_chooser
from dsformer.surgery import fuse_activations, unfuse_activations

_REPEATS = 7
# inputs of fewer tokens than this, rounded up to a power of two (decode steps: at most 8 tokens), are timed
# with the layer's memory evicted from the caches before each call (`timed_cold`): at a decode step each
# layer's weights are read once per token and, in a model larger than the cache, come from memory; timed hot
# in a loop, a 1536 x 576 dense product at one token took a quarter of its time in a decoding model (Xeon VM),
# and the choice went to the wrong backend
COLD_BELOW = 16
_SAMPLE_SECONDS, _MAX_CALLS = 0.002, 50  # each timing sample repeats a fast backend up to this long
# part of every cache key: bump it when a backend's implementation changes, so old timings are not reused
REVISION = 11


def use_backend(model: nn.Module, name: str) -> int:
    """Set every compact layer of ``model`` to backend ``name`` (or ``auto``); returns how many layers were set.

    A layer without the named backend (``gather`` on low rank) keeps ``reference``; a backend that no
    layer has here (``triton`` on CPU) is an error rather than a silent reference run. Any backend
    but ``reference`` also fuses activations into the layers before them (``surgery.fuse_activations``).
    """
    check_backend(name)
    layers = [m for m in model.modules() if isinstance(m, CompactLinear)]
    offered = {layer: available(layer) for layer in layers}
    if name != "auto" and layers and not any(name in names for names in offered.values()):
        needs = sorted({backend_of(layer, name).needs for layer in layers if name in registered(layer)} - {""})
        where = f" (it needs {'; '.join(needs)})" if needs else ""
        have = sorted({backend for names in offered.values() for backend in names})
        raise DsformerError(
            f"backend {name!r}: none of the {len(layers)} compact layers has it here{where}; "
            f"they have {', '.join(have)} (or auto)"
        )
    for layer, names in offered.items():
        layer.backend = name if name == "auto" or name in names else "reference"
    if name == "reference":
        unfuse_activations(model)
    else:
        fuse_activations(model)
    return len(layers)


def check_backend(name: str) -> str:
    """``name`` if a backend of that name is registered for some structure (or it is ``auto``)."""
    known = backends.names() | {"auto"}
    if name not in known:
        raise DsformerError(f"unknown backend {name!r}; choose one of {', '.join(sorted(known))}")
    return name


def token_bucket(tokens: int) -> int:
    """Token counts that share a choice: the next power of two."""
    return 1 << max(0, tokens - 1).bit_length()


def _shape(x: torch.Tensor) -> tuple[int, int]:
    """(tokens, sequence length) of an input, both rounded up to a power of two; 2-D input is one sequence."""
    tokens = x.numel() // max(1, x.shape[-1])
    seq = x.shape[-2] if x.dim() >= 3 else tokens
    return token_bucket(tokens), token_bucket(seq)


def choose(layer: CompactLinear, x: torch.Tensor) -> str:
    """The fastest backend of ``layer`` for inputs shaped like ``x`` (timed once, then cached)."""
    tokens, seq = _shape(x)
    choices = layer.__dict__.setdefault("_kernel_choices", {})
    fast = (tokens, seq, x.dtype, x.device, torch.get_num_threads())
    if fast in choices:
        return choices[fast]
    if torch.compiler.is_compiling():
        return "reference"  # timing inside a trace means nothing; calibrate before compiling
    disk, key = _disk_cache(), _key(layer, tokens, seq, x)
    if not _usable(layer, disk.entries.get(key)):  # not timed yet, or a cache entry that is not ours to trust
        disk.entries[key] = _time_backends(layer, tokens, seq, x.dtype, x.device)
        disk.save()
    choices[fast] = disk.entries[key]["choice"]
    _release_unused(layer, set(choices.values()))
    return choices[fast]


set_chooser(choose)


def _usable(layer: CompactLinear, entry: Any) -> bool:
    """Whether a cached entry names an exact backend this layer has here (``auto`` never takes int8)."""
    choice = entry.get("choice") if isinstance(entry, dict) else None
    return choice in available(layer) and backend_of(layer, choice).exact


def _release_unused(layer: CompactLinear, used: set[str]) -> None:
    """Drop what timing the other backends cached (a dense weight, densified coefficients): memory is the point."""
    keep = {slot for backend in used for slot in backend_of(layer, backend).slots}
    cache = layer.__dict__.get("_kernel_cache", {})
    for slot in [slot for slot in cache if slot not in keep]:
        del cache[slot]


@torch.inference_mode()
def calibrate(
    model: nn.Module, shapes: list[tuple[int, int]], device: torch.device | str | None = None
) -> dict[str, Any]:
    """Time every compact layer's backends now for inputs of ``(batch, seq)`` tokens; return the choices."""
    out: dict[str, Any] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, CompactLinear):
            continue
        weight = next(iter(layer.factor_tensors()))
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        dev = torch.device(device) if device is not None else weight.device
        shaped = {f"{b}x{s}": torch.empty(b, s, layer.in_features, dtype=dtype, device=dev) for b, s in shapes}
        out[name] = {shape: choose(layer, x) for shape, x in shaped.items()}
    return out


def describe_choices(model: nn.Module) -> dict[str, dict[str, str]]:
    """Each compact layer's choices so far, ``{layer: {"<tokens>/<seq>": backend}}`` (powers of two)."""
    return {
        name: {f"{key[0]}/{key[1]}": choice for key, choice in layer.__dict__.get("_kernel_choices", {}).items()}
        for name, layer in model.named_modules()
        if isinstance(layer, CompactLinear)
    }


def _key(layer: CompactLinear, tokens: int, seq: int, x: torch.Tensor) -> str:
    layout = ",".join(f"{k}={v}" for k, v in sorted(layer.layout().items()))
    return (
        f"r{REVISION}|{_machine()}|{layer.structure}|{layout}|{layer.out_features}x{layer.in_features}"
        f"|bias={layer.bias is not None}|T={tokens}|L={seq}|{x.dtype}|{x.device.type}|threads={torch.get_num_threads()}"
    )


@functools.cache
def _machine() -> str:
    return f"{describe()['cpu']}|native={native.variant()}"  # a timing of one kernel variant is not another's


def _time_backends(layer: CompactLinear, tokens: int, seq: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Median time of each backend on random input, interleaved so drifts in machine speed hit all alike."""
    shape = (max(1, tokens // seq), seq, layer.in_features)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    if layer.in_features > layer.out_features:
        # a narrowing layer usually follows a widening one (an FFN), whose gather leaves its output
        # token-minor: time every backend on that layout, as the model will run it
        x = x.mT.contiguous().mT
    names = [p for p in available(layer) if backend_of(layer, p).exact and _runs(layer, p, x)]
    times: dict[str, list[float]] = {p: [] for p in names}
    cold = timed_cold(tokens, device) and native.evict(layer_tensors(layer))
    with torch.inference_mode():
        if cold:  # one call a sample, each after the layer's memory is evicted
            calls = dict.fromkeys(names, 1)
        else:
            # a sample runs a backend enough times to take about 2 ms: single calls of a 0.1 ms layer are
            # noise-dominated, and a wrong choice there is paid on every forward
            once = {p: seconds(functools.partial(layer.run, p, x), x.device) for p in names}
            calls = {p: max(1, min(_MAX_CALLS, math.ceil(_SAMPLE_SECONDS / max(t, 1e-7)))) for p, t in once.items()}
        for _ in range(_REPEATS):
            for p in names:
                if cold:
                    native.evict(layer_tensors(layer))
                run = functools.partial(_run_times, layer, p, x, calls[p])
                times[p].append(seconds(run, x.device) / calls[p])
    median = {p: statistics.median(t) for p, t in times.items()}
    chosen = {"choice": min(median, key=median.get), "seconds": median}
    return {**chosen, "cold": True} if cold else chosen


def timed_cold(tokens: int, device: torch.device) -> bool:
    """Whether inputs of ``tokens`` tokens are timed with the weights evicted from the caches (decode sizes, CPU)."""
    return token_bucket(tokens) < COLD_BELOW and device.type == "cpu"


def layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor a layer holds: its parameters and buffers, and what a compact layer's backends cached (plans, a
    dense weight)."""
    found = [t.detach() for t in [*layer.parameters(), *layer.buffers()]]
    pending = [value for _, value in layer.__dict__.get("_kernel_cache", {}).values()]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
    return found


def _run_times(layer: CompactLinear, backend: str, x: torch.Tensor, calls: int) -> None:
    for _ in range(calls):
        layer.run(backend, x)


def _runs(layer: CompactLinear, backend: str, x: torch.Tensor) -> bool:
    """Whether a backend works here (some ops lack a dtype on some devices); it also warms it up."""
    try:
        with torch.inference_mode():
            layer.run(backend, x)
        return True
    except (RuntimeError, NotImplementedError):
        return False
    except Exception as err:  # a Triton kernel that does not build here (out of resources, ...) drops its backend
        if type(err).__module__.startswith("triton"):
            warnings.warn(f"{backend} does not run here ({type(err).__name__}: {err}); it is not used", stacklevel=2)
            return False
        raise


def seconds(fn, device: torch.device) -> float:
    """Wall time of ``fn()``, with the GPU's queued work included where there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class _DiskCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}  # missing or unreadable: time again rather than fail inference
        if not isinstance(self.entries, dict):  # [] or null: not a cache of ours
            self.entries = {}

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home only costs a re-calibration next time


_CACHE: _DiskCache | None = None


def _disk_cache() -> _DiskCache:
    global _CACHE
    path = cache_dir() / "kernels.json"
    if _CACHE is None or _CACHE.path != path:
        _CACHE = _DiskCache(path)
    return _CACHE
