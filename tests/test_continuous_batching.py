"""Continuous batching (`generate(continuous=True)`, the default) gives exactly what the
static sampler gives and what `transformers.generate` gives, whatever the slot order or
the number of slots: greedy token for token, sampled draw for draw for the same seeds;
stop ids, stop strings, per-prompt length budgets, more prompts than slots; and decode
steps read only a window of the cache.

Most tests share one prompt set (11 prompts of 2-29 tokens, budgets 1-39) on 4 slots, so
they share compiled programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import make_hf_model

from jaxcai import hf
from jaxcai.model import init_params, preset
from jaxcai.sample import continuous as C
from jaxcai.sample import generate, slots
from jaxcai.tokenizer import Tokenizer

_rng = np.random.default_rng(0)
PROMPTS = [_rng.integers(4, 1024, int(n)).tolist() for n in _rng.integers(2, 30, 11)]
BUDGETS = _rng.integers(1, 40, 11).tolist()
SLOTS = 4
LIVELY = 10.0  # weight scale that makes the random tiny model say varied things


@pytest.fixture(scope="module")
def lively():
    config = preset("tiny")
    params = init_params(config, jax.random.key(0))
    scale = lambda path, x: x if "scale" in jax.tree_util.keystr(path) else x * LIVELY  # noqa: E731
    return config, jax.tree_util.tree_map_with_path(scale, params)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def _both(config, params, prompts=PROMPTS, **kw):
    kw = {"max_new_tokens": BUDGETS, "batch_size": SLOTS, **kw}
    static = generate(config, params, prompts, continuous=False, **kw)
    return static, generate(config, params, prompts, continuous=True, **kw)


def _assert_same(a, b):
    assert a.tokens == b.tokens and a.stop_reasons == b.stop_reasons and a.texts == b.texts
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_window_buckets():
    assert [C.window_bucket(n, 10_000) for n in (0, 64, 65, 81, 128, 129, 161)] == [
        64, 64, 80, 96, 128, 160, 192,
    ]  # fmt: skip
    assert C.window_bucket(300, 290) == 290  # never past the cache


def test_greedy_equals_static_more_prompts_than_slots(lively):
    """11 sequences of budgets 1-39 through 4 slots: every slot is refilled."""
    static, cont = _both(*lively)
    _assert_same(static, cont)
    assert [len(t) for t in cont.tokens] == BUDGETS and set(cont.stop_reasons) == {"length"}
    assert len({t for row in cont.tokens for t in row}) > 20  # varied text


def test_sampled_outputs_do_not_depend_on_slots(lively):
    """Per-prompt seeds: the same draws whatever the number of slots or prompt order."""
    config, params = lively
    seeds = list(range(100, 111))
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, seeds=seeds)
    static, cont = _both(config, params, **kw)
    _assert_same(static, cont)
    assert cont.tokens != generate(config, params, PROMPTS, max_new_tokens=BUDGETS).tokens
    perm = _rng.permutation(len(PROMPTS)).tolist()
    shuffled = generate(
        config,
        params,
        [PROMPTS[i] for i in perm],
        max_new_tokens=[BUDGETS[i] for i in perm],
        batch_size=2,
        **kw | {"seeds": [seeds[i] for i in perm]},
    )
    assert shuffled.tokens == [cont.tokens[i] for i in perm]
    # Samples of one prompt are told apart by their keys, in either sampler.
    kw = dict(max_new_tokens=[39, 5, 9], batch_size=SLOTS, num_samples=2, temperature=1.0)
    two = generate(config, params, PROMPTS[:3], **kw)
    assert two.tokens == generate(config, params, PROMPTS[:3], continuous=False, **kw).tokens
    assert two.tokens[0] != two.tokens[1] and [len(t) for t in two.tokens] == [39, 39, 5, 5, 9, 9]


def test_stop_ids(lively):
    config, params = lively
    ref = generate(config, params, PROMPTS, max_new_tokens=BUDGETS, batch_size=SLOTS)
    stops = (ref.tokens[3][4], ref.tokens[8][1], ref.tokens[6][20])
    static, cont = _both(config, params, stop_ids=stops)
    _assert_same(static, cont)
    assert "stop_id" in cont.stop_reasons and "length" in cont.stop_reasons
    for row, full in zip(cont.tokens, ref.tokens, strict=True):
        k = next((i for i, t in enumerate(full) if t in stops), len(full))
        assert row == full[:k]


def test_stop_strings(lively, tok):
    """Stop strings read at the static sampler's steps, whenever the host looks."""
    config, params = lively
    ref = generate(config, params, PROMPTS, max_new_tokens=BUDGETS, batch_size=SLOTS, tokenizer=tok)
    picked = [ref.texts[i][len(ref.texts[i]) // 2 :][:3] for i in (3, 6, 8)]
    picked = [s for s in picked if s.strip()]
    assert picked
    for every in (1, 5):
        static, cont = _both(
            config, params, tokenizer=tok, stop_strings=picked, stop_check_every=every
        )
        _assert_same(static, cont)
        assert "stop_string" in cont.stop_reasons
        for text, full in zip(cont.texts, ref.texts, strict=True):
            assert full.startswith(text) and not any(s in text for s in picked)


def test_rows_of_very_different_lengths_cross_windows(lively, monkeypatch):
    """Budgets 1 and 39 side by side, with small windows: the loop changes window as the
    long rows grow, and the short rows' slots are refilled meanwhile."""
    config, params = lively
    monkeypatch.setattr(C, "MIN_WINDOW", 16)
    monkeypatch.setattr(C, "WINDOW_STEPS", 1)  # windows 16, 32, 64, then 71 (the cache)
    prompts = PROMPTS[:7]
    budgets = [39, 1, 3, 36, 2, 30, 1]  # the same widest budget: shared programs
    before = slots.decode_slots._cache_size()
    static, cont = _both(config, params, prompts, max_new_tokens=budgets, batch_size=2)
    _assert_same(static, cont)
    assert [len(t) for t in cont.tokens] == budgets
    # Windows 16 and 32 are new programs (64 and 71 exist from the tests before).
    assert 1 <= slots.decode_slots._cache_size() - before <= 4


def test_greedy_matches_transformers(tmp_path):
    """A tiny random Llama saved with transformers: continuous greedy equals Hugging
    Face's greedy on each prompt alone, at each prompt's own length budget."""
    model = make_hf_model("llama_gqa_rope3")
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(tmp_path, progress=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in (3, 7, 12, 2, 9)]
    budgets = [10, 3, 14, 1, 6]
    ours = generate(config, params, prompts, max_new_tokens=budgets, batch_size=2)
    assert [len(t) for t in ours.tokens] == budgets
    for p, n, got, lps in zip(prompts, budgets, ours.tokens, ours.logprobs, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=None,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        assert out.sequences[0, len(p) :].tolist() == got
        want = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)[0]
        want = want[torch.arange(n), out.sequences[0, len(p) :]].numpy()
        np.testing.assert_allclose(lps, want, atol=1e-4, rtol=0)


SHARDED = textwrap.dedent(
    """
    import json, sys, jax, numpy as np
    from jaxcai import sharding
    from jaxcai.model import init_params, preset
    from jaxcai.sample import SAMPLING_RULES, generate
    job = json.loads(sys.argv[1])
    config = preset("tiny")
    scale = lambda p, x: x if "scale" in jax.tree_util.keystr(p) else x * job["scale"]
    params = jax.tree_util.tree_map_with_path(scale, init_params(config, jax.random.key(0)))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    kw = dict(max_new_tokens=job["budgets"], batch_size=4, temperature=1.0, seed=3)
    out = {}
    for name, m in (("sharded", mesh), ("single", None)):
        g = generate(config, params, job["prompts"], mesh=m, **kw)
        out[name] = {"tokens": g.tokens, "logprobs": g.logprobs}
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_continuous_equals_single_device():
    """Slots spread over the batch axes of 8 fake CPU devices: the same samples."""
    job = {"prompts": PROMPTS[:6], "budgets": BUDGETS[:6], "scale": LIVELY}
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["sharded"]["tokens"] == r["single"]["tokens"]
    assert [len(t) for t in r["single"]["tokens"]] == BUDGETS[:6]
    for a, b in zip(r["sharded"]["logprobs"], r["single"]["logprobs"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
