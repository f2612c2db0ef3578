"""Run under 8 fake CPU devices (the test sets XLA_FLAGS): global batches from local rows.

    python data_shards.py

For each mesh, builds a process-local batch of rows, turns it into a global `[A, B/A, ...]`
batch with `from_local_rows` (and one gathered by index with `global_batch`), and prints
one JSON line of what it found; `tests/test_data_pipeline.py` asserts on them.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxcai.data.batches import EMPTY, data_shard, from_local_rows, global_batch
from jaxcai.data.rows import ArrayRows
from jaxcai.sharding import MeshConfig, make_mesh

MESHES = {"d4f2": MeshConfig(data=4, fsdp=2), "data8": MeshConfig(data=8)}
BATCH, ACCUM, LENGTH = 16, 2, 8


def local_rows(rng: np.random.Generator) -> dict:
    """A process-local batch as the grain iterator yields it (a pair, to nest a dict)."""
    side = lambda: {
        "tokens": rng.integers(0, 1000, (BATCH, LENGTH)).astype(np.int32),
        "mask": rng.integers(0, 2, (BATCH, LENGTH)).astype(np.int32),
    }
    return {
        "chosen": side(),
        "rejected": side(),
        "p_chosen": rng.random(BATCH).astype(np.float32),
        "weight": np.ones(BATCH, np.float32),
    }


def describe(tree: dict, expected: dict) -> dict:
    """Per leaf: equal to the expected global value, its spec, and the batch rows (start,
    stop) of every device's shard with whether the shard holds exactly those rows."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, x in flat:
        want = flat_expected[path]
        shards = []
        for shard in x.addressable_shards:
            rows = shard.index[1].indices(x.shape[1])[:2]
            shards.append(
                {
                    "rows": list(rows),
                    "holds": bool(np.array_equal(np.asarray(shard.data), want[shard.index])),
                }
            )
        out[jax.tree_util.keystr(path)] = {
            "equal": bool(np.array_equal(np.asarray(x), want)),
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "spec": str(x.sharding.spec),
            "shards": sorted(shards, key=lambda s: s["rows"]),
        }
    return out


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    for name, mesh_config in MESHES.items():
        mesh = make_mesh(mesh_config)
        local = local_rows(rng)
        expected = jax.tree_util.tree_map(lambda a: a.reshape(ACCUM, -1, *a.shape[1:]), local)
        batch = from_local_rows(local, BATCH, ACCUM, mesh)

        rows = ArrayRows(local_rows(rng))
        indices = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, EMPTY, EMPTY])
        gathered = global_batch(rows, indices, ACCUM, mesh)
        taken = rows.take(indices.reshape(ACCUM, -1))
        print(
            json.dumps(
                {
                    "mesh": name,
                    "data_shard": list(data_shard(BATCH, ACCUM, mesh)),
                    "from_local_rows": describe(batch, expected),
                    "global_batch": describe(gathered, taken),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
