"""dsformer: make pretrained transformers smaller and faster with dense-sparse weight factorization.

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

__version__ = "0.1.0"

from dsformer.compress import CompressConfig, compress, find_targets, merge  # noqa: E402
from dsformer.errors import CheckpointError, DsformerError, InfeasibleRatioError, TargetError  # noqa: E402
from dsformer.io import export_dense, load, save  # noqa: E402
from dsformer.report import Report  # noqa: E402
from dsformer.structures import DenseSparseConfig, LowRankConfig, NMConfig, structure_config  # noqa: E402

__all__ = [
    "CheckpointError",
    "CompressConfig",
    "DenseSparseConfig",
    "DsformerError",
    "InfeasibleRatioError",
    "LowRankConfig",
    "NMConfig",
    "Report",
    "TargetError",
    "compress",
    "export_dense",
    "find_targets",
    "load",
    "merge",
    "save",
    "structure_config",
]
