"""Run under 8 fake CPU devices (the test sets XLA_FLAGS): sharded vs single-device sampling.

    python sharded_sample.py JOB

`JOB` is a JSON object `{"prompts": [[int, ...], ...], "seed": int, "max_new_tokens": int,
"scale": float}`. The tiny model's weights (scaled by `scale` so that it says something
other than its last token) are created twice from the same key: directly in their shards
on a data=2 fsdp=2 tensor=2 mesh with `SAMPLING_RULES`, and whole on one device. Greedy
and sampled generations and scores are computed both ways; one JSON line of results is
printed for `tests/test_sample.py` to compare.
"""

from __future__ import annotations

import json
import sys

import jax

from jaxcai import model as M
from jaxcai.sample import SAMPLING_RULES, generate, score
from jaxcai.sharding import MeshConfig, make_mesh


def scaled(params, scale: float):
    """Every weight but the norm scales times `scale` (keeps each array's sharding)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if "scale" in jax.tree_util.keystr(path) else x * scale, params
    )


def run(config, params, prompts, job, mesh) -> dict:
    n = job["max_new_tokens"]
    greedy = generate(config, params, prompts, max_new_tokens=n, mesh=mesh)
    sampled = generate(
        config,
        params,
        prompts,
        max_new_tokens=n,
        temperature=1.0,
        top_p=0.9,
        seed=job["seed"],
        mesh=mesh,
    )
    scores = score(config, params, prompts, sampled.tokens, mesh=mesh)
    return {
        "greedy": greedy.tokens,
        "greedy_logprobs": greedy.logprobs,
        "sampled": sampled.tokens,
        "sampled_logprobs": sampled.logprobs,
        "reasons": greedy.stop_reasons + sampled.stop_reasons,
        "scores": scores.tolist(),
    }


def main(job: dict) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = M.preset("tiny")
    key = jax.random.key(0)
    prompts = job["prompts"]

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = scaled(M.init_sharded(config, key, mesh, SAMPLING_RULES), job["scale"])
    single = scaled(M.init_params(config, key), job["scale"])
    specs = {
        jax.tree_util.keystr(p): {
            "spec": str(x.sharding.spec),
            "global": list(x.shape),
            "shard": list(x.addressable_shards[0].data.shape),
        }
        for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]
    }
    result = {
        "mesh_shape": dict(mesh.shape),
        "params": specs,
        "sharded": run(config, sharded, prompts, job, mesh),
        "single": run(config, single, prompts, job, None),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
