"""Global batches on a mesh, built so each process reads only the rows its devices hold.

Training batches are a pure function of the step: step `s` takes positions
`s*B ... s*B+B-1` of an endless stream of per-epoch permutations (seeded by
`(seed, epoch)`), so resuming at step `s` is exact with no iterator state beyond `s`.
A global batch has shape `[A, B/A, ...]` (A = gradient-accumulation steps) and is sharded
over the mesh's batch axes on its second axis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxcai.data.jsonl import Dataset
from jaxcai.sharding import DEFAULT_RULES, Rules, named_sharding

__all__ = ["epoch_stream_indices", "eval_index_batches", "global_batch"]

EMPTY = -1  # index of a padding row: zero weight, zero loss mask


def epoch_stream_indices(n: int, seed: int, step: int, batch_size: int) -> np.ndarray:
    """Example indices of training batch `step`: a new permutation every epoch."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        chosen = epochs == epoch
        out[chosen] = perm[offsets[chosen]]
    return out


def eval_index_batches(n: int, batch_size: int, limit: int = 0) -> Iterator[np.ndarray]:
    """Every example once, in order; the last batch padded with `EMPTY` rows."""
    for count, start in enumerate(range(0, n, batch_size)):
        if limit and count >= limit:
            return
        idx = np.arange(start, min(start + batch_size, n))
        yield np.concatenate([idx, np.full(batch_size - len(idx), EMPTY)])


def _rows(ds: Dataset, indices: np.ndarray) -> dict[str, Any]:
    """Rows for `indices` (any shape) with `weight`; EMPTY rows have zero weight and mask."""
    valid = indices != EMPTY
    rows = ds.take(np.where(valid, indices, 0))

    def zero_masks(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                zero_masks(value)
            elif key == "mask":
                tree[key] = value * valid[..., None]

    zero_masks(rows)
    rows["weight"] = valid.astype(np.float32)
    return rows


def _logical(ndim: int) -> tuple[str | None, ...]:
    return (None, "batch", "length", *[None] * max(0, ndim - 3))[:ndim]


def global_batch(
    ds: Dataset, indices: np.ndarray, grad_accum: int, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> dict[str, Any]:
    """A `[A, B/A, ...]` global batch on `mesh`; each process gathers only its own rows."""
    index_AM = indices.reshape(grad_accum, -1)
    example = _rows(ds, index_AM[:, :1])  # one column, for the leaf shapes
    cache: dict[str, dict[str, Any]] = {}  # rows per device slice, shared by all leaves

    def leaf(path, like: np.ndarray):
        full = (*index_AM.shape, *like.shape[2:])
        sharding = named_sharding(_logical(len(full)), mesh, rules, full)

        def fetch(idx):
            key = repr(idx[:2])
            if key not in cache:
                cache[key] = _rows(ds, index_AM[idx[:2]])
            sub = cache[key]
            for k in path:
                sub = sub[k.key]
            return sub[(slice(None), slice(None), *idx[2:])]

        return jax.make_array_from_callback(full, sharding, fetch)

    return jax.tree_util.tree_map_with_path(leaf, example)
