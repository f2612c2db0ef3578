"""Run under 8 fake CPU devices (the test sets XLA_FLAGS): sharded vs single-device forward.

Prints one JSON line of results per mesh; `tests/test_sharding.py` asserts on them.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxcai import hf
from jaxcai import model as M
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import DEFAULT_RULES, MeshConfig, logical_to_spec, make_mesh, use_mesh

MESHES = {
    "data8": MeshConfig(data=8),
    "fsdp8": MeshConfig(data=1, fsdp=8),
    "d2f2t2": MeshConfig(data=2, fsdp=2, tensor=2),
}


def main(hf_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = ModelConfig.tiny(tie_embeddings=False, qkv_bias=True)
    params = M.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size)
    segments = jnp.ones((8, 16), jnp.int32).at[3, 10:].set(0)
    fwd = jax.jit(M.forward, static_argnums=0)
    ref = np.asarray(fwd(config, params, tokens, segment_ids_BT=segments))
    logical = M.param_logical_axes(config)
    hf_config, hf_params = hf.load_pretrained(hf_dir, progress=False)
    hf_tokens = tokens % hf_config.vocab_size
    hf_ref = np.asarray(fwd(hf_config, hf_params, hf_tokens))

    for name, mesh_config in MESHES.items():
        mesh = make_mesh(mesh_config)
        shardings = M.param_shardings(config, mesh)
        sharded = jax.device_put(params, shardings)
        with use_mesh(mesh):
            logits = fwd(config, sharded, tokens, segment_ids_BT=segments)
            fresh = M.init_sharded(config, jax.random.key(0), mesh)
            _, loaded = hf.load_pretrained(hf_dir, mesh=mesh, progress=False)
            hf_logits = fwd(hf_config, loaded, hf_tokens)
        flat = jax.tree_util.tree_flatten_with_path(sharded)[0]
        flat_logical = dict(
            jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, tuple))[0]
        )
        specs = {}
        for path, x in flat:
            expected = logical_to_spec(flat_logical[path], DEFAULT_RULES, x.shape, mesh)
            shard_shape = x.addressable_shards[0].data.shape
            specs[jax.tree_util.keystr(path)] = {
                "spec": str(x.sharding.spec),
                "expected": str(expected),
                "global": list(x.shape),
                "shard": list(shard_shape),
                "axes": [
                    [] if a is None else [a] if isinstance(a, str) else list(a) for a in expected
                ],
            }
        loaded_specs = {
            jax.tree_util.keystr(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]
        }
        fresh_specs = {
            jax.tree_util.keystr(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_flatten_with_path(fresh)[0]
        }
        print(
            json.dumps(
                {
                    "mesh": name,
                    "mesh_shape": dict(mesh.shape),
                    "max_diff": float(np.abs(np.asarray(logits) - ref).max()),
                    "hf_max_diff": float(np.abs(np.asarray(hf_logits) - hf_ref).max()),
                    "fresh_equal": all(
                        jax.tree_util.tree_leaves(
                            jax.tree_util.tree_map(
                                lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                fresh,
                                params,
                            )
                        )
                    ),
                    "logits_spec": str(logits.sharding.spec),
                    "params": specs,
                    "loaded_specs": loaded_specs,
                    "fresh_specs": fresh_specs,
                }
            )
        )


if __name__ == "__main__":
    main(sys.argv[1])
