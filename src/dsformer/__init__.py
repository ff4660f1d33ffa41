"""dsformer: make pretrained transformers smaller and faster with dense-sparse weight factorization.

The names below are the library; ``import dsformer`` loads each on first use, so the command line
starts without PyTorch and the library without transformers.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> import dsformer
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> report = dsformer.compress(model, dsformer.CompressConfig(dsformer.DenseSparseConfig(ratio=2.0)),
    ...                            progress=False)
    >>> report.ratio_params >= 2.0
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dsformer.version import __version__

# public name -> the module that defines it
_API = {
    "DsformerError": "dsformer.errors",
    "InfeasibleRatioError": "dsformer.errors",
    "TargetError": "dsformer.errors",
    "CheckpointError": "dsformer.errors",
    "DenseSparseConfig": "dsformer.structures",
    "LowRankConfig": "dsformer.structures",
    "NMConfig": "dsformer.structures",
    "structure_config": "dsformer.structures",
    "CompressConfig": "dsformer.surgery",
    "compress": "dsformer.surgery",
    "compress_calibrated": "dsformer.calibration",
    "find_targets": "dsformer.surgery",
    "merge": "dsformer.surgery",
    "Report": "dsformer.report",
    "quantize_int8": "dsformer.quantize",
    "save": "dsformer.checkpoint",
    "load": "dsformer.checkpoint",
    "export_dense": "dsformer.checkpoint",
    "use_backend": "dsformer.kernels",
    "STF": "dsformer.stf",
    "Schedule": "dsformer.stf",
    "STFCallback": "dsformer.callbacks",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'dsformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from dsformer.calibration import compress_calibrated  # noqa: F401
    from dsformer.callbacks import STFCallback  # noqa: F401
    from dsformer.checkpoint import export_dense, load, save  # noqa: F401
    from dsformer.errors import CheckpointError, DsformerError, InfeasibleRatioError, TargetError  # noqa: F401
    from dsformer.kernels import use_backend  # noqa: F401
    from dsformer.quantize import quantize_int8  # noqa: F401
    from dsformer.report import Report  # noqa: F401
    from dsformer.stf import STF, Schedule  # noqa: F401
    from dsformer.structures import DenseSparseConfig, LowRankConfig, NMConfig, structure_config  # noqa: F401
    from dsformer.surgery import CompressConfig, compress, find_targets, merge  # noqa: F401
