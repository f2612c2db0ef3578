"""Online RL: rollout rows, the algorithms' per-token targets against numpy written out
here, online DPO's labels from a judge with a known position bias, the checkpointed
rollout state, config and reward errors, and short runs of each algorithm end to end.
(The loss formulas themselves: tests/test_rl_losses.py; learning on the CAI testbed:
tests/test_rl_testbed.py.)"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcai import objectives
from jaxcai.cai.constitution import load_constitution
from jaxcai.cai.feedback import FeedbackSettings
from jaxcai.config import ConfigError, compose, validate
from jaxcai.data.records import DataError
from jaxcai.loop import run
from jaxcai.metrics import read_metrics
from jaxcai.rl import algorithms, feed, rewards
from jaxcai.rl.prompts import RolloutState
from jaxcai.rl.rollout import Samples, rows

FAST = [
    "model=tiny",
    "data.train=bundled:red_team_prompts.jsonl",
    "data.max_len=64",
    "reward.fn=jaxcai.rl.example_rewards:concise",
    "rollout.prompts=4",
    "rollout.samples=2",
    "rollout.max_new_tokens=8",
    "rollout.epochs=2",
    "trainer.steps=4",
    "trainer.batch_size=8",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "optimizer.warmup_steps=0",
    "optimizer.lr=1e-3",
]
TIMING = ("seconds", "tokens_per_s", "sampling_share", "mfu")
PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def plugins_on_path():
    sys.path.insert(0, str(PLUGINS))
    yield
    sys.path.remove(str(PLUGINS))


def _samples() -> Samples:
    return Samples(
        prompts=["p0", "p1"],
        indices=[0, 1],
        samples=2,
        prompt_ids=[[1, 5, 6], [1, 5, 6], [1, 7], [1, 7]],
        response_ids=[[9, 10, 2], [11], [12, 13], [2]],
        texts=["a", "b", "c", ""],
        new_tokens=7,
    )


def test_rows_mask_the_response_and_its_stop_token():
    out = rows(_samples(), max_len=6, pad_id=0)
    np.testing.assert_array_equal(out["tokens"][0], [1, 5, 6, 9, 10, 0])
    np.testing.assert_array_equal(out["targets"][0], [5, 6, 9, 10, 2, 0])
    np.testing.assert_array_equal(out["mask"][0], [0, 0, 1, 1, 1, 0])  # 9, 10 and the stop
    np.testing.assert_array_equal(out["mask"][2], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["segment_ids"][3], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 0])


def _scored(values: bool = False) -> algorithms.Scored:
    rng = np.random.default_rng(0)
    arrays = rows(_samples(), max_len=6, pad_id=0)
    shape_ = arrays["mask"].shape
    return algorithms.Scored(
        rows=arrays,
        old_logps=-rng.random(shape_).astype(np.float32),
        ref_logps=-rng.random(shape_).astype(np.float32),
        rewards=np.asarray([1.0, 0.0, 0.5, 2.0], np.float32),
        scores=np.asarray([1.0, 0.0, 0.5, 2.0], np.float32),
        samples=2,
        values=rng.normal(size=shape_).astype(np.float32) if values else None,
    )


class _Oc:
    kl_coef, kl_estimator, gamma, lam, whiten_advantages = 0.1, "k1", 1.0, 0.95, False


def test_rloo_targets_are_leave_one_out_of_kl_penalised_rewards():
    s = _scored()
    mask = s.rows["mask"].astype(np.float64)
    kl = ((s.old_logps - s.ref_logps) * mask).sum(axis=1)
    r = s.rewards - 0.1 * kl
    expected = np.asarray([r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]])  # K = 2
    out = algorithms.targets("rloo", s, _Oc())
    np.testing.assert_allclose(out["advantages"], expected[:, None] * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["old_logps"], s.old_logps * mask)
    assert set(out) == {*objectives.ROW_KEYS, "weight", "old_logps", "ref_logps", "advantages"}


def test_grpo_targets_normalise_within_each_group():
    s = _scored()
    mask = s.rows["mask"]
    out = algorithms.targets("grpo", s, _Oc())
    # two samples: (r - mean) / (sample std + 1e-4), std = |r0 - r1| / sqrt(2)
    for a, b in ((0, 1), (2, 3)):
        std = abs(s.rewards[a] - s.rewards[b]) / np.sqrt(2)
        want = (s.rewards[a] - (s.rewards[a] + s.rewards[b]) / 2) / (std + 1e-4)
        np.testing.assert_allclose(out["advantages"][a], want * mask[a], rtol=1e-5)


def test_ppo_reward_sits_on_the_last_response_token():
    s = _scored(values=True)
    mask = s.rows["mask"].astype(np.float64)
    out = algorithms.targets("ppo", s, _Oc())
    # gamma = 1, lambda = 0.95 by hand over row 0's three response tokens (slots 2, 3, 4)
    kl = (s.old_logps[0] - s.ref_logps[0]) * mask[0]
    r = -0.1 * kl
    r[4] += s.rewards[0]
    v = s.values[0] * mask[0]
    adv, nxt = np.zeros(6), 0.0
    for t in (4, 3, 2):
        delta = r[t] + (v[t + 1] if t < 4 else 0.0) - v[t]
        nxt = delta + 0.95 * nxt
        adv[t] = nxt
    np.testing.assert_allclose(out["advantages"][0], adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["returns"][0], (adv + v) * mask[0], rtol=1e-4, atol=1e-5)


class _BiasedJudge:
    """Prefers the response containing "clean" with probability 0.9, and adds 0.08 to
    option (A) whatever it holds (a position bias)."""

    def __call__(self, questions):
        out = []
        for q in questions:
            a = re.search(r"\(A\) (.*)", q).group(1)
            p_a = (0.9 if "clean" in a else 0.1) + 0.08
            out.append([p_a, 1 - p_a])
        return np.asarray(out)


def test_online_dpo_labels_from_a_biased_judge_are_debiased():
    judge = rewards.JudgeReward(
        _BiasedJudge(), load_constitution("minimal"), FeedbackSettings(few_shot=False)
    )
    prompts = ["\n\nHuman: hi", "\n\nHuman: yo"]
    pairs = [("a clean reply", "a rude reply"), ("a rude reply", "a clean reply")]
    p_first = judge.prefer(prompts, pairs, [0, 1])
    # both orders: (0.98 + (1 - 0.18)) / 2 = 0.9 -- the bias cancels
    np.testing.assert_allclose(p_first, [0.9, 0.1], atol=1e-6)
    s = _scored()
    texts = [t for pair in pairs for t in pair]
    buffer, skipped = feed._pairs(s, p_first, texts)
    assert skipped == 0
    np.testing.assert_allclose(buffer["p_chosen"], [0.9, 0.9], atol=1e-6)
    np.testing.assert_array_equal(buffer["chosen"]["tokens"][0], s.rows["tokens"][0])
    np.testing.assert_array_equal(buffer["chosen"]["tokens"][1], s.rows["tokens"][3])
    ref = (s.ref_logps * s.rows["mask"]).sum(axis=1)
    np.testing.assert_allclose(buffer["ref_rejected_logps"], [ref[1], ref[2]], rtol=1e-6)
    # scalar judge rewards of a group of two are the pair's probabilities
    np.testing.assert_allclose(
        judge(["\n\nHuman: hi"] * 2, list(pairs[0]), group=2), [0.9, 0.1], atol=1e-6
    )


def test_identical_or_empty_pairs_get_no_weight():
    s = _scored()
    buffer, skipped = feed._pairs(s, np.asarray([0.7, 0.2]), ["same", "same", "x", ""])
    assert skipped == 2 and buffer["weight"].tolist() == [0.0, 0.0]


def test_rollout_state_round_trips_through_its_checkpoint_bytes():
    st = RolloutState(10, seed=3, shuffle=True)
    first = st.take(7) + st.take(7)  # into the second pass
    assert sorted(first[:10]) == list(range(10))  # each pass covers every prompt once
    st.buffer = {"chosen": {"tokens": np.arange(6).reshape(2, 3)}, "w": np.ones(2, np.float32)}
    st.plan(2, 1, 2)
    st.cursor = 1
    again = RolloutState(10, seed=3, shuffle=True)
    again.set_state(st.get_state())
    assert (again.position, again.cursor, again.order) == (14, 1, st.order)
    np.testing.assert_array_equal(again.buffer["chosen"]["tokens"], st.buffer["chosen"]["tokens"])
    assert again.take(3) == st.take(3)
    st.cursor = len(st.order)  # a used-up rollout saves no rows
    assert "buffer" not in json.loads(st.get_state())


def test_reward_fn_errors_name_the_prompt(plugins_on_path):
    fn = rewards.FunctionReward("rl_test_rewards:fails_on_marker")
    with pytest.raises(rewards.RewardError, match=r"prompts 4\.\.6: ValueError: marker"):
        fn(["a", "b", "c"], ["ok", "MARK", "ok"], indices=[4, 5, 6])
    fn = rewards.FunctionReward("rl_test_rewards:nan_on_marker")
    with pytest.raises(rewards.RewardError, match="nan for prompt 5"):
        fn(["a", "b"], ["ok", "MARK"], indices=[4, 5])
    with pytest.raises(rewards.RewardError, match="module:function"):
        rewards.FunctionReward("no_colon")
    with pytest.raises(rewards.RewardError, match="cannot import"):
        rewards.FunctionReward("rl_test_rewards:missing")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="reward_model.*exactly one reward source"):
        validate(compose(["objective=grpo"]), 1)
    both = ["objective=grpo", "reward.fn=a:b", "reward_model=/x"]
    with pytest.raises(ConfigError, match="reward.fn"):
        validate(compose(both), 1)
    with pytest.raises(ConfigError, match="rollout.samples"):
        validate(compose(["objective=grpo", "reward.fn=a:b", "rollout.samples=1"]), 1)
    with pytest.raises(ConfigError, match="trainer.batch_size"):
        validate(compose(["objective=rloo", "reward.fn=a:b", "trainer.batch_size=5"]), 1)


def test_a_dataset_of_another_kind_is_named(tmp_path):
    cfg = compose(["objective=grpo", *FAST, "data.train=bundled:sft.jsonl"])
    with pytest.raises(DataError, match="data.train=.*'sft' dataset; this run needs 'prompts'"):
        run(cfg, tmp_path / "run")


def _steps(run_dir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not any(t in k for t in TIMING)}
        for r in read_metrics(run_dir)
    ]


@pytest.mark.parametrize(
    "objective",
    [  # whole runs: the slow pass (rloo and online_dpo run in test_rl_testbed.py)
        pytest.param("grpo", marks=pytest.mark.slow),
        pytest.param("ppo", marks=pytest.mark.slow),
    ],
)
def test_each_algorithm_runs_and_reports(objective, tmp_path):
    extra = ["trainer.batch_size=4"] if objective == "online_dpo" else []
    result = run(compose([f"objective={objective}", *FAST, *extra]), tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]  # the first update follows the first rollout: its metrics are there
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward"):
        assert key in first, key
    assert first["rollout/tokens_per_s"] > 0
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert "rollout/sampling_share" in records[2]  # the second rollout reports the first cycle
    if objective == "ppo":
        assert "val/loss" in first and "val/clipfrac" in first
    if objective != "online_dpo":
        assert first["policy/approxkl"] < 1e-6  # the rollout's log-probs are the step's
    assert np.isfinite(result["train/loss"])


@pytest.mark.slow
def test_lora_reference_is_the_base_weights_with_adapters_off(tmp_path):
    """Under LoRA the reference is the state's own base weights (no copy): the first
    rollout's KL is 0 (fresh adapters change nothing), later ones move away from it."""
    import jax

    from jaxcai import hf, model
    from jaxcai.model_config import preset
    from jaxcai.tokenizer import Tokenizer

    config = preset("tiny")
    hf.save_pretrained(tmp_path / "base", config, model.init_params(config, jax.random.key(0)),
                       tokenizer=Tokenizer.load())  # fmt: skip
    overrides = ["objective=grpo", *FAST, f"trainer.init_from={tmp_path / 'base'}",
                 "model.lora_rank=4", "model.lora_alpha=8", "optimizer.lr=5e-2",
                 "trainer.steps=6"]  # fmt: skip
    run(compose(overrides), tmp_path / "run")
    kls = [r["objective/kl"] for r in read_metrics(tmp_path / "run") if "objective/kl" in r]
    assert len(kls) == 3 and kls[0] == pytest.approx(0.0, abs=1e-6)
    assert abs(kls[-1]) > 1e-4  # the adapters trained; the reference did not follow
