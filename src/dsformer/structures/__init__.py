"""Weight structures: one module each (a config that fits factors, and a compact layer), and their registry.

Every structure registers its config by name (:mod:`dsformer.structures.registry`); the rest of
dsformer asks the registry and the :class:`~dsformer.structures.base.Structure` interface, never a
structure by name or type. Importing this package registers the structures shipped with dsformer.
"""

from dsformer.structures.base import CompactLinear, Factors, Structure
from dsformer.structures.dense_sparse import DenseSparseConfig, DenseSparseLinear
from dsformer.structures.low_rank import LowRankConfig, LowRankLinear
from dsformer.structures.nm_sparse import NMConfig, NMLinear
from dsformer.structures.registry import get, names, register, structure_config

__all__ = [
    "CompactLinear",
    "DenseSparseConfig",
    "DenseSparseLinear",
    "Factors",
    "LowRankConfig",
    "LowRankLinear",
    "NMConfig",
    "NMLinear",
    "Structure",
    "get",
    "names",
    "register",
    "structure_config",
]
