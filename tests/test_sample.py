"""The sampler: parity with transformers, log-probs, filters, seeds, stops, scoring, shape
buckets, and sharded sampling on 8 fake CPU devices.

Most tests share one prompt batch (3 prompts: batch bucket 4, prompt bucket 16) and
`max_new_tokens=N`, so they share compiled programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model

from jaxcai import hf
from jaxcai import sample as S
from jaxcai.model import forward, init_params, preset
from jaxcai.sample import (
    choose,
    filter_logits,
    generate,
    greedy_generate,
    left_pad,
    sample_tokens,
    score,
)
from jaxcai.tokenizer import Tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "sharded_sample.py"
N = 8  # max_new_tokens of most tests
_rng = np.random.default_rng(1234)
PROMPTS = [_rng.integers(4, 1024, n).tolist() for n in (3, 5, 9)]
OTHER = _rng.integers(4, 1024, 14).tolist()
LIVELY = 10.0  # weight scale that makes the random tiny model say more than its last token


def scaled(params, scale: float):
    """Every weight but the norm scales times `scale`: with `init_params`'s small weights
    the tiny model just repeats its last token; scaled up, it says varied things."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if "scale" in jax.tree_util.keystr(path) else x * scale, params
    )


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny")
    return config, init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def lively(tiny):
    config, params = tiny
    return config, scaled(params, LIVELY)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def greedy_ref(lively, tok):
    config, params = lively
    return generate(config, params, PROMPTS, max_new_tokens=N, tokenizer=tok)


_forward = jax.jit(forward, static_argnums=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _forward_logps(config, params, prompts, continuations) -> list[np.ndarray]:
    """log p(continuation token | everything before) from one right-padded forward pass."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    rows, width = -(-len(seqs) // 8) * 8, -(-max(map(len, seqs)) // 32) * 32  # few shapes
    tokens = np.zeros((rows, width), np.int32)
    segments = np.zeros((rows, width), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = s
        segments[r, : len(s)] = 1
    logits = np.asarray(_forward(config, params, tokens, segment_ids_BT=segments))
    logps = _log_softmax(logits)
    out = []
    for r, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        pos = np.arange(len(p) - 1, len(p) + len(c) - 1)  # logits at pos predict pos + 1
        out.append(logps[r, pos, np.asarray(c)])
    return out


# ----- 1. greedy parity with transformers ---------------------------------------------


@pytest.mark.parametrize("case", ["llama_gqa_rope3", "qwen2"])
def test_greedy_matches_transformers_left_padded(case, tmp_path):
    pad, new = 0, 10
    model = make_hf_model(case)
    model.generation_config.eos_token_id = None  # nothing may stop Hugging Face early
    model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(tmp_path, progress=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in (3, 7, 12)]  # no pad

    ours = generate(
        config, params, prompts, max_new_tokens=new, temperature=0, stop_ids=(), pad_id=pad
    )
    assert ours.stop_reasons == ["length"] * 3
    assert all(len(t) == new for t in ours.tokens)
    assert len({t for row in ours.tokens for t in row}) > 3  # not one token repeated

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=pad,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert tuple(out.sequences.shape) == (3, width + new)
    assert ours.tokens == out.sequences[:, width:].tolist()
    # Our log-probs are the model's own: log-softmax of Hugging Face's raw logits.
    hf_logps = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    hf_logps = torch.gather(hf_logps, 2, out.sequences[:, width:, None])[..., 0].numpy()
    np.testing.assert_allclose(np.array(ours.logprobs), hf_logps, atol=1e-4, rtol=0)

    # Each prompt alone (no padding at all) gives what the left-padded batch gave.
    for p, got in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            single = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new,
                pad_token_id=pad,
                eos_token_id=None,
            )
        assert single.shape[1] == len(p) + new
        assert single[0, len(p) :].tolist() == got


# ----- 2. log-probs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "which, rules",
    [
        ("tiny", dict(temperature=1.0, top_k=0)),
        # Log-probs stay the raw model's, before temperature and filtering.
        ("lively", dict(temperature=0.7, top_k=40, top_p=0.9)),
    ],
)
def test_logprobs_equal_a_forward_pass(request, which, rules):
    config, params = request.getfixturevalue(which)
    gen = generate(config, params, PROMPTS, max_new_tokens=N, seed=3, **rules)
    greedy = generate(config, params, PROMPTS, max_new_tokens=N)
    assert gen.tokens != greedy.tokens  # really sampled
    assert all(len(t) == N for t in gen.tokens) and gen.stop_reasons == ["length"] * 3
    expected = _forward_logps(config, params, PROMPTS, gen.tokens)
    for got, want in zip(gen.logprobs, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    scores = score(config, params, PROMPTS, gen.tokens)
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, [sum(lp) for lp in gen.logprobs], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores, [e.sum() for e in expected], rtol=1e-5, atol=1e-4)


def test_each_step_draws_fresh_randomness(tiny):
    """Near-uniform next-token distributions (the unscaled random model): a row's eight
    draws are (almost) all different, as independent draws over 1024 tokens are. Noise
    reused across steps would pick the same token again and again."""
    config, params = tiny
    gen = generate(config, params, PROMPTS, max_new_tokens=N, temperature=1.0, seed=4)
    assert all(len(set(t)) >= N - 2 for t in gen.tokens), gen.tokens


# ----- 3. filter_logits -----------------------------------------------------------------

P5 = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
ROW2 = np.array([0.1, 0.52, 0.04, 0.27, 0.07])


def _reference_keep(probs: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The documented rule: top-k first, then the smallest set of most likely tokens whose
    (renormalised) probability reaches top_p. Distinct probabilities only."""
    order = np.argsort(-probs, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    if top_p >= 1:
        return set(order.tolist())
    p = probs[order] / probs[order].sum()
    n = int(np.argmax(np.cumsum(p) >= top_p)) + 1
    return set(order[:n].tolist())


def _kept(logits: np.ndarray, top_k: int, top_p: float) -> list[set[int]]:
    out = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p))
    finite = np.isfinite(out)
    # Kept logits are unchanged; the rest are -inf.
    np.testing.assert_array_equal(out[finite], np.asarray(logits, np.float32)[finite])
    assert np.all(out[~finite] == -np.inf)
    return [set(np.flatnonzero(row).tolist()) for row in finite]


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (2, 1.0, {0, 1}),
        (1, 1.0, {0}),
        (0, 0.45, {0}),
        (0, 0.5, {0}),  # {0.5} reaches 0.5
        (0, 0.6, {0, 1}),  # 0.2 crosses 0.6 and is kept
        (0, 0.8, {0, 1, 2}),
        (0, 0.9, {0, 1, 2, 3}),
        (0, 0.97, {0, 1, 2, 3, 4}),
        # top-p over the renormalised top 3 (0.59, 0.24, 0.18): two tokens reach 0.8,
        # where the unfiltered distribution needs three.
        (3, 0.8, {0, 1}),
        (0, 1.0, {0, 1, 2, 3, 4}),
        (5, 1.0, {0, 1, 2, 3, 4}),
        (50, 1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_filter_logits_hand_made(top_k, top_p, expected):
    assert _reference_keep(P5, top_k, top_p) == expected  # the rule, as read here
    perm = np.array([3, 0, 4, 1, 2])  # shuffled: P5[perm] at positions 0..4
    shuffled = P5[perm]
    logits = np.log(np.stack([P5, shuffled, ROW2]))
    kept = _kept(logits, top_k, top_p)
    assert kept[0] == expected
    assert kept[1] == {int(np.flatnonzero(perm == i)[0]) for i in expected}
    assert kept[2] == _reference_keep(ROW2, top_k, top_p)  # rows are independent


def test_filter_logits_ties_and_random_rows():
    # Tokens tied with the last kept one are kept too.
    tied = np.log(np.array([[0.4, 0.2, 0.2, 0.2]]))
    assert _kept(tied, 0, 0.5) == [{0, 1, 2, 3}]
    assert _kept(tied, 0, 0.4) == [{0}]
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(50, 0.3), size=6)
    for top_k in (0, 1, 5, 20):
        for top_p in (0.3, 0.75, 0.95, 1.0):
            kept = _kept(np.log(probs), top_k, top_p)
            assert kept == [_reference_keep(p, top_k, top_p) for p in probs], (top_k, top_p)


# ----- 4. sample_tokens -----------------------------------------------------------------

PROBS7 = np.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02])


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.8), (2.0, 4, 0.7)],
)
def test_sample_frequencies_match_filtered_distribution(temperature, top_k, top_p):
    # Temperature first, then top-k, then top-p over the renormalised top-k.
    scaled_p = PROBS7 ** (1 / temperature)
    scaled_p /= scaled_p.sum()
    keep = sorted(_reference_keep(scaled_p, top_k, top_p))
    expected = np.zeros_like(scaled_p)
    expected[keep] = scaled_p[keep] / scaled_p[keep].sum()

    n = 4000
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS7, jnp.float32)), (n, 1))
    keys = jax.random.split(jax.random.key(7), n)
    draws = np.asarray(
        sample_tokens(logits, keys, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    )
    assert draws.dtype == np.int32 and draws.shape == (n,)
    freq = np.bincount(draws, minlength=len(PROBS7)) / n
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 4 * se), (freq, expected)
    assert np.all(freq[expected == 0] == 0)  # filtered tokens are never drawn


def test_sample_tokens_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (16, 300))
    keys = jax.random.split(jax.random.key(2), 16)
    got = sample_tokens(logits, keys, jnp.float32(0.0), jnp.int32(5), jnp.float32(0.5))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))
    hot = sample_tokens(logits, keys, jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    assert not np.array_equal(hot, got)  # the same keys do sample when temperature > 0


def test_tiny_temperature_equals_greedy(lively, greedy_ref):
    config, params = lively
    cold = generate(config, params, PROMPTS, max_new_tokens=N, temperature=1e-4, seed=5)
    assert cold.tokens == greedy_ref.tokens
    assert len({t for row in greedy_ref.tokens for t in row}) > 10  # varied text
    assert greedy_generate(config, params, PROMPTS, max_new_tokens=N) == greedy_ref.tokens


# ----- 5. seeds -------------------------------------------------------------------------


def test_seeds(lively):
    config, params = lively

    def sample(prompts, **kw):
        return generate(config, params, prompts, max_new_tokens=N, temperature=1.0, **kw)

    a, b, c = sample(PROMPTS, seed=1), sample(PROMPTS, seed=1), sample(PROMPTS, seed=2)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert all(x != y for x, y in zip(a.tokens, c.tokens, strict=True))
    assert sample(PROMPTS, seed=1, batch_size=1).tokens == a.tokens

    seeds = [11, 22, 33]
    ref = sample(PROMPTS, seeds=seeds)
    assert ref.tokens != a.tokens
    assert sample(PROMPTS, seeds=seeds, seed=999).tokens == ref.tokens  # seeds win
    # Other company, another order, a longer neighbour (more padding): same samples.
    mixed = sample([PROMPTS[2], OTHER, PROMPTS[0]], seeds=[33, 44, 11])
    assert mixed.tokens[0] == ref.tokens[2] and mixed.tokens[2] == ref.tokens[0]
    assert sample(PROMPTS, seeds=seeds, batch_size=1).tokens == ref.tokens
    # A prompt's sample depends on its own seed only, not on its neighbours' seeds.
    assert sample(PROMPTS, seeds=[7, 7, 7]).tokens[0] == sample(PROMPTS, seeds=[7, 8, 9]).tokens[0]


def test_num_samples_are_prompt_major(lively):
    config, params = lively
    kw = dict(max_new_tokens=N, temperature=1.0, seeds=[5, 6])
    many = generate(config, params, PROMPTS[:2], num_samples=3, **kw)
    assert many.num_samples == 3 and len(many.tokens) == 6
    assert list(many.samples(0)) == [0, 1, 2] and list(many.samples(1)) == [3, 4, 5]
    for i in range(2):
        rows = [tuple(many.tokens[k]) for k in many.samples(i)]
        assert len(set(rows)) == 3  # three different samples
    # Sample 0 of each prompt is what num_samples=1 draws for that prompt.
    one = generate(config, params, PROMPTS[:2] + [OTHER], **{**kw, "seeds": [5, 6, 8]})
    assert many.tokens[0] == one.tokens[0]
    assert many.tokens[3] == one.tokens[1]


# ----- 6. stops -------------------------------------------------------------------------


def _first(ids: list[int], stops) -> int:
    return next((k for k, t in enumerate(ids) if t in stops), len(ids))


def test_stop_ids(lively, greedy_ref):
    config, params = lively
    ref = greedy_ref.tokens
    assert greedy_ref.stop_reasons == ["length"] * 3
    assert all(len(t) == N for t in ref)
    stop = ref[0][3]
    assert stop not in ref[0][:3]  # precondition: the test means what it says
    got = generate(config, params, PROMPTS, max_new_tokens=N, stop_ids=(stop,))
    assert got.tokens[0] == ref[0][:3]
    assert got.stop_reasons[0] == "stop_id"
    assert got.logprobs[0] == pytest.approx(greedy_ref.logprobs[0][:3], abs=1e-6)
    for i in (1, 2):
        k = _first(ref[i], {stop})
        assert got.tokens[i] == ref[i][:k]
        assert got.stop_reasons[i] == ("stop_id" if k < N else "length")
    # Two stop ids: each row stops at the first of either.
    stops = {ref[1][2], ref[2][5]}
    two = generate(config, params, PROMPTS, max_new_tokens=N, stop_ids=tuple(stops))
    for i in range(3):
        k = _first(ref[i], stops)
        assert two.tokens[i] == ref[i][:k]
        assert two.stop_reasons[i] == ("stop_id" if k < N else "length")
    assert greedy_generate(config, params, PROMPTS, max_new_tokens=N, eos_id=stop) == got.tokens


def _stop_string_case(tok, ref: list[int]) -> tuple[str, str]:
    """A stop string starting exactly where token 3 starts (and nowhere earlier)."""
    before, upto5 = tok.decode(ref[:3]), tok.decode(ref[:5])
    assert upto5.startswith(before) and len(upto5) >= len(before) + 2
    stop = upto5[len(before) :][:4]
    assert upto5.find(stop) == len(before)
    return stop, before


def test_stop_strings(lively, greedy_ref, tok):
    config, params = lively
    ref = greedy_ref.tokens
    assert greedy_ref.texts == [tok.decode(t) for t in ref]
    stop, before = _stop_string_case(tok, ref[0])
    for i in (1, 2):
        assert stop not in greedy_ref.texts[i]
    results = []
    for every in (1, 4, 32):
        got = generate(
            config,
            params,
            PROMPTS,
            max_new_tokens=N,
            stop_strings=[stop, "never said"],
            tokenizer=tok,
            stop_check_every=every,
        )
        assert got.texts[0] == before
        assert got.tokens[0] == ref[0][:3]
        assert got.stop_reasons[0] == "stop_string"
        assert got.logprobs[0] == pytest.approx(greedy_ref.logprobs[0][:3], abs=1e-6)
        assert got.tokens[1:] == ref[1:] and got.texts[1:] == greedy_ref.texts[1:]
        assert got.stop_reasons[1:] == ["length", "length"]
        results.append(got)
    assert results[0] == results[1] == results[2]

    # A stop string starting inside token 3: the text is cut inside it, the tokens before it.
    upto4 = tok.decode(ref[0][:4])
    inner = upto4[len(before) + 2 :]
    assert inner and upto4.find(inner) == len(before) + 2
    mid = generate(
        config, params, PROMPTS[:1], max_new_tokens=N, stop_strings=[inner], tokenizer=tok
    )
    assert mid.texts == [upto4[: len(before) + 2]]
    assert mid.tokens == [ref[0][:3]] and mid.stop_reasons == ["stop_string"]

    # A stop id before the stop string wins; a stop string before the stop id wins.
    early_id = ref[0][1]
    assert early_id != ref[0][0]
    both = generate(
        config,
        params,
        PROMPTS[:1],
        max_new_tokens=N,
        stop_ids=(early_id,),
        stop_strings=[stop],
        tokenizer=tok,
        stop_check_every=4,
    )
    assert both.tokens == [ref[0][:1]] and both.stop_reasons == ["stop_id"]
    assert both.texts == [tok.decode(ref[0][:1])]
    late_id = ref[0][6]
    if late_id not in ref[0][:6]:
        late = generate(
            config,
            params,
            PROMPTS[:1],
            max_new_tokens=N,
            stop_ids=(late_id,),
            stop_strings=[stop],
            tokenizer=tok,
        )
        assert late.tokens == [ref[0][:3]] and late.stop_reasons == ["stop_string"]

    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(config, params, PROMPTS, max_new_tokens=N, stop_strings=["x"])


# ----- 7. errors ------------------------------------------------------------------------


def test_bad_arguments(tiny):
    config, params = tiny

    def gen(prompts=PROMPTS, **kw):
        return generate(config, params, prompts, **{"max_new_tokens": N, **kw})

    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen([[5, 6], []])
    with pytest.raises(ValueError, match=r"prompt 2: 250 tokens \+ max_new_tokens=8 exceed"):
        gen([[5], [6] * 248, [7] * 250])
    with pytest.raises(ValueError, match="max_seq_len=256"):
        gen([[5] * 200], max_new_tokens=57)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        gen(max_new_tokens=0)
    for bad in (
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(num_samples=0),
    ):
        with pytest.raises(ValueError, match="need temperature >= 0"):
            gen(**bad)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        gen(seeds=[1, 2])
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        left_pad([[1], []], 0)
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        score(config, params, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="pair 1: the prompt and the continuation"):
        score(config, params, [[1], [2]], [[3], []])
    with pytest.raises(ValueError, match="at least two options"):
        choose(config, params, [1, 2], [[3]])


def test_nan_temperature_is_rejected(tiny):
    config, params = tiny
    with pytest.raises(ValueError, match="temperature"):
        generate(config, params, PROMPTS, max_new_tokens=N, temperature=float("nan"))


class _CountingTokenizer:
    """The bundled tokenizer, but `decode` gives up after `limit` calls: a stop-string
    loop that makes no progress fails instead of hanging."""

    def __init__(self, tok, limit: int = 200):
        self.tok, self.limit, self.calls = tok, limit, 0

    def decode(self, ids):
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError(f"decode called {self.calls} times: the loop makes no progress")
        return self.tok.decode(ids)


@pytest.mark.parametrize("every", [0, -1])
def test_stop_check_every_must_be_positive(lively, tok, every):
    config, params = lively
    counting = _CountingTokenizer(tok)
    with pytest.raises(ValueError, match="stop_check_every"):
        generate(
            config,
            params,
            PROMPTS,
            max_new_tokens=N,
            stop_strings=["never said"],
            tokenizer=counting,
            stop_check_every=every,
        )


@pytest.mark.parametrize("fn", ["generate", "score"])
def test_negative_batch_size_is_rejected(tiny, fn):
    config, params = tiny
    with pytest.raises(ValueError, match="batch_size"):
        if fn == "generate":
            generate(config, params, PROMPTS, max_new_tokens=N, batch_size=-1)
        else:
            score(config, params, PROMPTS, [[1]] * 3, batch_size=-1)


def test_left_pad():
    tokens, segments = left_pad([[7, 8, 9], [5]], pad_id=2)
    np.testing.assert_array_equal(tokens, [[7, 8, 9], [2, 2, 5]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])


# ----- 8. score and choose --------------------------------------------------------------


def test_choose_is_softmax_of_summed_logprobs(lively):
    config, params = lively
    options = [[17], [300, 301, 302], [40, 41]]  # multi-token options
    prompts = [PROMPTS[0], PROMPTS[2], OTHER]
    probs = choose(config, params, prompts, options)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    for i, p in enumerate(prompts):
        summed = np.array(
            [_forward_logps(config, params, [p], [o])[0].sum() for o in options], np.float64
        )
        want = np.exp(summed - summed.max())
        np.testing.assert_allclose(probs[i], want / want.sum(), atol=1e-5, rtol=1e-4)
    single = choose(config, params, np.asarray(PROMPTS[2]), options)  # numpy ids too
    assert single.shape == (3,)
    np.testing.assert_allclose(single, probs[1], atol=1e-6)
    # Two one-token options: the ratio of next-token probabilities.
    two = choose(config, params, PROMPTS[1], [[17], [18]])
    logps = _forward_logps(config, params, [PROMPTS[1]] * 2, [[17], [18]])
    want = np.exp([logps[0][0], logps[1][0]])
    assert two.shape == (2,)
    np.testing.assert_allclose(two, want / want.sum(), atol=1e-6, rtol=1e-5)


def test_score_batches_and_order(lively):
    config, params = lively
    prompts = [PROMPTS[0], OTHER, PROMPTS[1], PROMPTS[2], [9]]
    conts = [[1, 2], [3], [4, 5, 6, 7], [8] * 10, [10, 11, 12]]
    want = [e.sum() for e in _forward_logps(config, params, prompts, conts)]
    np.testing.assert_allclose(score(config, params, prompts, conts), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        score(config, params, prompts, conts, batch_size=2), want, rtol=1e-5, atol=1e-4
    )


# ----- 9. shape buckets -----------------------------------------------------------------


def test_shape_buckets_bound_compilations(tiny):
    config, params = tiny
    assert hasattr(S._prefill, "_cache_size") and hasattr(S._decode, "_cache_size")
    new = N + 1  # a max_new_tokens no other test uses: every program here is fresh
    rng = np.random.default_rng(9)
    calls = [
        [rng.integers(4, 1024, int(n)).tolist() for n in rng.integers(3, 15, count)]
        for count in (1, 2, 3, 4, 5, 6, 7, 3, 1)
    ]
    assert {len(p) for c in calls for p in c} >= {3, 14}
    before = S._prefill._cache_size(), S._decode._cache_size()
    for i, prompts in enumerate(calls):
        # Rules are traced values: changing them never compiles anything new.
        generate(
            config, params, prompts, max_new_tokens=new, temperature=i / 4, top_k=i, top_p=0.95
        )
    after = S._prefill._cache_size(), S._decode._cache_size()
    # Batch buckets 1, 2, 4, 8 at prompt bucket 16: four programs of each, not seven.
    assert after[0] - before[0] <= 4 and after[1] - before[1] <= 4, (before, after)
    for prompts in calls:
        generate(config, params, prompts, max_new_tokens=new, seed=1)
    assert (S._prefill._cache_size(), S._decode._cache_size()) == after


# ----- 10. sharded sampling on 8 fake CPU devices ---------------------------------------


def test_sharded_sampling_equals_single_device():
    prompts = [PROMPTS[0], OTHER, [100], PROMPTS[2], PROMPTS[1][:2]]  # 5 prompts
    job = {"prompts": prompts, "seed": 3, "max_new_tokens": N, "scale": LIVELY}
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        # The subprocess imports the same checkout as this process.
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # SAMPLING_RULES: weights split over `tensor` only, never over `fsdp`.
    specs = {name: p["spec"] for name, p in r["params"].items()}
    assert specs["['embed']"] == "P('tensor', None)"
    assert specs["['layers']['attn']['q_kernel']"] == "P(None, None, 'tensor', None)"
    assert r["params"]["['layers']['attn']['k_kernel']"]["shard"] == [2, 64, 1, 16]
    assert not any("fsdp" in s for s in specs.values())

    sharded, single = r["sharded"], r["single"]
    assert sharded["reasons"] == single["reasons"] == ["length"] * 10
    assert sharded["greedy"] == single["greedy"]
    assert sharded["sampled"] == single["sampled"]
    assert sharded["sampled"] != sharded["greedy"]
    assert len({t for row in single["greedy"] for t in row}) > 10  # varied text
    for key in ("greedy_logprobs", "sampled_logprobs"):
        np.testing.assert_allclose(np.array(sharded[key]), np.array(single[key]), atol=1e-5, rtol=0)
    # Sums of eight float32 log-probs near -40: a few ulps apart at most.
    np.testing.assert_allclose(sharded["scores"], single["scores"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(
        single["scores"], np.array(single["sampled_logprobs"]).sum(-1), rtol=1e-5, atol=1e-4
    )


def test_ids_past_the_tokenizer_are_never_sampled(tok):
    """A model whose embedding table is larger than its tokenizer (a padded vocabulary):
    with the tokenizer given, sampling keeps to the ids it can decode, so stop strings and
    texts work; the log-probs stay the model's own over the whole table."""
    config = preset("tiny").replace(vocab_size=4 * tok.vocab_size)
    params = init_params(config, jax.random.key(3))
    prompts = [tok.encode("Hello there", add_bos=True)] * 4
    # hot enough that a random model's draws cover the whole table
    kwargs = {"max_new_tokens": 12, "temperature": 10.0, "seed": 0, "pad_id": tok.pad_id}
    free = S.generate(config, params, prompts, **kwargs)
    assert max(max(t) for t in free.tokens) >= tok.vocab_size  # without it they come up
    out = S.generate(config, params, prompts, tokenizer=tok, stop_strings=("\n\nHuman:",), **kwargs)
    assert max(max(t) for t in out.tokens) < tok.vocab_size
    assert all(isinstance(t, str) for t in out.texts)
    logits = forward(config, params, jnp.asarray([prompts[0] + out.tokens[0][:1]]))
    want = jax.nn.log_softmax(logits[0, len(prompts[0]) - 1])[out.tokens[0][0]]
    np.testing.assert_allclose(out.logprobs[0][0], want, rtol=1e-4, atol=1e-4)
