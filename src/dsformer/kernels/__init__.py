"""Execution backends for compact layers, and the automatic choice between them.

Every compact layer can run on:

- ``reference``: plain PyTorch ops on the factors (differentiable; training always uses it);
- ``dense``: the materialized weight in one GEMM (the dense cost; the fallback that makes
  ``auto`` never slower than dense, at the memory of a dense weight);
- its structure's fast paths: for dense-sparse, ``gather`` (``dsformer.kernels.gather``: a compiled
  CPU kernel, else embedding-bags) and on CUDA ``triton`` (``dsformer.kernels.triton_ds``). Low
  rank's reference is already its fast path (two GEMMs); N:M has no kernel that beats dense;
- ``int8``: every GEMM in int8 (weights per row, activations per token; ``dsformer.kernels.int8``),
  DS's sparse stage a float gather. It changes the numerics, so only ``use_backend(model, "int8")``
  takes it, never ``auto``.

``auto`` times every path of a layer on its input shape the first time it meets a token count
(rounded up to a power of two) and keeps the fastest. Choices are cached in memory per layer
and on disk per machine (``$DSFORMER_CACHE`` or ``~/.cache/dsformer/kernels.json``), keyed by
layout, shape, token bucket, dtype, device and thread count, so a second run skips the timing.
Under ``torch.compile`` a layer never times anything: call ``calibrate`` before compiling.

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
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsformer.errors import DsformerError
from dsformer.structures.base import CompactLinear

BACKENDS = ("auto", "reference", "dense", "gather", "triton", "int8")
# paths that change the numerics: only taken when asked for by name, never by ``auto``
_APPROXIMATE = ("int8",)
_REPEATS = 7
_SAMPLE_SECONDS, _MAX_CALLS = 0.002, 50  # each timing sample repeats a fast path up to this long
# part of every cache key: bump it when a path's implementation changes, so old timings are not reused
REVISION = 6


def use_backend(model: nn.Module, name: str) -> int:
    """Set every compact layer of ``model`` to backend ``name``; returns how many layers were set.

    A layer without the named path (``gather`` on low rank) keeps ``reference``; a path that no
    layer has here (``triton`` on CPU) is an error rather than a silent reference run. Any backend
    but ``reference`` also fuses activations into the layers before them (:func:`fuse_activations`).
    """
    if name not in BACKENDS:
        raise DsformerError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    paths = {m: m.backends() for m in model.modules() if isinstance(m, CompactLinear)}
    offered = {path for layer_paths in paths.values() for path in layer_paths}
    if paths and name != "auto" and name not in offered:
        needs = sorted({need for layer in paths if (need := layer.unavailable().get(name))})
        where = f" (it needs {'; '.join(needs)})" if needs else ""
        raise DsformerError(
            f"backend {name!r}: none of the {len(paths)} compact layers has that path here{where}; "
            f"they have {', '.join(sorted(offered))} (or auto)"
        )
    for layer, layer_paths in paths.items():
        layer.backend = name if name == "auto" or name in layer_paths else "reference"
    if name == "reference":
        unfuse_activations(model)
    else:
        fuse_activations(model)
    return len(paths)


def fuse_activations(model: nn.Module) -> int:
    """Move the exact GELU after each compact up-projection into the layer; returns how many moved.

    A module with a compact ``dense`` layer followed by ``intermediate_act_fn`` (BERT, MPNet and
    their kin) gets ``dense.activation = "gelu"`` and an identity in place of the activation, so
    DS's gather kernel applies GELU before it stores each output instead of a separate pass.
    Every path still computes ``gelu(layer(x))``; the module keeps its parameters and its saved
    form. :func:`unfuse_activations` (and ``dsformer.compress.merge``) put the activation back.
    """
    moved = 0
    for module in model.modules():
        layer, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        if isinstance(layer, CompactLinear) and layer.activation is None and _is_exact_gelu(act):
            layer.activation = "gelu"
            layer.__dict__["_fused_from"] = act  # a plain attribute, not a submodule: restored by unfuse
            module.intermediate_act_fn = nn.Identity()
            moved += 1
    return moved


def unfuse_activations(model: nn.Module) -> int:
    """Undo :func:`fuse_activations`; returns how many activations were put back."""
    restored = 0
    for module in model.modules():
        layer = getattr(module, "dense", None)
        if isinstance(layer, CompactLinear) and "_fused_from" in layer.__dict__:
            module.intermediate_act_fn = layer.__dict__.pop("_fused_from")
            layer.activation = None
            restored += 1
    return restored


def _is_exact_gelu(act: Any) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation"  # transformers' exact GELU (erf form)


def token_bucket(tokens: int) -> int:
    """Token counts that share a choice: the next power of two."""
    return 1 << max(0, tokens - 1).bit_length()


def _shape(x: torch.Tensor) -> tuple[int, int]:
    """(tokens, sequence length) of an input, both rounded up to a power of two; 2-D input is one sequence."""
    tokens = x.numel() // max(1, x.shape[-1])
    seq = x.shape[-2] if x.dim() >= 3 else tokens
    return token_bucket(tokens), token_bucket(seq)


def choose(layer: CompactLinear, x: torch.Tensor) -> str:
    """The fastest path of ``layer`` for inputs shaped like ``x`` (timed once, then cached)."""
    tokens, seq = _shape(x)
    choices = layer.__dict__.setdefault("_kernel_choices", {})
    fast = (tokens, seq, x.dtype, x.device, torch.get_num_threads())
    if fast in choices:
        return choices[fast]
    if torch.compiler.is_compiling():
        return "reference"  # timing inside a trace means nothing; calibrate before compiling
    disk, key = _disk_cache(), _key(layer, tokens, seq, x)
    if key not in disk.entries:
        disk.entries[key] = _time_paths(layer, tokens, seq, x.dtype, x.device)
        disk.save()
    choices[fast] = disk.entries[key]["choice"]
    _release_unused(layer, set(choices.values()))
    return choices[fast]


def _release_unused(layer: CompactLinear, used: set[str]) -> None:
    """Drop what timing the other paths cached (a dense weight, densified coefficients): memory is the point."""
    keep = {slot for path in used for slot in layer.cache_slots(path)}
    cache = layer.__dict__.get("_kernel_cache", {})
    for slot in [slot for slot in cache if slot not in keep]:
        del cache[slot]


@torch.inference_mode()
def calibrate(
    model: nn.Module, shapes: list[tuple[int, int]], device: torch.device | str | None = None
) -> dict[str, Any]:
    """Time every compact layer's paths now for inputs of ``(batch, seq)`` tokens; return the choices."""
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
    from dsformer.hardware import describe

    return describe()["cpu"]


def _time_paths(layer: CompactLinear, tokens: int, seq: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Median time of each path on random input, interleaved so drifts in machine speed hit all alike."""
    shape = (max(1, tokens // seq), seq, layer.in_features)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    if layer.in_features > layer.out_features:
        # a narrowing layer usually follows a widening one (an FFN), whose gather leaves its output
        # token-minor: time every path on that layout, as the model will run it
        x = x.mT.contiguous().mT
    paths = [p for p in layer.backends() if p not in _APPROXIMATE and _runs(layer, p, x)]
    times: dict[str, list[float]] = {p: [] for p in paths}
    with torch.inference_mode():
        # a sample runs a path enough times to take about 2 ms: single calls of a 0.1 ms layer are
        # noise-dominated, and a wrong choice there is paid on every forward
        once = {p: seconds(functools.partial(layer.run, p, x), x.device) for p in paths}
        calls = {p: max(1, min(_MAX_CALLS, math.ceil(_SAMPLE_SECONDS / max(t, 1e-7)))) for p, t in once.items()}
        for _ in range(_REPEATS):
            for p in paths:
                run = functools.partial(_run_times, layer, p, x, calls[p])
                times[p].append(seconds(run, x.device) / calls[p])
    median = {p: statistics.median(t) for p, t in times.items()}
    return {"choice": min(median, key=median.get), "seconds": median}


def _run_times(layer: CompactLinear, path: str, x: torch.Tensor, calls: int) -> None:
    for _ in range(calls):
        layer.run(path, x)


def _runs(layer: CompactLinear, path: str, x: torch.Tensor) -> bool:
    """Whether a path works here (some ops lack a dtype on some devices); it also warms the path up."""
    try:
        with torch.inference_mode():
            layer.run(path, x)
        return True
    except (RuntimeError, NotImplementedError):
        return False
    except Exception as err:  # a Triton kernel that does not build here (out of resources, ...) drops its path
        if type(err).__module__.startswith("triton"):
            warnings.warn(f"{path} does not run here ({type(err).__name__}: {err}); it is not used", stacklevel=2)
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

    def save(self) -> None:
        from dsformer.io import atomic_write_text

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home only costs a re-calibration next time


_CACHE: _DiskCache | None = None


def cache_dir() -> Path:
    """Where dsformer keeps per-machine state: kernel timings and the compiled native kernel."""
    return Path(os.environ.get("DSFORMER_CACHE", Path.home() / ".cache" / "dsformer"))


def _disk_cache() -> _DiskCache:
    global _CACHE
    path = cache_dir() / "kernels.json"
    if _CACHE is None or _CACHE.path != path:
        _CACHE = _DiskCache(path)
    return _CACHE


__all__ = ["BACKENDS", "calibrate", "choose", "describe_choices", "seconds", "token_bucket", "use_backend"]
