"""Weight structures: one module each, a config (budget solver + fit) and a compact layer.

``STRUCTURES`` maps a structure name to its config class and compact layer class.
"""

from __future__ import annotations

from typing import Any

from dsformer.structures.base import CompactLinear
from dsformer.structures.dense_sparse import DenseSparseConfig, DenseSparseLinear
from dsformer.structures.low_rank import LowRankConfig, LowRankLinear
from dsformer.structures.nm_sparse import NMConfig, NMLinear

StructureConfig = DenseSparseConfig | LowRankConfig | NMConfig

STRUCTURES: dict[str, tuple[type, type[CompactLinear]]] = {
    "ds": (DenseSparseConfig, DenseSparseLinear),
    "svd": (LowRankConfig, LowRankLinear),
    "nm": (NMConfig, NMLinear),
}


def structure_config(name: str, **options: Any) -> StructureConfig:
    """Build the config of a structure by name, e.g. ``structure_config("ds", ratio=2.8)``."""
    from dsformer.errors import DsformerError

    if name not in STRUCTURES:
        raise DsformerError(f"unknown structure {name!r}; choose one of {', '.join(STRUCTURES)}")
    return STRUCTURES[name][0](**options)


def layer_class(name: str) -> type[CompactLinear]:
    return STRUCTURES[name][1]


def compact_layer(config: StructureConfig, factors: Any, bias: Any = None) -> CompactLinear:
    """The compact layer holding ``factors`` fitted with ``config``."""
    return layer_class(config.name)(factors, bias)


__all__ = [
    "STRUCTURES",
    "CompactLinear",
    "DenseSparseConfig",
    "DenseSparseLinear",
    "LowRankConfig",
    "LowRankLinear",
    "NMConfig",
    "NMLinear",
    "StructureConfig",
    "compact_layer",
    "layer_class",
    "structure_config",
]
