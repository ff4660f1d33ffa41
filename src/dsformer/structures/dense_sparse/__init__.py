"""Dense-sparse (DS) factorization, ``W ≈ C @ B`` (see docs/method.md).

The weight vectors are the longer side of ``W``: ``N`` vectors of dimension ``d``. ``B`` (``k x d``)
is a dense basis shared by the layer; ``C`` (``N x k``) has exactly ``s`` non-zeros in every row,
stored in ELL form. ``s == k`` is rank-``k`` low rank; ``s < k`` puts each vector in its own
``s``-dimensional subspace of the basis (a union of subspaces).

- :mod:`~dsformer.structures.dense_sparse.layout`: shapes, budgets, the factors of one layer;
- :mod:`~dsformer.structures.dense_sparse.solver`: alternating minimization, batched over layers;
- :mod:`~dsformer.structures.dense_sparse.config`: the config (``k`` search, weighting, shared bases);
- :mod:`~dsformer.structures.dense_sparse.linear`: the compact layer.
"""

from dsformer.structures.dense_sparse.config import DenseSparseConfig
from dsformer.structures.dense_sparse.layout import DenseSparseFactors, DenseSparseLayout, budget_layouts, max_ratio
from dsformer.structures.dense_sparse.linear import DenseSparseLinear

__all__ = [
    "DenseSparseConfig",
    "DenseSparseFactors",
    "DenseSparseLayout",
    "DenseSparseLinear",
    "budget_layouts",
    "max_ratio",
]
