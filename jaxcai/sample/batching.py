"""Host-side batching shared by generation and scoring: prompt cutting and padding,
power-of-two shape buckets, and placing arrays on a mesh's batch axes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcai.distributed import spans_processes, to_global
from jaxcai.sharding import DEFAULT_RULES, Rules, named_sharding, use_mesh

__all__ = ["MIN_PROMPT_BUCKET", "SAMPLING_RULES", "keep_end", "left_pad"]

# Weights for sampling: never sharded over `fsdp` (that would all-gather every weight at
# every decode step); the batch still spreads over `data` and `fsdp`, heads over `tensor`.
SAMPLING_RULES: Rules = tuple(r for r in DEFAULT_RULES if r != ("embed", "fsdp"))
MIN_PROMPT_BUCKET = 16


def keep_end(ids: Sequence[int], limit: int) -> list[int]:
    """A prompt cut to at most `limit` ids by dropping from the start after its first id
    (the bos), so the most recent context is kept."""
    if limit < 2:
        raise ValueError(f"a prompt limit of {limit} leaves no room for the context")
    ids = list(ids)
    return ids if len(ids) <= limit else [ids[0], *ids[len(ids) - limit + 1 :]]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists to one length: (tokens [B, P], segment ids [B, P], 0 = padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        segments[i, width - len(p) :] = 1
    return tokens, segments


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def padded_batch(n: int, shards: int) -> int:
    """Rows to run `n` sequences in: a power of two, divisible by the batch shards."""
    return -(-max(bucket(n), shards) // shards) * shards


def mesh_context(mesh, rules: Rules):
    """`use_mesh(mesh, rules)`, or nothing without a mesh."""
    return use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()


def batch_shards(mesh, rules: Rules) -> int:
    """How many ways the mesh splits the `batch` axis (1 without a mesh)."""
    if mesh is None:
        return 1
    spec = named_sharding(("batch",), mesh, rules).spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def place(x: np.ndarray, logical: tuple[str | None, ...], mesh, rules: Rules):
    """A host array on device, sharded by its logical axes when there is a mesh (which
    may span processes: every process then passes the same `x`)."""
    if mesh is None:
        return jnp.asarray(x)
    return to_global(x, named_sharding(logical, mesh, rules, x.shape))


def scalar(x, dtype, mesh):
    """A traced setting (a scalar or a small vector): replicated over `mesh` when it
    spans processes (a jitted program there takes only global arrays), else as it is."""
    if not spans_processes(mesh):
        return jnp.asarray(x, dtype)
    return to_global(
        np.asarray(x, dtype), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )


def batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    """`order` in consecutive runs of at most `batch_size`."""
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
