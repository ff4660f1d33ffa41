"""Execution backends for compact layers, and the automatic choice between them.

Every compact layer can run on ``reference`` (plain PyTorch ops on the factors; training always
uses it) and ``dense`` (the materialized weight in one GEMM: the dense cost, the fallback that
makes ``auto`` never slower than dense). Importing this package registers the fast backends in
the table that compact layers consult (:mod:`dsformer.structures.backends`):

- dense-sparse: ``gather`` (a compiled CPU kernel, else embedding-bags; up to four tokens the
  decode path of :mod:`~dsformer.kernels.decode`) and on CUDA ``triton``
  (:mod:`~dsformer.kernels.dense_sparse`). Low rank's reference is already its fast backend
  (two GEMMs); N:M has no kernel that beats dense on a CPU;
- every structure: ``int8`` (every GEMM in int8, :mod:`~dsformer.kernels.int8`). It changes the
  numerics, so only ``use_backend(model, "int8")`` takes it, never ``auto``.

:func:`use_backend` sets a model's backend by name or to ``auto`` (:mod:`~dsformer.kernels.choice`).
"""

from dsformer.kernels import dense_sparse, int8  # noqa: F401  (registers their backends)
from dsformer.kernels.choice import (
    REVISION,
    cache_dir,
    calibrate,
    check_backend,
    choose,
    describe_choices,
    seconds,
    use_backend,
)

__all__ = [
    "REVISION",
    "cache_dir",
    "calibrate",
    "check_backend",
    "choose",
    "describe_choices",
    "seconds",
    "use_backend",
]
