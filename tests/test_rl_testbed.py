"""Online RL on the CAI testbed (`tests/cai_testbed.py`): learning really happens.

The testbed's base model says the rule-breaking marker " BANG" in about half its answers
and judges perfectly which of two answers lacks it. From it, as the initial policy (and
the reference), each online RL objective runs on the 90 training prompts and must leave
a policy that says the marker at most a third as often as the base model on the 30
held-out prompts, while its KL to the reference (`objective/kl`, the mean summed k1 KL
of a response) stays small and it keeps answering with its topic's facts:

- `ppo`, `rloo`, `grpo` with a reward model trained for a few dozen steps from the base
  model on (clean fact, marked fact) pairs of the training prompts;
- `online_dpo` with the base model itself as the AI judge, asked the testbed
  constitution's preference questions (no few-shot examples).

Settings (every objective): learning rate 1e-3 (3 warmup steps, then cosine), 16 prompts
per rollout, 32 new tokens at most, `data.max_len=128`, `kl_coef` at its default 0.05
(online DPO: beta 0.1, soft labels), two updates per rollout. Higher learning rates
(3e-3) also drive the marker out, but drift far from the reference (KL 5-10 nats) and
wreck the answers (a quarter on topic).

Measured on the 2 CPU cores with seed 0 (while other jobs shared them): base marker rate
0.48 (120 samples), the responses' share on topic 0.81; the reward model ranks all 60
held-out (clean, marked) pairs right. The base model trains in 80-150 s (the load decides),
the reward model in about 20 s; per-objective numbers are in each test's docstring (the
seconds are those of the RL run inside this module, whose sampling programs are compiled
by the first; a fresh process adds 10-20 s). The runs are deterministic: the same numbers
every time. With `trainer.seed=1` (other rollouts, same base model) every objective gets
to 0-0.017 too, KL 0.36-0.94. The slow tests take 4-5 minutes in all.

`test_judge_with_another_tokenizer` is fast and runs by default: a policy with a byte-level
BPE tokenizer and a ChatML template, judged by a model with a byte-fallback BPE tokenizer
and the Human/Assistant format.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cai_testbed as T
import numpy as np
import pytest
from omegaconf import OmegaConf

from jaxcai.config import compose
from jaxcai.load import load_model
from jaxcai.loop import run
from jaxcai.tokenizer import Tokenizer

HELD_OUT_SAMPLES = 4  # per held-out prompt: 120 responses per marker rate
LAST_ROLLOUTS = 5  # the KL bound is on the mean `objective/kl` of the last rollouts

# Shared by every objective (see the module docstring).
RL_OVERRIDES = (
    "model=tiny",
    "data.max_len=128",
    "rollout.prompts=16",
    "rollout.max_new_tokens=32",
    "optimizer.lr=1e-3",
    "optimizer.warmup_steps=3",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "trainer.tensorboard=false",
)
QUIET = ("trainer.eval_every=0", "trainer.progress=false", "trainer.tensorboard=false")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The testbed's base model's run directory, trained once for the module."""
    return T.train_base_model(tmp_path_factory.mktemp("rl_testbed"), seed=0)


def _held_out(config, params, tok) -> list[str]:
    return T.sample_responses(
        config, params, tok, T.heldout_prompts(), seed=1, num_samples=HELD_OUT_SAMPLES
    )


def _on_topic(responses: list[str]) -> float:
    """The share of held-out responses that are one of their topic's facts (marked or not)."""
    held = T.heldout_prompts()
    facts = [T.TOPICS[T.topic_of(held[i // HELD_OUT_SAMPLES])][1] for i in range(len(responses))]
    return float(np.mean([T.unmark(r) in f for r, f in zip(responses, facts, strict=True)]))


@pytest.fixture(scope="module")
def base_rate(base_dir, tok):
    """The base model's marker rate on the held-out prompts (measured 0.48)."""
    responses = _held_out(*load_model(base_dir), tok)
    rate = float(np.mean([T.has_marker(r) for r in responses]))
    assert rate >= 0.25, rate
    return rate


def preference_records(prompts: list[str]) -> list[dict[str, str]]:
    """Every (clean fact, marked fact) pair of each prompt's topic: 4 records a prompt."""
    records = []
    for prompt in prompts:
        facts = T.TOPICS[T.topic_of(prompt)][1]
        for clean in facts:
            for marked in facts:
                records.append({"prompt": prompt, "chosen": clean, "rejected": T.mark(marked)})
    return records


@pytest.fixture(scope="module")
def rm_dir(base_dir, tmp_path_factory):
    """A reward model trained from the base model: 40 steps of 16 of the 360 pairs of the
    training prompts (about 20 s)."""
    tmp = tmp_path_factory.mktemp("rl_testbed_rm")
    data = T.write_jsonl(tmp / "preferences.jsonl", preference_records(T.train_prompts()))
    overrides = [
        "objective=rm",
        "data=preferences",
        f"data.train={data}",
        "data.max_len=128",
        "data.eval_fraction=0",
        f"trainer.init_from={base_dir}",
        "trainer.steps=40",
        "trainer.batch_size=16",
        "trainer.checkpoint_every=0",
        "optimizer.lr=1e-3",
        "optimizer.warmup_steps=3",
        *QUIET,
    ]
    start = time.perf_counter()
    run(compose(overrides), tmp / "rm")
    base_seconds = json.loads((base_dir / "testbed.json").read_text())["train_seconds"]
    print(f"base model: {base_seconds:.0f} s, reward model: {time.perf_counter() - start:.0f} s")
    return tmp / "rm"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return T.write_prompts(
        tmp_path_factory.mktemp("rl_prompts") / "prompts.jsonl", T.train_prompts()
    )


def _rl(tmp_path: Path, base_dir: Path, prompts: Path, objective: str, *extra: str):
    """An online RL run from the base model: (run dir, seconds, metrics rows)."""
    overrides = [
        f"objective={objective}",
        f"trainer.init_from={base_dir}",
        f"data.train={prompts}",
        *RL_OVERRIDES,
        *extra,
    ]
    start = time.perf_counter()
    run(compose(overrides), tmp_path / objective)
    seconds = time.perf_counter() - start
    print(f"{objective}: {seconds:.0f} s")
    rows = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").open()]
    return tmp_path / objective, seconds, rows


def _check_learned(run_dir: Path, rows: list[dict], tok, base_rate: float, kl_bound: float):
    """The RL policy's marker rate is at most a third of the base model's, its KL to the
    reference over the last rollouts below `kl_bound`, and most answers still on topic."""
    responses = _held_out(*load_model(run_dir), tok)
    rate = float(np.mean([T.has_marker(r) for r in responses]))
    kl = [r["objective/kl"] for r in rows if "objective/kl" in r]
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    assert len(kl) == len(scores) >= LAST_ROLLOUTS + 5, len(kl)
    last_kl = float(np.mean(kl[-LAST_ROLLOUTS:]))
    on_topic = _on_topic(responses)
    summary = {"base": base_rate, "rate": rate, "kl": last_kl, "on_topic": on_topic}
    assert rate <= base_rate / 3, summary
    assert np.all(np.isfinite(kl)) and last_kl < kl_bound, (summary, kl)
    assert on_topic >= 0.5, summary  # base 0.81: the marker went, the answers stayed
    print(run_dir.name, summary, "kl per rollout", np.round(kl, 2).tolist())
    return summary, scores


@pytest.mark.slow
def test_reward_model_ranks_clean_above_marked(rm_dir, tok):
    """Held-out prompts, each topic's two facts clean vs marked: measured 60/60 right,
    mean reward 2.6 clean, -3.1 marked."""
    from jaxcai.cai.evaluate import reward_scores

    prompts, clean, marked = [], [], []
    for prompt in T.heldout_prompts():
        for fact in T.TOPICS[T.topic_of(prompt)][1]:
            prompts.append(prompt)
            clean.append(fact)
            marked.append(T.mark(fact))
    config, params = load_model(rm_dir)
    right = reward_scores(config, params, tok, prompts, clean) > reward_scores(
        config, params, tok, prompts, marked
    )
    assert right.mean() >= 0.9, right.mean()


@pytest.mark.slow
def test_ppo_with_reward_model(base_dir, base_rate, rm_dir, prompts_file, tok, tmp_path):
    """ppo, 4 samples per prompt, 64 sequences a rollout in 2 updates of 32, 20 steps
    (10 rollouts), value model from the reward model. Measured (seed 0): marker rate
    0.48 -> 0.0, KL of the last 5 rollouts 1.17, on topic 0.69, RM score 0.19 -> 2.6;
    25-42 s (the value model's own step is the extra)."""
    run_dir, seconds, rows = _rl(
        tmp_path, base_dir, prompts_file, "ppo", f"reward_model={rm_dir}",
        "rollout.samples=4", "trainer.batch_size=32", "trainer.steps=20",
    )  # fmt: skip
    summary, scores = _check_learned(run_dir, rows, tok, base_rate, kl_bound=2.5)
    assert np.mean(scores[-LAST_ROLLOUTS:]) > scores[0] + 1, scores


@pytest.mark.slow
def test_rloo_with_reward_model(base_dir, base_rate, rm_dir, prompts_file, tok, tmp_path):
    """rloo, 4 samples per prompt, 64 sequences a rollout in 2 updates of 32, 30 steps
    (15 rollouts). Measured (seed 0): marker rate 0.48 -> 0.008, KL of the last 5
    rollouts 0.66, on topic 0.68, RM score 0.19 -> 2.6; 14-29 s."""
    run_dir, seconds, rows = _rl(
        tmp_path, base_dir, prompts_file, "rloo", f"reward_model={rm_dir}",
        "rollout.samples=4", "trainer.batch_size=32", "trainer.steps=30",
    )  # fmt: skip
    summary, scores = _check_learned(run_dir, rows, tok, base_rate, kl_bound=2.0)
    assert np.mean(scores[-LAST_ROLLOUTS:]) > scores[0] + 1, scores


@pytest.mark.slow
def test_grpo_with_reward_model(base_dir, base_rate, rm_dir, prompts_file, tok, tmp_path):
    """grpo, 4 samples per prompt, 64 sequences a rollout in 2 updates of 32, 30 steps
    (15 rollouts). Measured (seed 0): marker rate 0.48 -> 0.017, KL of the last 5
    rollouts 0.77, on topic 0.65, RM score 0.19 -> 2.6; 19-27 s."""
    run_dir, seconds, rows = _rl(
        tmp_path, base_dir, prompts_file, "grpo", f"reward_model={rm_dir}",
        "rollout.samples=4", "trainer.batch_size=32", "trainer.steps=30",
    )  # fmt: skip
    summary, scores = _check_learned(run_dir, rows, tok, base_rate, kl_bound=2.0)
    assert np.mean(scores[-LAST_ROLLOUTS:]) > scores[0] + 1, scores


@pytest.mark.slow
def test_online_dpo_with_the_base_model_as_judge(base_dir, base_rate, prompts_file, tok, tmp_path):
    """online_dpo, the base model as the AI judge (both orders, no few-shot examples),
    soft labels, 16 pairs a rollout in 2 updates of 8, 30 steps (15 rollouts). Measured
    (seed 0): marker rate 0.48 -> 0.017, KL of the last 5 rollouts 0.61, on topic 0.71;
    19-22 s."""
    cons = T.write_constitution(tmp_path / "constitution.yaml")
    run_dir, seconds, rows = _rl(
        tmp_path, base_dir, prompts_file, "online_dpo", f"reward.judge={base_dir}",
        f"reward.constitution={cons}", "reward.few_shot=false", "objective.soft_labels=true",
        "rollout.samples=2", "trainer.batch_size=8", "trainer.steps=30",
    )  # fmt: skip
    _check_learned(run_dir, rows, tok, base_rate, kl_bound=2.0)


# ----- a judge with another tokenizer (fast, default run) -----------------------------


def _grpo_with_judge(tmp_path: Path, policy_tok: Path, judge: Path):
    """One grpo update of a random tiny policy with tokenizer `policy_tok`, judged by
    `judge`; the run's saved config (its judge a reward source to rebuild)."""
    from jaxcai import chat

    prompts = T.write_prompts(tmp_path / "prompts.jsonl", T.train_prompts()[:8])
    cons = T.write_constitution(tmp_path / "constitution.yaml")
    overrides = [
        "objective=grpo",
        "model=tiny",
        f"data.tokenizer={policy_tok}",
        f"data.train={prompts}",
        "data.max_len=96",
        f"reward.judge={judge}",
        f"reward.constitution={cons}",
        "reward.few_shot=false",
        "rollout.prompts=4",
        "rollout.samples=4",
        "rollout.max_new_tokens=12",
        "trainer.batch_size=16",
        "trainer.steps=1",
        "trainer.checkpoint_every=0",
        *QUIET,
    ]
    run(compose(overrides), tmp_path / "run")
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.data.chat == "template"  # the policy's ChatML
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    rollouts = [r for r in rows if "objective/scores" in r]
    assert len(rollouts) == 1  # one update: one rollout of 16 sequences
    # The ring's win probabilities average 1/2 in every group.
    assert rollouts[0]["objective/scores"] == pytest.approx(0.5, abs=1e-5)
    assert np.isfinite(rollouts[0]["objective/kl"]) and rollouts[0]["rollout/response_length"] > 0
    load_model(tmp_path / "run")  # the final policy, with its own tokenizer beside it
    policy_vocab = chat.load(policy_tok).tokenizer.vocab_size
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").vocab_size == policy_vocab
    return saved


def _judge_checks(saved) -> np.ndarray:
    """The run's judge rebuilt as its reward source: ring scores in [0, 1] (mean 1/2) and
    order-symmetric pair probabilities; returns P(clean better) for 2 (clean, marked)
    pairs (asked in both orders of the pair)."""
    from jaxcai.rl.rewards import JudgeReward, reward_source

    source = reward_source(saved)
    assert isinstance(source, JudgeReward)
    # Text outside the judge tokenizer's corpus too (its byte fallback).
    texts = ["Cats purr when they are happy.", "Cats sleep for most of the day. BANG",
             "日本語 🙂", "Cats purr when they are happy. BANG"]  # fmt: skip
    group = [T.train_prompts()[0]] * 4
    scores = source(group, texts, group=4)
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1)), scores
    assert scores.mean() == pytest.approx(0.5, abs=1e-5)
    pairs = [(texts[0], texts[1]), (texts[1], texts[0]), (texts[0], texts[3])]
    p = source.prefer(group[:3], pairs, [0, 0, 1])
    assert np.all((p > 0) & (p < 1)) and p[0] + p[1] == pytest.approx(1.0, abs=1e-5), p
    return np.asarray([p[0], p[2]])


@pytest.mark.slow  # ~25 s: one RL run with two tokenizers
def test_judge_with_another_tokenizer(tmp_path):
    """grpo from a random tiny policy whose tokenizer is the Qwen2-shaped byte-level BPE
    of `tests/hf_fixtures.py` (`data.tokenizer=`, ChatML template), judged by a tiny
    random Hugging Face checkpoint whose tokenizer is the Llama-2-shaped byte-fallback BPE
    (Human/Assistant format): each source re-encodes the text in its own tokenizer. The
    run completes, its judge scores are win probabilities (a ring of 4 per prompt: in
    [0, 1], each group's mean 1/2), and the judge's pair probabilities are
    order-symmetric (both orders asked and averaged). Measured 27-34 s on the 2 cores
    shared with other jobs (almost all of it compilation)."""
    import jax
    from hf_fixtures import llama2_dir, qwen2_dir

    from jaxcai import chat, model
    from jaxcai.hf import save_pretrained
    from jaxcai.model_config import ModelConfig

    policy_tok = qwen2_dir(tmp_path / "qwen2")
    judge = llama2_dir(tmp_path / "judge")  # tokenizer files, then the weights beside them
    judge_config = ModelConfig.tiny(vocab_size=chat.load(judge).tokenizer.vocab_size)
    save_pretrained(judge, judge_config, model.init_params(judge_config, jax.random.key(1)),
                    progress=False)  # fmt: skip
    assert chat.load(judge).kind != "template"
    _judge_checks(_grpo_with_judge(tmp_path, policy_tok, judge))


@pytest.mark.slow
def test_base_model_judges_a_policy_with_another_tokenizer(base_dir, tmp_path):
    """As above with the testbed's base model (the bundled sentencepiece tokenizer) as
    the judge of the Qwen2-tokenized policy: it also prefers the clean response of each
    (clean, marked) pair (measured P >= 0.999); 18-24 s."""
    from hf_fixtures import qwen2_dir

    policy_tok = qwen2_dir(tmp_path / "qwen2")
    p_clean = _judge_checks(_grpo_with_judge(tmp_path, policy_tok, base_dir))
    assert np.all(p_clean > 0.9), p_clean
