"""Work split over the processes of a multi-process launch, and arrays on meshes that
span processes.

`share(n)` is this process's part of `range(n)`: contiguous blocks by process index
(process `p` of `P` holds `[p * n // P, (p + 1) * n // P)`, so the blocks are disjoint,
cover every index and differ in size by at most one). `gather(items, n)` concatenates
every process's items in process order, which is index order: each process's list is
sent as length-prefixed UTF-8 JSON bytes, padded to the longest, in one
`process_allgather`. `broadcast(value)` is process 0's value on every process (so that
decisions read from files, such as which stages and chunks are done, are taken alike).
With one process all three are the identity (their input as it is, untouched by JSON).

On a mesh that spans processes (`spans_processes`) every process runs the same program
on the same host values: `to_global` places such a host array onto a sharding (each
process fills only its own devices' shards), `to_host` reads an array back whole on
every process (`process_allgather(..., tiled=True)`; a non-fully-addressable array cannot
be `np.asarray`'d).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
    "barrier",
    "broadcast",
    "gather",
    "share",
    "spans_processes",
    "to_global",
    "to_host",
]


def share(n: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """This process's (or `process_index`'s) contiguous block of `range(n)`."""
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= p < count:
        raise ValueError(f"process {p} of {count}")
    return range(p * n // count, (p + 1) * n // count)


def _all_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (one collective for the lengths, one for
    the bytes padded to the longest)."""
    lengths = multihost_utils.process_allgather(np.int64(len(data)))
    lengths = np.asarray(lengths).reshape(-1)
    padded = np.zeros(max(1, int(lengths.max())), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [rows[p, : int(k)].tobytes() for p, k in enumerate(lengths)]


def gather(local_items: Sequence[Any], n: int) -> list[Any]:
    """All `n` items in index order, from each process's `local_items` (the items of its
    `share(n)`, JSON-able). Every process must call it, at the same point."""
    if jax.process_count() == 1:
        items = list(local_items)
    else:
        if len(local_items) != len(share(n)):
            raise ValueError(
                f"process {jax.process_index()}: {len(local_items)} items for its share "
                f"{share(n)} of {n}"
            )
        data = json.dumps(list(local_items), ensure_ascii=False).encode("utf-8")
        items = [x for part in _all_bytes(data) for x in json.loads(part.decode("utf-8"))]
    if len(items) != n:
        raise ValueError(f"gathered {len(items)} items, expected {n}")
    return items


def broadcast(value: Any) -> Any:
    """Process 0's `value` (JSON-able) on every process. Every process must call it, at
    the same point."""
    if jax.process_count() == 1:
        return value
    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
    length = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buffer = np.zeros(max(1, length), np.uint8)
    if jax.process_index() == 0:
        buffer[:length] = np.frombuffer(data, np.uint8)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(buffer[:length].tobytes().decode("utf-8"))


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches the barrier `name` (nothing with one process).
    It waits at the coordinator, as orbax does, not in a device collective (whose CPU
    rendezvous gives up after 30 s, while process 0 may write files for minutes)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"jaxcai/{name}/{next(_BARRIERS)}", int(timeout_s * 1000))


_BARRIERS = itertools.count()  # barrier ids are used once; every process counts alike


def spans_processes(mesh: jax.sharding.Mesh | None) -> bool:
    """Whether `mesh` holds devices of other processes."""
    if mesh is None or jax.process_count() == 1:
        return False
    here = jax.process_index()
    return any(d.process_index != here for d in mesh.devices.flat)


def to_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array with the same value on every process, placed with `sharding`
    (which may span processes: each process fills only its own devices' shards)."""
    x = np.asarray(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: Any) -> np.ndarray:
    """The whole value of an array on this host, also for an array that spans processes
    (every process must then call it, at the same point)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
