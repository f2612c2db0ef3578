"""Run under 8 fake CPU devices (the test sets XLA_FLAGS): Qwen3 and Gemma-3 sharded vs
on one device.

    python sharded_families.py HF_DIR [HF_DIR ...]

Each directory is a tiny Hugging Face checkpoint. It is loaded whole on one device and
straight into its shards on a data=2 fsdp=2 tensor=2 mesh; the sharded logits of a padded
batch, and a sharded prefill followed by three decode steps through the KV cache, are
compared with the single-device logits. Prints one JSON line per checkpoint for
`tests/test_hf_families.py`.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxcai import hf
from jaxcai import model as M
from jaxcai.sharding import MeshConfig, make_mesh, use_mesh

MESH = MeshConfig(data=2, fsdp=2, tensor=2)
B, T, STEPS = 8, 16, 3


def decode(config, params, tokens, segments):
    """Logits of a 10-token prefill then one token at a time: [B, T, V]."""
    fwc = jax.jit(M.forward_with_cache, static_argnums=0)
    logits, cache = jax.jit(M.prefill, static_argnums=(0, 3))(
        config, params, tokens[:, :10], T, segment_ids_BT=segments[:, :10]
    )
    positions = M.positions_from_segments(segments)
    pieces = [logits]
    for t in range(10, 10 + STEPS):
        step, cache = fwc(
            config,
            params,
            tokens[:, t : t + 1],
            cache,
            segment_ids_BT=segments[:, t : t + 1],
            positions_BT=positions[:, t : t + 1],
        )
        pieces.append(step)
    return jnp.concatenate(pieces, 1)


def main(hf_dirs: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    fwd = jax.jit(M.forward, static_argnums=0)
    mesh = make_mesh(MESH)
    for hf_dir in hf_dirs:
        config, params = hf.load_pretrained(hf_dir, progress=False)
        tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
        segments = jnp.ones((B, T), jnp.int32).at[3, 11:].set(0).at[5, :4].set(0)
        ref = np.asarray(fwd(config, params, tokens, segment_ids_BT=segments))
        with use_mesh(mesh):
            _, sharded = hf.load_pretrained(hf_dir, mesh=mesh, progress=False)
            logits = fwd(config, sharded, tokens, segment_ids_BT=segments)
            decoded = decode(config, sharded, tokens, segments)
        valid = np.asarray(segments, bool)
        n = 10 + STEPS
        print(
            json.dumps(
                {
                    "model_type": config.model_type,
                    "ref_max": float(np.abs(ref).max()),
                    "max_diff": float(np.abs(np.asarray(logits) - ref)[valid].max()),
                    "decode_diff": float(
                        np.abs(np.asarray(decoded) - ref[:, :n])[valid[:, :n]].max()
                    ),
                    "logits_spec": str(logits.sharding.spec),
                    "specs": {
                        jax.tree_util.keystr(p): str(x.sharding.spec)
                        for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]
                    },
                }
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
