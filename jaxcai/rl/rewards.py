"""What scores a rollout: a reward model, an AI judge, or a user function, then shaping.

Every source sees text (the prompt transcript and the stripped response) and re-encodes
it in its own tokenizer and chat format, so a reward model or judge need not share the
policy's tokenizer:

- `RewardModel`: an `rm` run (or a checkpoint of one) read exactly as in its training
  (`jaxcai.cai.evaluate.reward_scores`);
- `JudgeReward`: a language model asked the constitution's preference questions, as in
  AI feedback (`jaxcai.cai.feedback.judge_pairs`, both orders by default). Its primitive
  is a pair (`prefer`: the probability the first response is better); a scalar reward for
  a group of `K` samples of one prompt is each sample's mean win probability against its
  neighbours in the group (a ring of `K` comparisons, `K >= 2`);
- `FunctionReward`: `reward.fn=module:function`, called as `function(prompts, responses)`
  and returning one float per response.

`shape` then applies the length penalty, normalisation and clipping of `reward`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxcai import streams

__all__ = [
    "FunctionReward",
    "JudgeReward",
    "RewardError",
    "RewardModel",
    "pair_probabilities",
    "reward_source",
    "shape",
]


class RewardError(ValueError):
    """A reward source that cannot be built or returned unusable rewards."""


class RewardModel:
    """Scalar rewards from a reward model (an `rm` run) in its own chat format."""

    def __init__(self, path: str, *, mesh=None, rules=None, max_len: int, batch_size: int):
        from jaxcai.load import chat_format, load_model
        from jaxcai.model import head_of

        kwargs = {"mesh": mesh} if rules is None else {"mesh": mesh, "rules": rules}
        self.config, self.params = load_model(path, **kwargs)
        if head_of(self.params) != "reward":
            raise RewardError(f"reward_model={path!r} is a language model, not a reward model")
        self.fmt = chat_format(path)
        self.max_len, self.batch_size, self.path = max_len, batch_size, path

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **_: Any) -> np.ndarray:
        from jaxcai.cai.evaluate import reward_scores

        return reward_scores(
            self.config, self.params, self.fmt, prompts, responses,
            max_len=min(self.max_len, self.config.max_seq_len), batch_size=self.batch_size,
        )  # fmt: skip


class FunctionReward:
    """`module:function` rewards; a raise or a non-finite value names the prompt."""

    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise RewardError(f"reward.fn={spec!r}: write it as module:function")
        try:
            self.fn: Callable = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RewardError(f"reward.fn={spec!r}: cannot import it ({e})") from e
        self.spec = spec

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], *, indices=(), **_: Any
    ) -> np.ndarray:
        indices = list(indices) or list(range(len(prompts)))
        try:
            values = list(self.fn(list(prompts), list(responses)))
        except Exception as e:
            raise RewardError(
                f"reward.fn={self.spec} raised on the batch of prompts {indices[0]}.."
                f"{indices[-1]}: {type(e).__name__}: {e}"
            ) from e
        if len(values) != len(prompts):
            raise RewardError(
                f"reward.fn={self.spec} returned {len(values)} values for {len(prompts)} responses"
            )
        out = np.zeros(len(values), np.float32)
        for i, value in enumerate(values):
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                out[i] = math.nan
            if not math.isfinite(float(out[i])):
                raise RewardError(
                    f"reward.fn={self.spec} returned {value!r} for prompt {indices[i]} "
                    f"({prompts[i][:60]!r}): rewards must be finite numbers"
                )
        return out


class JudgeReward:
    """A language model as the judge: pairwise preferences under the constitution."""

    def __init__(self, judge: Any, constitution: Any, settings: Any, seed: int = 0):
        """`judge` maps feedback questions to `[N, 2]` option probabilities
        (`jaxcai.cai.feedback.Judge`); `seed` is the run's seed."""
        self.judge, self.constitution, self.settings = judge, constitution, settings
        self.seed = streams.seed("rl.judge", seed)

    @classmethod
    def load(cls, path: str, cfg: Any, *, mesh=None, seed: int = 0) -> JudgeReward:
        """The language model at `path` as the judge, in its own chat format, with the
        `reward` settings `cfg` (constitution, few_shot, debias, batch_size)."""
        from jaxcai.cai.constitution import load_constitution
        from jaxcai.cai.feedback import FeedbackSettings, ModelJudge
        from jaxcai.load import chat_format, load_model

        config, params = load_model(path, mesh=mesh)
        judge = ModelJudge(config, params, chat_format(path), batch_size=cfg.batch_size, mesh=mesh)
        settings = FeedbackSettings(few_shot=cfg.few_shot, debias=cfg.debias)
        return cls(judge, load_constitution(cfg.constitution), settings, seed)

    def prefer(
        self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]], indices: Sequence[int]
    ) -> np.ndarray:
        """The probability that the first response of each pair is the better one."""
        from jaxcai.cai.feedback import judge_pairs

        judged = judge_pairs(
            self.judge, self.constitution, prompts, pairs, settings=self.settings,
            seed=self.seed, indices=indices,
        )  # fmt: skip
        return np.asarray([j.p_first for j in judged], np.float32)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], *, group: int, indices=()
    ) -> np.ndarray:
        """Each of `group` consecutive samples' mean win probability against the next
        and the previous sample of its group."""
        n = len(responses)
        if group < 2 or n % group:
            raise RewardError(f"a judge scores groups of >= 2 samples of a prompt, got {group}")
        indices = list(indices) or list(range(n))
        nxt = [i - i % group + (i % group + 1) % group for i in range(n)]
        if group == 2:  # the ring has one edge per pair: ask it once
            first = list(range(0, n, 2))
            p = self.prefer([prompts[i] for i in first],
                            [(responses[i], responses[i + 1]) for i in first],
                            [indices[i] for i in first])  # fmt: skip
            return np.stack([p, 1 - p], axis=1).reshape(-1)
        p = self.prefer(
            list(prompts), [(responses[i], responses[nxt[i]]) for i in range(n)], indices
        )
        wins = np.zeros(n, np.float32)
        for i in range(n):
            wins[i] += p[i] / 2
            wins[nxt[i]] += (1 - p[i]) / 2
        return wins


def pair_probabilities(rewards_P2: np.ndarray) -> np.ndarray:
    """P(first better) from two scalar rewards per prompt (Bradley-Terry)."""
    diff = rewards_P2[:, 0].astype(np.float64) - rewards_P2[:, 1]
    return (1.0 / (1.0 + np.exp(-diff))).astype(np.float32)


def reward_source(cfg: Any, *, mesh=None, rules=None):
    """The one reward source a config names (`reward_model`, `reward.judge` or
    `reward.fn`); `RewardError` naming the keys when there is none or more than one."""
    given = {
        "reward_model": cfg.get("reward_model"),
        "reward.judge": cfg.reward.judge,
        "reward.fn": cfg.reward.fn,
    }
    named = [k for k, v in given.items() if v]
    if len(named) != 1:
        which = "none is set" if not named else f"{', '.join(named)} are all set"
        raise RewardError(
            f"config {cfg.objective.name}: online RL needs exactly one reward source "
            f"(reward_model=PATH, reward.judge=PATH or reward.fn=module:function); {which}"
        )
    if named[0] == "reward_model":
        return RewardModel(
            cfg.reward_model, mesh=mesh, rules=rules, max_len=cfg.data.max_len,
            batch_size=cfg.reward.batch_size,
        )  # fmt: skip
    if named[0] == "reward.judge":
        return JudgeReward.load(cfg.reward.judge, cfg.reward, mesh=mesh, seed=cfg.trainer.seed)
    return FunctionReward(cfg.reward.fn)


def shape(scores: np.ndarray, lengths: np.ndarray, cfg: Any) -> np.ndarray:
    """`scores - length_penalty * lengths`, then (`normalize=batch`) standardised over the
    rollout, then clipped to `[-clip, clip]` when `clip > 0`."""
    out = scores.astype(np.float32) - np.float32(cfg.length_penalty) * lengths
    if cfg.normalize == "batch":
        out = (out - out.mean()) / (out.std() + 1e-6)
    if cfg.clip > 0:
        out = np.clip(out, -cfg.clip, cfg.clip)
    return out.astype(np.float32)
