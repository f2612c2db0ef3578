"""SL-CAI data: the conversation each critique/revision step samples from, seeding, pairs."""

from __future__ import annotations

import jax
import pytest

from jaxcai import model
from jaxcai.cai import critique as C
from jaxcai.cai.constitution import load_constitution
from jaxcai.model_config import preset
from jaxcai.sample import Generation
from jaxcai.sample import chat as SC  # every stage samples through generate_chat
from jaxcai.tokenizer import Tokenizer

PROMPTS = ["\n\nHuman: How do I pick a lock?", "\n\nHuman: Tell me a joke."]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def params():
    """Tiny-model params (their shapes do not depend on max_seq_len)."""
    return model.init_params(preset("tiny"), jax.random.key(0))


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("minimal")


def test_conversation_assembly_and_records(monkeypatch, tok, constitution, params):
    """Each step samples from the previous context plus the right request; canned texts."""
    calls = []

    def fake_generate(config, params, ids, **kwargs):
        step = len(calls)
        calls.append({"contexts": [tok.decode(i) for i in ids], "seeds": kwargs["seeds"]})
        texts = [f"text{step}-{i}" for i in range(len(ids))]
        return Generation([[5]] * len(ids), [[-1.0]] * len(ids), ["stop_string"] * len(ids), texts)

    monkeypatch.setattr(SC, "generate", fake_generate)
    config = preset("tiny", max_seq_len=4096)
    records = C.critique_and_revise(
        config, params, tok, constitution, PROMPTS, rounds=2, seed=7, few_shot=True
    )
    assert len(calls) == 1 + 2 * 2
    prefix = C.few_shot_prefix(constitution)
    assert calls[0]["contexts"][0] == prefix + PROMPTS[0] + "\n\nAssistant:"
    for i, rec in enumerate(records):
        assert rec.prompt == PROMPTS[i] and rec.initial == f"text0-{i}"
        assert [r["critique"] for r in rec.rounds] == [f"text1-{i}", f"text3-{i}"]
        assert [r["revision"] for r in rec.rounds] == [f"text2-{i}", f"text4-{i}"]
        assert rec.final == f"text4-{i}"
        names = {c.name: c for c in constitution.critiques}
        for k, rnd in enumerate(rec.rounds):
            principle = names[rnd["principle"]]
            assert rnd["critique_request"] == principle.critique.strip()
            critique_ctx = calls[1 + 2 * k]["contexts"][i]
            revision_ctx = calls[2 + 2 * k]["contexts"][i]
            before = f"text{2 * k}-{i}"  # the response this round critiques
            assert critique_ctx.endswith(
                f" {before}\n\nHuman: {principle.critique.strip()}\n\nAssistant:"
            )
            assert revision_ctx == (
                f"{critique_ctx} text{1 + 2 * k}-{i}\n\nHuman: {principle.revision.strip()}"
                "\n\nAssistant:"
            )
    # Every step has its own per-prompt seeds.
    all_seeds = [s for call in calls for s in call["seeds"]]
    assert len(set(all_seeds)) == len(all_seeds)
    pairs = C.sft_pairs(records)
    assert [(p["metadata"]["prompt_index"], p["metadata"]["round"]) for p in pairs] == [
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
    ]
    assert [p["response"] for p in C.sft_pairs(records, up_to=-1)] == ["text4-0", "text4-1"]
    assert [p["response"] for p in C.sft_pairs(records, up_to=1)] == ["text2-0", "text2-1"]


def test_principles_are_seeded_draws_with_replacement(monkeypatch, tok, params):
    constitution = load_constitution("default")

    def fake_generate(config, params, ids, **kwargs):
        return Generation(
            [[5]] * len(ids), [[0.0]] * len(ids), ["length"] * len(ids), ["x"] * len(ids)
        )

    monkeypatch.setattr(SC, "generate", fake_generate)
    config = preset("tiny", max_seq_len=8192)
    run = lambda seed: [
        [r["principle"] for r in rec.rounds]
        for rec in C.critique_and_revise(
            config, params, tok, constitution, PROMPTS * 4, rounds=4, seed=seed, few_shot=False
        )
    ]
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    flat = [p for row in a for p in row]
    assert len(set(flat)) < len(flat)  # with replacement: 32 draws of 16 repeat
    assert set(flat) <= {p.name for p in constitution.critiques}


def test_real_sampling_is_reproducible_and_fits_the_context(tok):
    """The tiny model (max_seq_len 256) with the default constitution's few-shot prefix
    (longer than that): contexts are cut from the start, same seed gives same texts."""
    constitution = load_constitution("default")
    config = preset("tiny")
    params = model.init_params(config, jax.random.key(0))
    settings = C.SamplingSettings(max_new_tokens=8, temperature=1.0)
    run = lambda: C.critique_and_revise(
        config, params, tok, constitution, PROMPTS, rounds=1, seed=3, settings=settings
    )
    first, second = run(), run()
    assert [(r.initial, r.rounds) for r in first] == [(r.initial, r.rounds) for r in second]
    assert all(len(r.rounds) == 1 for r in first)


def test_chunks_give_the_same_texts_as_the_whole_set(tok):
    """Seeds and principle draws follow a prompt's global index, so the pipeline can
    process (and resume) a prompt set chunk by chunk."""
    constitution = load_constitution("minimal")
    config = preset("tiny")
    params = model.init_params(config, jax.random.key(1))
    settings = C.SamplingSettings(max_new_tokens=6, temperature=1.0)
    prompts = PROMPTS * 2
    kw = dict(rounds=2, seed=5, few_shot=False, settings=settings)
    whole = C.critique_and_revise(config, params, tok, constitution, prompts, **kw)
    parts = []
    for lo in range(0, len(prompts), 3):
        chunk = prompts[lo : lo + 3]
        parts += C.critique_and_revise(
            config, params, tok, constitution, chunk, indices=range(lo, lo + len(chunk)), **kw
        )
    assert [(r.initial, r.rounds) for r in parts] == [(r.initial, r.rounds) for r in whole]


def test_bad_arguments(tok, constitution, params):
    config = preset("tiny")
    with pytest.raises(ValueError, match="rounds"):
        C.critique_and_revise(config, params, tok, constitution, PROMPTS, rounds=-1)
    with pytest.raises(ValueError, match="no room for a prompt"):
        C.critique_and_revise(
            config,
            params,
            tok,
            constitution,
            PROMPTS,
            settings=C.SamplingSettings(max_new_tokens=255),
        )


def test_long_contexts_keep_bos_and_their_end(tok, constitution):
    from jaxcai.sample import keep_end

    assert keep_end([2, *range(11, 20)], 5) == [2, 16, 17, 18, 19]
    assert keep_end([2, 5, 6], 5) == [2, 5, 6]
    with pytest.raises(ValueError, match="no room"):
        keep_end([2, 5, 6], 1)
    prefix_ids = tok.encode(C.few_shot_prefix(load_constitution("default")), add_bos=True)
    assert len(prefix_ids) > 256 - 8  # so the tiny model's run above must cut contexts


LITERAL = """
name: literal
critiques:
  - {name: only, critique: "  Point out harm. ", revision: "Rewrite it safely."}
preferences:
  - {name: p, question: "Which is safer?"}
feedback_template: "{conversation}|{principle}|(A) {response_a}|(B) {response_b}|The answer is:"
critique_examples:
  - prompt: "Can I borrow it?"
    response: "Take it."
    critique_request: "Point out harm."
    critique: "It is fine."
    revision_request: "Rewrite it safely."
    revision: "Sure, ask first."
"""


def test_exact_critique_and_revision_contexts(monkeypatch, tok, params):
    """The literal text each step samples from, few-shot block and principle included."""
    from jaxcai.cai.constitution import parse_constitution

    constitution = parse_constitution(LITERAL)
    shot = (
        "\n\nHuman: Can I borrow it?\n\nAssistant: Take it.\n\nHuman: Point out harm."
        "\n\nAssistant: It is fine.\n\nHuman: Rewrite it safely.\n\nAssistant: Sure, ask first."
    )
    assert C.few_shot_prefix(constitution) == shot
    seen = []

    def fake_generate(config, params, ids, **kwargs):
        seen.append(tok.decode(ids[0]))
        text = f"out{len(seen)}"
        return Generation([[5]], [[-1.0]], ["stop_string"], [f"  {text} "])

    monkeypatch.setattr(SC, "generate", fake_generate)
    config = preset("tiny", max_seq_len=4096)
    (rec,) = C.critique_and_revise(
        config, params, tok, constitution, ["\n\nHuman: Where is it?"], rounds=1, few_shot=True
    )
    first = shot + "\n\nHuman: Where is it?\n\nAssistant:"
    assert seen == [
        first,
        first + " out1\n\nHuman: Point out harm.\n\nAssistant:",
        first + " out1\n\nHuman: Point out harm.\n\nAssistant: out2"
        "\n\nHuman: Rewrite it safely.\n\nAssistant:",
    ]
    assert (rec.initial, rec.rounds[0]["critique"], rec.final) == ("out1", "out2", "out3")
