"""Global batches on a mesh, built so each process supplies only the rows its devices hold.

A global batch has shape `[A, B/A, ...]` (A = gradient-accumulation steps), sharded over
the mesh's batch axes on its second axis. Training batches come from each process's grain
iterator (`from_local_rows`); evaluation and reference batches are gathered by example
index from random-access rows (`global_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jaxcai.data.pipeline import EMPTY, repad
from jaxcai.sharding import DEFAULT_RULES, Rules, named_sharding

__all__ = [
    "EMPTY",
    "Feed",
    "add_rows",
    "agree_rows",
    "data_shard",
    "eval_index_batches",
    "from_local_rows",
    "global_batch",
    "local_row_slices",
    "local_tokens",
]


class Rows(Protocol):
    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> dict[str, Any]: ...


def eval_index_batches(n: int, batch_size: int, limit: int = 0) -> Iterator[np.ndarray]:
    """Every example once, in order; the last batch padded with `EMPTY` rows."""
    for count, start in enumerate(range(0, n, batch_size)):
        if limit and count >= limit:
            return
        idx = np.arange(start, min(start + batch_size, n))
        yield np.concatenate([idx, np.full(batch_size - len(idx), EMPTY)])


def _logical(ndim: int) -> tuple[str | None, ...]:
    return (None, "batch", "length", *[None] * max(0, ndim - 3))[:ndim]


def batch_sharding(shape: tuple[int, ...], mesh: Mesh, rules: Rules):
    """How a `[A, B/A, T, ...]` batch leaf is laid out: rows over the batch axes."""
    return named_sharding(_logical(len(shape)), mesh, rules, shape)


def data_shard(
    batch_size: int, grad_accum: int, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> tuple[int, int]:
    """(shard index, shard count) of the rows this process feeds: its devices hold rows
    `[index * r, (index + 1) * r)` of every micro-batch, `r = batch_size / grad_accum / count`.
    Processes whose devices hold the same rows get the same index (and read the same data).
    """
    shape = (grad_accum, batch_size // grad_accum, 1)
    index_map = batch_sharding(shape, mesh, rules).addressable_devices_indices_map(shape)
    rows = sorted({idx[1].indices(shape[1])[:2] for idx in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(b[0] != a[1] for a, b in zip(rows, rows[1:], strict=False)):
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
    size = stop - start
    return start // size, shape[1] // size


def local_row_slices(
    batch_size: int, grad_accum: int, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> int:
    """How many distinct row slices of a micro-batch this process's devices hold: packed
    rows (`jaxcai.data.pairs`) come in a multiple of it, so every device gets whole rows."""
    shape = (grad_accum, batch_size // grad_accum, 1)
    index_map = batch_sharding(shape, mesh, rules).addressable_devices_indices_map(shape)
    return len({idx[1].indices(shape[1])[:2] for idx in index_map.values()})


def from_local_rows(
    local: dict[str, Any],
    batch_size: int,
    grad_accum: int,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> dict[str, Any]:
    """This process's rows (`[A * r, ...]`, from its `data_shard`) -> the global
    `[A, B/A, ...]` batch on `mesh`. Packed pair rows (`local["packed"]`, `[A * R, T]`)
    become `[A, R * shards, T]`: every process holds the same number of rows."""
    rows = next(len(v) for k, v in local.items() if k != "packed" and not isinstance(v, dict))
    shards = batch_size // rows if "packed" in local else 1

    def leaf(path, x: np.ndarray) -> jax.Array:
        part = x.reshape(grad_accum, -1, *x.shape[1:])
        per = batch_size // grad_accum
        if path[0].key == "packed":
            per = part.shape[1] * shards
        full = (grad_accum, per, *part.shape[2:])
        return jax.make_array_from_process_local_data(batch_sharding(full, mesh, rules), part, full)

    return jax.tree_util.tree_map_with_path(leaf, local)


def global_batch(
    rows: Rows, indices: np.ndarray, grad_accum: int, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> dict[str, Any]:
    """A `[A, B/A, ...]` global batch of `rows` at `indices`; each process gathers only
    the rows its devices hold."""
    index_AM = indices.reshape(grad_accum, -1)
    example = rows.take(index_AM[:, :1])  # one column, for the leaf shapes
    cache: dict[str, dict[str, Any]] = {}  # rows per device slice, shared by all leaves

    def leaf(path, like: np.ndarray):
        full = (*index_AM.shape, *like.shape[2:])
        sharding = batch_sharding(full, mesh, rules)

        def fetch(idx):
            key = repr(idx[:2])
            if key not in cache:
                cache[key] = rows.take(index_AM[idx[:2]])
            sub = cache[key]
            for k in path:
                sub = sub[k.key]
            return sub[(slice(None), slice(None), *idx[2:])]

        return jax.make_array_from_callback(full, sharding, fetch)

    return jax.tree_util.tree_map_with_path(leaf, example)


def local_tokens(local: dict[str, Any]) -> int:
    """Non-padding tokens in rows: both sides of unpacked pairs, packed pairs' shared
    prompts once."""
    sides = [local[k] for k in ("chosen", "rejected", "packed") if k in local] or [local]
    return int(sum((side["segment_ids"] > 0).sum() for side in sides))


def agree_rows(local: dict[str, Any], pad_id: int, grad_accum: int) -> dict[str, Any]:
    """Pad every host's rows to the longest host's (rows of varying, bucketed length),
    and packed pair rows to the most rows per micro-batch of any host."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    rows = local.get("packed", local.get("chosen", local))
    shape = np.asarray([rows["tokens"].shape[1], rows["tokens"].shape[0] // grad_accum], np.int32)
    length, count = (int(x) for x in np.max(multihost_utils.process_allgather(shape), axis=0))
    local = repad(local, length, pad_id)
    if "packed" in local:
        local = {**local, "packed": add_rows(local["packed"], count, grad_accum, pad_id)}
    return local


def add_rows(packed: dict[str, np.ndarray], rows: int, groups: int, pad_id: int):
    """Packed rows `[groups * R, T]` grown to `rows` rows per group with padding rows."""

    def grow(key: str, a: np.ndarray) -> np.ndarray:
        a = a.reshape(groups, -1, a.shape[-1])
        value = pad_id if key in ("tokens", "targets") else 0
        a = np.pad(a, ((0, 0), (0, rows - a.shape[1]), (0, 0)), constant_values=value)
        return a.reshape(groups * rows, -1)

    return {k: grow(k, v) for k, v in packed.items()}


class Feed:
    """Training batches: this process's rows from its checkpointable `iterator`, placed
    on the mesh as global `[A, B/A, ...]` batches. `next()` gives the batch and the
    number of real tokens in it (all processes together); `check(rows)`, if given, sees
    the first rows before anything is placed."""

    def __init__(
        self,
        iterator: Any,
        *,
        batch_size: int,
        grad_accum: int,
        mesh: Mesh,
        rules: Rules = DEFAULT_RULES,
        shard_count: int = 1,
        pad_id: int = 0,
        fixed_width: bool = True,
        check: Any = None,
    ):
        self.iterator = iterator
        self.check = check  # called on the first rows (the objective's layout check)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.mesh, self.rules = mesh, rules
        self.shard_count, self.pad_id = shard_count, pad_id
        self.fixed_width = fixed_width

    def next(self) -> tuple[dict[str, Any], int]:
        local = next(self.iterator)
        if self.check is not None:
            self.check(local)
            self.check = None
        if not self.fixed_width:  # bucketed rows: hosts agree on one length
            local = agree_rows(local, self.pad_id, self.grad_accum)
        tokens = local_tokens(local) * self.shard_count
        batch = from_local_rows(local, self.batch_size, self.grad_accum, self.mesh, self.rules)
        return batch, tokens

    def close(self) -> None:
        self.iterator.close()
