"""`generate`, `score` and `choose` on a mesh data=2 fsdp=2 tensor=2 (the test sets XLA_FLAGS).

    python multihost_sample.py JOB

`JOB` is `{"prompts": [[int, ...], ...], "seed": int, "max_new_tokens": int, "scale":
float, "distributed": {"coordinator_address", "num_processes", "process_id"} | null}`.
With `distributed`, this is one of several processes (4 fake CPU devices each) and the
mesh spans them all; without, one process holds all 8 devices. The tiny model's weights
(scaled by `scale`, as in `sharded_sample.py`) are created in their shards on the mesh,
and a reward model's beside them (`jaxcai.cai.evaluate.reward_scores`); `gather` and
`broadcast` of `jaxcai.distributed` run on a few strings. Prints one JSON line of
results; `tests/test_multihost_sampling.py` compares the two processes' lines with a
one-process run's.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from sharded_sample import scaled

from jaxcai import model as M
from jaxcai.cai.evaluate import reward_scores
from jaxcai.distributed import broadcast, gather, share, spans_processes
from jaxcai.sample import SAMPLING_RULES, choose, generate, score
from jaxcai.sharding import MeshConfig, make_mesh
from jaxcai.tokenizer import Tokenizer


def run(config, params, prompts: list[list[int]], job: dict, mesh) -> dict:
    """Greedy, sampled (two per prompt, own seeds), stop-string-cut generations, their
    scores and a two-option choice."""
    n, tok = job["max_new_tokens"], Tokenizer.load()
    greedy = generate(config, params, prompts, max_new_tokens=n, tokenizer=tok, mesh=mesh)
    sampled = generate(
        config,
        params,
        prompts,
        max_new_tokens=n,
        temperature=1.0,
        top_p=0.9,
        num_samples=2,
        seeds=[job["seed"] + i for i in range(len(prompts))],
        batch_size=4,
        mesh=mesh,
    )
    text = greedy.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # cuts row 0 halfway through
    cut = generate(
        config,
        params,
        prompts,
        max_new_tokens=n,
        stop_strings=[stop],
        tokenizer=tok,
        stop_check_every=2,
        mesh=mesh,
    )
    flat = [p for p in prompts for _ in range(2)]
    scores = score(config, params, flat, sampled.tokens, batch_size=4, mesh=mesh)
    probs = choose(config, params, prompts, [[5, 6], [7]], mesh=mesh)
    return {
        "greedy": greedy.tokens,
        "greedy_logprobs": greedy.logprobs,
        "sampled": sampled.tokens,
        "sampled_logprobs": sampled.logprobs,
        "cut": cut.tokens,
        "cut_texts": cut.texts,
        "reasons": greedy.stop_reasons + sampled.stop_reasons + cut.stop_reasons,
        "scores": scores.tolist(),
        "probs": np.asarray(probs).tolist(),
    }


def main(job: dict) -> None:
    dist = job.get("distributed")
    if dist:
        jax.distributed.initialize(**dist)
    assert jax.device_count() == 8, jax.devices()
    config = M.preset("tiny")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = scaled(M.init_sharded(config, jax.random.key(0), mesh, SAMPLING_RULES), job["scale"])
    result = run(config, params, job["prompts"], job, mesh)
    rm = M.init_sharded(config, jax.random.key(1), mesh, SAMPLING_RULES, head="reward")
    texts = ["\n\nHuman: Hi there.", "\n\nHuman: Why? Tell me é.", "\n\nHuman: No."]
    answers = ["Hello.", "Because. ü", ""]
    rewards = reward_scores(config, scaled(rm, job["scale"]), Tokenizer.load(), texts, answers)
    result["rewards"] = rewards.tolist()
    mine = [{"i": i, "text": "é" * i} for i in share(7)]
    result.update(gathered=gather(mine, 7), share=list(share(7)), first=broadcast(mine))
    result.update(process_index=jax.process_index(), spans_processes=spans_processes(mesh))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
