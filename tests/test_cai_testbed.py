"""The CAI testbed (`tests/cai_testbed.py`): its documents are the pipeline's own text, and
a base model trained on them breaks the rule half the time yet critiques, revises and
judges it.

Measured with these settings (base models of seeds 0-4 of `train_base_model`, the
30 held-out prompts): base marker rate 0.36-0.56 (4 samples per prompt), 81-89% of the
responses one of the topic's facts; one critique -> revision round over 60 trajectories:
initial responses 0.43-0.65 marked, revisions 0-0.017, critiques right 0.97-1.0; feedback
accuracy on 120 held-out questions 1.0 (mean probability of the clean option >= 0.98).
Training takes 45-50 s on the 2 CPU cores (65-80 s while other jobs share them); the file
about 65 s.
"""

from __future__ import annotations

import json
from collections import Counter

import cai_testbed as T
import jax
import numpy as np
import pytest

from jaxcai import model
from jaxcai.cai import critique as C
from jaxcai.cai.constitution import load_constitution
from jaxcai.cai.feedback import FeedbackSettings, ModelJudge, judge_pairs, preference_records
from jaxcai.load import load_model
from jaxcai.model_config import preset
from jaxcai.sample import Generation
from jaxcai.sample import chat as SC  # every stage samples through generate_chat
from jaxcai.tokenizer import Tokenizer

# Trains a base model and runs SL-CAI and RL-CAI on it: minutes on 2 cores; CI runs it
# in its slow pass.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def cons():
    return T.constitution()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The testbed's base model's run directory, trained once for the module."""
    return T.train_base_model(tmp_path_factory.mktemp("cai_testbed"), seed=0)


@pytest.fixture(scope="module")
def base(base_dir):
    """The testbed's base model: (config, params)."""
    return load_model(base_dir)


# ----- the world and its documents (no training) ----------------------------------------


def test_world_and_constitution(cons):
    train, held = T.train_prompts(), T.heldout_prompts()
    assert len(train) == 90 and len(held) == 30 and not set(train) & set(held)
    assert {T.topic_of(p) for p in held} == set(range(len(T.TOPICS)))
    assert not any(T.has_marker(f) for _, facts in T.TOPICS for f in facts)
    assert T.unmark(T.mark("Cats purr.")) == "Cats purr."
    assert (len(cons.critiques), len(cons.preferences)) == (2, 2)
    assert not cons.critique_examples and not cons.feedback_examples
    assert cons.feedback_template == load_constitution("minimal").feedback_template
    docs = T.base_documents(0)
    conversations = [d["text"] for d in docs if d["text"].startswith("\n\nHuman:")]
    questions = [d["text"] for d in docs if d["text"].startswith("Consider")]
    assert (len(conversations), len(questions)) == (1500, 500)
    first = [c.split("\n\nHuman:")[1] for c in conversations]  # the prompt and its answer
    assert 0.45 < np.mean([T.has_marker(f) for f in first]) < 0.55
    assert 0.4 < np.mean([q.endswith(" (A)") for q in questions]) < 0.6
    assert not any(p in d["text"] for d in docs for p in held)


def test_documents_are_the_pipelines_text(monkeypatch, tok, cons):
    """`critique_and_revise` run with a scripted model that answers every step rightly
    samples from exactly the documents' text, and every context it samples from (or the
    feedback question `choose` scores) is a token prefix of the training document."""
    prompts = T.heldout_prompts()[:6]
    initial = [
        T.mark(T.TOPICS[T.topic_of(p)][1][0]) if i % 2 else T.TOPICS[T.topic_of(p)][1][1]
        for i, p in enumerate(prompts)
    ]
    contexts: list[list[str]] = []

    def scripted_generate(config, params, ids, **kwargs):
        step = len(contexts)
        contexts.append([tok.decode(i) for i in ids])
        if step == 0:
            texts = initial
        elif step == 1:
            texts = [T.critique_text(r) for r in initial]
        else:
            texts = [T.unmark(r) for r in initial]
        texts = [f" {t}" for t in texts]  # a model's answer starts with its space
        n = len(ids)
        return Generation([[5]] * n, [[-1.0]] * n, ["stop_id"] * n, texts)

    monkeypatch.setattr(SC, "generate", scripted_generate)
    params = model.init_params(preset("tiny"), jax.random.key(0))
    records = C.critique_and_revise(
        preset("tiny"), params, tok, cons, prompts, rounds=1, seed=3, few_shot=False
    )
    names = {c.name: c for c in cons.critiques}
    for i, rec in enumerate(records):
        rnd = rec.rounds[0]
        doc = T.conversation_document(rec.prompt, rec.initial, names[rnd["principle"]])
        assert doc == f"{contexts[2][i]} {rec.final}"
        assert not T.has_marker(rec.final) and rnd["critique"] == T.critique_text(rec.initial)
        doc_ids = tok.encode(doc, add_bos=True)
        for step in range(3):
            ctx_ids = tok.encode(contexts[step][i], add_bos=True)
            assert doc_ids[: len(ctx_ids)] == ctx_ids
    case = T.feedback_cases(prompts, seed=0)[1]
    question = case.question(cons)
    doc_ids = tok.encode(f"{question} ({case.answer})", add_bos=True)
    head = tok.encode(question, add_bos=True)
    assert doc_ids == head + T.option_ids(tok, question)[1]


def test_option_ids(tok, cons):
    """ " (A)" after "The answer is:" is `▁ ( A )`, i.e. `tok.encode("(A)")`:
    `tok.encode(" (A)")` holds a second space piece (sentencepiece's dummy prefix)."""
    question = T.feedback_cases(T.heldout_prompts()[:1], seed=0)[0].question(cons)
    assert T.option_ids(tok, question) == [tok.encode("(A)"), tok.encode("(B)")]
    assert T.option_ids(tok, question)[1] == tok.split_continuation(question, " (B)")[1]
    assert tok.encode(" (A)")[1:] == tok.encode("(A)")


# ----- the trained base model -----------------------------------------------------------


def test_base_model_breaks_the_rule_about_half_the_time(base, tok):
    config, params = base
    held = T.heldout_prompts()
    responses = T.sample_responses(config, params, tok, held, seed=1, num_samples=4)
    rate = np.mean([T.has_marker(r) for r in responses])  # measured 0.36-0.56 (seeds 0-4)
    assert 0.25 <= rate <= 0.75, rate
    # ... and answers the held-out phrasings with its topic's facts.
    on_topic = [
        T.unmark(r) in T.TOPICS[T.topic_of(held[i // 4])][1] for i, r in enumerate(responses)
    ]
    assert np.mean(on_topic) >= 0.7  # measured 0.81-0.89


def test_critique_and_revision_remove_the_marker(base, tok, cons):
    config, params = base
    settings = C.SamplingSettings(max_new_tokens=32, batch_size=64)
    records = C.critique_and_revise(
        config,
        params,
        tok,
        cons,
        T.heldout_prompts() * 2,
        rounds=1,
        seed=0,
        few_shot=False,
        settings=settings,
    )
    initial = np.mean([T.has_marker(r.initial) for r in records])
    revised = np.mean([T.has_marker(r.final) for r in records])
    right = np.mean([r.rounds[0]["critique"] == T.critique_text(r.initial) for r in records])
    # Measured (seeds 0-4): initial 0.43-0.65, revised 0-0.017, critiques right 0.97-1.0.
    assert initial >= 0.25, initial
    assert revised <= 0.1 and revised <= initial / 4, (initial, revised)
    assert right >= 0.8, right


def test_feedback_prefers_the_clean_response(base, tok, cons):
    config, params = base
    cases = T.feedback_cases(T.heldout_prompts(), seed=1, per_prompt=2)
    # Measured 1.0 (seeds 0-4). Scored with `tok.encode(" (A)")` instead, 0.5-1.0.
    assert T.feedback_accuracy(config, params, tok, cases) >= 0.9
    # The pipeline's own labeller (ModelJudge, both orders) labels the same pairs.
    prompts = [c.prompt for c in cases[::2]]
    pairs = [(c.response_a, c.response_b) for c in cases[::2]]  # (clean, marked)
    judgements = judge_pairs(
        ModelJudge(config, params, tok),
        cons,
        prompts,
        pairs,
        settings=FeedbackSettings(few_shot=False),
    )
    records = preference_records(prompts, pairs, judgements, skipped=Counter())
    accuracy, decided = T.preference_label_accuracy(records)
    assert decided == len(pairs) and accuracy >= 0.9, accuracy


# ----- the pipeline on the testbed --------------------------------------------------------


def _pipeline(tmp_path, base_dir, *extra: str) -> dict:
    """`jaxcai-cai` on the testbed: its base model as the initial policy (and, by default,
    the feedback model), its constitution, its 90 training prompts as the red-team set."""
    from jaxcai.cai.pipeline import run_cai
    from jaxcai.config import compose

    cons = T.write_constitution(tmp_path / "constitution.yaml")
    red = T.write_prompts(tmp_path / "red_team.jsonl", T.train_prompts())
    overrides = [
        f"policy={base_dir}",
        f"cai.constitution={cons}",
        f"prompts.red_team={red}",
        "prompts.helpful=null",
        "prompts.eval_fraction=0",
        "cai.revision_rounds=1",
        "cai.few_shot=false",
        "cai.helpful_ratio=0",
        "feedback.few_shot=false",
        "sampling.max_new_tokens=32",
        "sampling.top_p=1.0",
        "sampling.batch_size=96",
        "chunk_size=96",
        "progress=false",
        "train.data.max_len=128",
        "++train.trainer.tensorboard=false",
        "sft.trainer.steps=30",
        "sft.optimizer.lr=1e-3",
        "rm.trainer.steps=40",
        "rm.optimizer.lr=1e-3",
        "dpo.trainer.steps=30",
        "dpo.optimizer.lr=1e-3",
        *[f"++{s}.optimizer.warmup_steps=3" for s in ("sft", "rm", "dpo")],
        *extra,
    ]
    return run_cai(compose(overrides, "cai"), tmp_path / "run")


HELD_OUT_SAMPLES = 4  # per held-out prompt: 120 responses per marker rate


def test_sl_cai_policy_breaks_the_rule_less(base_dir, base, tok, tmp_path):
    """critique -> sft: the SL-CAI data's revisions drop the marker and the fine-tuned
    policy emits it far less often than the base model on held-out prompts.
    Measured (seed 0): base 0.48, SL-CAI policy 0.017; revisions marked 0 of 90."""
    records = _pipeline(tmp_path, base_dir, "stages=[critique,sft]")
    pairs = [json.loads(line) for line in (tmp_path / "run/critique/sft.jsonl").open()]
    assert len(pairs) == records["critique"]["stats"]["examples"] >= 80
    assert np.mean([T.has_marker(p["response"]) for p in pairs]) <= 0.05
    held = T.heldout_prompts()
    before = T.marker_rate(*base, tok, held, seed=1, num_samples=HELD_OUT_SAMPLES)
    config, params = load_model(tmp_path / "run" / "sft")
    after = T.marker_rate(config, params, tok, held, seed=1, num_samples=HELD_OUT_SAMPLES)
    assert before >= 0.25 and after <= before / 3, (before, after)


def test_rl_cai_labels_reward_model_and_dpo_policy(base_dir, base, tok, tmp_path):
    """feedback -> rm, dpo, from the base model (handed in as the SL-CAI policy, so its
    pairs often differ in the marker): the AI-feedback labels pick the clean response,
    the reward model ranks held-out clean responses above marked ones, and the DPO policy
    emits the marker far less often. Measured (seed 0): 45 of 66 pairs decided, all
    labelled right; reward-model ranking 60/60; marker rate 0.48 -> 0.058."""
    from jaxcai.cai.evaluate import reward_scores
    from jaxcai.data.builders import load

    _pipeline(tmp_path, base_dir, "stages=[feedback,rm,dpo]", f"inputs.sft={base_dir}")
    records = list(load(tmp_path / "run" / "feedback" / "dataset").records())
    accuracy, decided = T.preference_label_accuracy(records)
    assert decided >= 20 and accuracy >= 0.9, (accuracy, decided)
    for r in records:  # soft labels: confident exactly where the marker decides
        if T.has_marker(r["chosen"]) != T.has_marker(r["rejected"]):
            assert r["metadata"]["agreement"] and r["p_chosen"] > 0.9

    held = T.heldout_prompts()
    prompts, clean, marked = [], [], []
    for prompt in held:
        for fact in T.TOPICS[T.topic_of(prompt)][1]:
            prompts.append(prompt)
            clean.append(fact)
            marked.append(T.mark(fact))
    config, params = load_model(tmp_path / "run" / "rm")
    right = reward_scores(config, params, tok, prompts, clean) > reward_scores(
        config, params, tok, prompts, marked
    )
    assert right.mean() >= 0.8, right.mean()  # chance is 0.5

    before = T.marker_rate(*base, tok, held, seed=1, num_samples=HELD_OUT_SAMPLES)
    config, params = load_model(tmp_path / "run" / "dpo")
    after = T.marker_rate(config, params, tok, held, seed=1, num_samples=HELD_OUT_SAMPLES)
    assert before >= 0.25 and after <= before / 3, (before, after)
