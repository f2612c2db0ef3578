"""Sampling in a multi-process launch equals sampling in one process, byte for byte.

- `share` splits `range(n)` into contiguous, disjoint blocks covering every index;
  `gather`/`broadcast` are the identity in one process (fast, in the default run).
- `generate`/`score`/`choose`/`reward_scores` on a mesh spanning two processes (4 fake
  CPU devices each, Gloo over 127.0.0.1) give exactly what one process with 8 devices
  gives, and `gather`/`broadcast` move JSON items between the processes
  (`tests/scripts/multihost_sample.py`).
- `jaxcai-cai` runs its sampling stages (critique, feedback, eval) in two processes with
  `sampling.placement=replicated` and `sharded`; the files they write equal a one-process
  run's byte for byte (`tests/scripts/cai_multihost.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
from launch import Launch, Lazy, finish, free_port

from jaxcai import hf, model
from jaxcai.cai.settings import PLACEMENTS
from jaxcai.distributed import broadcast, gather, share
from jaxcai.tokenizer import Tokenizer

SCRIPTS = Path(__file__).parent / "scripts"
LIVELY = 10.0  # weight scale that makes the random tiny model say varied things
TIMEOUT = 900  # seconds for a group of processes (they share 2 cores with the others)
PROMPTS = [[5, 17, 300, 2, 9], [44, 12], [100], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300, 301]]
# Written by the sampling stages; the same bytes from any number of processes.
FILES = (
    "critique/trajectories.jsonl",
    "critique/sft.jsonl",
    "critique/parts/revise-c3-0000003.jsonl",
    "feedback/preferences.jsonl",
    "feedback/parts/label-c3-0000006.jsonl",
    "eval/responses.jsonl",
    "eval/results.json",
)


def test_share_splits_every_index_once():
    for count in range(1, 6):
        for n in range(0, 13):
            parts = [share(n, p, count) for p in range(count)]
            assert [i for part in parts for i in part] == list(range(n))  # in order, once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert share(5) == range(5)  # one process: everything
    with pytest.raises(ValueError, match="process 2 of 2"):
        share(4, 2, 2)
    items = [{"i": 0, "text": "é"}, (1, 2)]
    assert gather(items, 2) == items and gather(items, 2)[1] is items[1]  # untouched
    assert broadcast(items) is items
    with pytest.raises(ValueError, match="gathered 2 items, expected 3"):
        gather(items, 3)


def _two_processes(script: Path, job: dict, log_dir: Path, name: str, key: str) -> list[Launch]:
    """Two processes of `script` with 4 devices each; `job[key]` gets the distributed
    settings (a list of overrides, or a dict for `jax.distributed.initialize`)."""
    port, launches = free_port(), []
    for i in range(2):
        if key == "overrides":
            extra = {
                "overrides": [
                    *job["overrides"],
                    "distributed.enabled=true",
                    f"distributed.coordinator_address=127.0.0.1:{port}",
                    "distributed.num_processes=2",
                    f"distributed.process_id={i}",
                ]
            }
        else:
            extra = {
                key: {
                    "coordinator_address": f"127.0.0.1:{port}",
                    "num_processes": 2,
                    "process_id": i,
                }
            }
        launches.append(Launch(script, [json.dumps({**job, **extra})], 4, log_dir, f"{name}{i}"))
    return launches


@pytest.mark.slow  # three processes starting JAX and compiling: about a minute
def test_sampling_on_a_mesh_across_processes_equals_one_process(tmp_path):
    script = SCRIPTS / "multihost_sample.py"
    job = {"prompts": PROMPTS, "seed": 3, "max_new_tokens": 8, "scale": LIVELY}
    launches = [
        Launch(script, [json.dumps({**job, "distributed": None})], 8, tmp_path, "one"),
        *_two_processes(script, job, tmp_path, "two", "distributed"),
    ]
    try:
        (one,), (first,), (second,) = finish(*launches, timeout=TIMEOUT)
    finally:
        for x in launches:
            x.kill()
    assert (one["spans_processes"], first["spans_processes"]) == (False, True)
    assert (first["share"], second["share"]) == ([0, 1, 2], [3, 4, 5, 6])
    assert first["first"] == second["first"] == [{"i": i, "text": "é" * i} for i in range(3)]
    assert one["gathered"] == [{"i": i, "text": "é" * i} for i in range(7)]
    assert "stop_string" in one["reasons"] and len({t for r in one["greedy"] for t in r}) > 10
    for got in (first, second):
        for key in ("process_index", "spans_processes", "share", "first"):
            got.pop(key)
            one.pop(key, None)
        assert got == one  # tokens, texts, log-probs, scores, probabilities: all exact


@pytest.fixture(scope="module")
def cai_runs(tmp_path_factory):
    """A lively random policy, then the sampling stages run by one process (4 devices) and
    by two processes (4 devices each) per placement, all started at once."""
    root = tmp_path_factory.mktemp("multihost_cai")
    config = model.preset("tiny")
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x if "scale" in jax.tree_util.keystr(p) else x * LIVELY,
        model.init_params(config, jax.random.key(0)),
    )
    policy = root / "policy"
    hf.save_pretrained(policy, config, params, progress=False, tokenizer=Tokenizer.load())
    overrides = [
        "experiment=cai_smoke",
        "prompts.limit=8",
        "chunk_size=3",  # chunks of 3, 3 and 2 prompts: uneven shares
        "sampling.max_new_tokens=8",
        "sampling.batch_size=8",
        "cai.revision_rounds=1",
        "eval.max_prompts=4",
        "progress=false",
        "stages=[critique,feedback,eval]",
        f"policy={policy}",
        f"inputs.sft={policy}",  # the pairs come from the same policy
    ]
    script = SCRIPTS / "cai_multihost.py"
    job = lambda name, *extra: {"run_dir": str(root / name), "overrides": [*overrides, *extra]}
    runs = {"one": Lazy(Launch(script, [json.dumps(job("one"))], 4, root, "one"), timeout=TIMEOUT)}
    for placement in PLACEMENTS:
        launches = _two_processes(
            script, job(placement, f"sampling.placement={placement}"), root, placement, "overrides"
        )
        runs[placement] = Lazy(*launches, timeout=TIMEOUT)
    yield root, runs
    for lazy in runs.values():
        lazy.kill()


@pytest.mark.slow  # five processes running three sampling stages: a few minutes
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cai_sampling_stages_in_two_processes_write_one_process_files(cai_runs, placement):
    root, runs = cai_runs
    ((one,),) = runs["one"].records()
    records = [r for (r,) in runs[placement].records()]
    assert one["process_count"] == 1
    assert [(r["process_index"], r["process_count"], r["device_count"]) for r in records] == [
        (0, 2, 8),
        (1, 2, 8),
    ]
    stages = ["initial", "critique", "sft", "feedback", "eval"]
    assert one["stages"] == stages and all(r["stages"] == stages for r in records)
    for rel in FILES:
        want = (root / "one" / rel).read_bytes()
        assert (root / placement / rel).read_bytes() == want, rel
    responses = [
        json.loads(x)["response"] for x in (root / "one" / FILES[5]).read_text().split("\n") if x
    ]
    assert len(set(responses)) > 4  # varied texts: a misordered gather would show
