"""A compiled CPU kernel for the sparse stage of a dense-sparse product: weighted bags of rows.

``weighted_bags(rows, index, weights, bag_size=s)`` computes, for every sequence ``t`` and bag
``b``, ``out[t, b] = Σ weights[e] · rows[t, index[e]]`` over the entries ``e`` of the bag: the
same as ``F.embedding_bag(index, rows[t], offsets, per_sample_weights=weights, mode="sum")``
for every sequence, in one call. The kernel keeps each output row in vector registers over its
whole bag, so it reads each gathered row once and writes each output once; the embedding-bag
adds into its output in memory, one load and one store more per multiply-add.

One variant per CPU family, chosen at run time (:func:`variant`): ``avx512`` (``bags.c``,
AVX-512 intrinsics) where torch detects AVX-512, else ``avx2`` (``bags_portable.c``, the C
compiler's vector extensions built with AVX2 + FMA) on x86-64, and ``neon`` (the same portable
source) on ARM64 Linux. ``DSFORMER_NATIVE=avx2`` (or another variant's name) asks for one that
this CPU runs; ``DSFORMER_NATIVE=0`` turns the kernel off. It is compiled on first use with the
system's C compiler (``$CC``, else ``cc`` or ``gcc``) into the dsformer cache (``$DSFORMER_CACHE``
or ``~/.cache/dsformer``), keyed by a hash of the sources and flags, and loaded with ``ctypes``.
Without a variant for this CPU or a compiler, :func:`available` is false and the gather path uses
the embedding-bag: the result is the same either way.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> from dsformer.kernels import native
    >>> rows, index = torch.randn(2, 5, 40), torch.tensor([0, 3, 4, 4, 1, 2], dtype=torch.int32)
    >>> weights = torch.randn(6)
    >>> want = torch.stack([F.embedding_bag(index.reshape(3, 2), r, per_sample_weights=weights.reshape(3, 2),
    ...     mode="sum") for r in rows])
    >>> got = native.weighted_bags(rows, index, weights, bag_size=2) if native.available() else want
    >>> torch.allclose(got, want, atol=1e-5)
    True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from dsformer.files import cache_dir

HERE = Path(__file__).parent
DRIVER = HERE / "bags_driver.h"  # included by every variant's source
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
INDEX_TYPES = {torch.int32: 0, torch.int16: 1, torch.uint8: 2}  # the kernel's codes for its index types
VARIANTS = {  # name: (source, the ISA's flags)
    "avx512": (HERE / "bags.c", ("-mavx512f", "-mfma")),
    "avx2": (HERE / "bags_portable.c", ("-mavx2", "-mfma")),
    "neon": (HERE / "bags_portable.c", ()),  # NEON is part of every ARM64 CPU
}


def readable(index: torch.Tensor) -> torch.Tensor:
    """Indices as the kernel reads them: stored uint8, int16 or int32 as they are (no wider copy to keep or
    to read), any other integer type as int32."""
    return index if index.dtype in INDEX_TYPES else index.int()


def available() -> bool:
    """Whether the compiled kernel runs here (compiling it on the first call)."""
    return _library() is not None


def runnable() -> list[str]:
    """The variants this CPU runs, fastest first (AVX-512 machines run the AVX2 one too)."""
    if platform.system() != "Linux":
        return []
    if platform.machine().lower() in ("aarch64", "arm64"):
        return ["neon"]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()  # AVX2 means AVX2 with FMA to torch
    if capability in ("AVX512", "AVX512_BF16", "AMX"):
        return ["avx512", "avx2"]
    return ["avx2"] if capability == "AVX2" else []


@functools.cache
def variant() -> str | None:
    """The variant in use: ``$DSFORMER_NATIVE`` when it names one this CPU runs, else the fastest (None: off)."""
    asked = os.environ.get("DSFORMER_NATIVE", "1").lower()
    here = runnable()
    if asked == "0" or not here:
        return None
    if asked in VARIANTS and asked not in here:
        warnings.warn(f"dsformer: DSFORMER_NATIVE={asked} does not run on this CPU; using {here[0]}", stacklevel=2)
    return asked if asked in here else here[0]


def weighted_bags(
    rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    bag_size: int | None = None,
    bias: torch.Tensor | None = None,
    token_major: bool = False,
    gelu: bool = False,
) -> torch.Tensor:
    """``rows (S, R, L)`` float32 on CPU, ``index (E,)`` int32, int16 or uint8, ``weights (E,)`` -> ``(S, B, L)``.

    Bags are given either by ``offsets (B + 1,)`` int32 (bag ``b`` is ``offsets[b]:offsets[b + 1]``,
    empty bags give zeros) or by a fixed ``bag_size`` (``E = B * bag_size``). ``bias (B,)`` is added
    to every bag's row and ``gelu`` applies GELU (erf form, absolute error below 5e-7) before each
    output is stored; ``token_major`` returns ``(S, L, B)`` instead, written in place of a
    transposing copy. Indices are read in their own type (a DS layer's uint8 or int16 indices are not
    widened first, which would read and write more bytes than the product itself). They are not checked:
    callers pass indices below ``R`` (a DS layer's are, by construction; a loaded one's are checked on
    loading).
    """
    if _library() is None:
        raise RuntimeError("the native kernel is not available here (dsformer.kernels.native.available())")
    if (offsets is None) == (bag_size is None):
        raise ValueError("give exactly one of offsets and bag_size")
    if rows.dtype != torch.float32 or rows.device.type != "cpu" or rows.dim() != 3:
        raise ValueError(f"rows must be a 3-D float32 CPU tensor, got {tuple(rows.shape)} {rows.dtype} {rows.device}")
    if index.dtype not in INDEX_TYPES or (offsets is not None and offsets.dtype != torch.int32):
        raise ValueError(f"index must be int32, int16 or uint8 and offsets int32, got {index.dtype}")
    if index.dim() != 1 or weights.shape != index.shape:
        raise ValueError(
            f"index and weights must be 1-D of one length, got {tuple(index.shape)}, {tuple(weights.shape)}"
        )
    if offsets is None and (bag_size < 1 or index.numel() % bag_size):
        raise ValueError(f"bag_size {bag_size} must be positive and divide the {index.numel()} entries")
    if offsets is not None and (offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[-1]) > index.numel()):
        raise ValueError("offsets must be 1-D, start each bag and end with the entry count")
    bags = _bag_count(index, offsets, bag_size or 0)
    if bias is not None and bias.shape != (bags,):
        raise ValueError(f"bias must have one value per bag ({bags}), got {tuple(bias.shape)}")
    return bags_of_checked(rows, index, weights, offsets, bag_size or 0, bias, token_major, gelu)


def bags_of_checked(
    rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor | None,
    bag_size: int,
    bias: torch.Tensor | None,
    token_major: bool,
    gelu: bool,
) -> torch.Tensor:
    """:func:`weighted_bags` without its checks, for callers whose arguments are proved once, not per call
    (a DS layer checks its indices when it first builds them; at one token the checks cost as much as the
    sums)."""
    if torch.compiler.is_compiling():  # an opaque op to the compiler, with its output shape known
        return torch.ops.dsformer.weighted_bags(rows, index, weights, offsets, bag_size, bias, token_major, gelu)
    return _weighted_bags(rows, index, weights, offsets, bag_size, bias, token_major, gelu)


def _weighted_bags(
    rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor | None,
    bag_size: int,
    bias: torch.Tensor | None,
    token_major: bool,
    gelu: bool,
) -> torch.Tensor:
    rows, index = rows.contiguous(), index.contiguous()
    weights = weights.to(torch.float32).contiguous()
    offsets = offsets.contiguous() if offsets is not None else None
    bias = bias.to(torch.float32).contiguous() if bias is not None else None
    out = _output(rows, index, offsets, bag_size, token_major)
    _library().dsformer_weighted_bags(
        rows.data_ptr(), rows.shape[0], rows.shape[1], rows.shape[2], index.data_ptr(), INDEX_TYPES[index.dtype],
        None if offsets is None else offsets.data_ptr(), bag_size, weights.data_ptr(),
        None if bias is None else bias.data_ptr(), _bag_count(index, offsets, bag_size), out.data_ptr(),
        int(token_major), int(gelu), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _output(
    rows: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor | None, bag_size: int, token_major: bool
) -> torch.Tensor:
    bags = _bag_count(index, offsets, bag_size)
    shape = (rows.shape[0], rows.shape[2], bags) if token_major else (rows.shape[0], bags, rows.shape[2])
    return rows.new_empty(shape)


def _bag_count(index: torch.Tensor, offsets: torch.Tensor | None, bag_size: int) -> int:
    return index.shape[0] // bag_size if offsets is None else offsets.shape[0] - 1


_op = torch.library.custom_op("dsformer::weighted_bags", mutates_args=())(_weighted_bags)


@_op.register_fake
def _(rows, index, weights, offsets, bag_size, bias, token_major, gelu):
    return _output(rows, index, offsets, bag_size, token_major)


def _library() -> ctypes.CDLL | None:
    chosen = variant()
    return None if chosen is None else _built(chosen)


@functools.cache
def _built(name: str) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    try:
        lib = ctypes.CDLL(str(_compiled(compiler, name)))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"dsformer: native gather kernel not built ({err}); using the embedding-bag", stacklevel=2)
        return None
    fn = lib.dsformer_weighted_bags
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c_int = ctypes.c_int
    fn.argtypes = [ptr, i64, i64, i64, ptr, c_int, ptr, i64, ptr, ptr, i64, ptr, c_int, c_int, c_int]
    fn.restype = ctypes.c_int
    lib.dsformer_decode_rows.argtypes = [
        ptr, i64, ptr, i64, i64, ptr, c_int, ptr, i64, i64, ptr, c_int, ptr, c_int, c_int
    ]  # fmt: skip
    lib.dsformer_decode_columns.argtypes = [
        ptr, i64, i64, ptr, c_int, ptr, ptr, ptr, i64, ptr, i64, i64, ptr, ptr, c_int, c_int
    ]  # fmt: skip
    lib.dsformer_decode_rows.restype = lib.dsformer_decode_columns.restype = ctypes.c_int
    lib.dsformer_evict.argtypes, lib.dsformer_evict.restype = [ptr, i64, c_int], ctypes.c_int
    return lib


def evict(tensors: list[torch.Tensor]) -> bool:
    """Drop the memory of CPU ``tensors`` from every cache level (the next read comes from memory); False where
    this CPU or build cannot."""
    lib, threads = _library(), torch.get_num_threads()
    if lib is None:
        return False
    for t in tensors:
        storage = t.untyped_storage()  # all of it: a strided view's bytes are not one span from its first
        size = storage.nbytes()
        if t.device.type == "cpu" and size and lib.dsformer_evict(storage.data_ptr(), size, threads):
            return False
    return True


def library() -> ctypes.CDLL:
    """The loaded kernel library (callers check :func:`available` first)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernel is not available here (dsformer.kernels.native.available())")
    return lib


def _private(path: Path) -> bool:
    """Whether ``path`` is this user's own and no one else can write it (and is no link to elsewhere)."""
    info = path.lstat()
    return not stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _compiled(compiler: str, name: str) -> Path:
    """The shared library of variant ``name`` (its sources and flags), built once per machine and cached.

    Loading a library runs its code, so only one this user built is loaded: the cache folder must be
    the user's own and writable by no one else, and a library found there that is not (planted, or
    left writable) is built again over it. A library is built under a private temporary name and
    renamed into place, so no other process ever loads half of it.
    """
    source, isa = VARIANTS[name]
    flags = (*FLAGS, *isa)
    key = hashlib.sha256(source.read_bytes() + DRIVER.read_bytes() + " ".join((compiler, *flags)).encode())
    folder = cache_dir() / "native"
    target = folder / f"bags-{name}-{key.hexdigest()[:16]}.so"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private(folder):
        raise OSError(f"{folder} is not yours alone (owner or permissions); the compiled kernel is not loaded from it")
    if target.exists() and _private(target):
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, "-o", str(built), str(source)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip()[-500:] or f"{compiler} exited {result.returncode}")
        os.chmod(built, 0o755)  # whatever the umask: writable by its owner only
        os.replace(built, target)  # atomic: a concurrent process sees the whole library or none
    return target
