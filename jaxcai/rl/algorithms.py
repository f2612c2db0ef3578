"""What each online RL algorithm makes of a scored rollout: the per-token arrays its loss
reads, and the rollout metrics under the names TRL and OpenRLHF use.

A scored rollout (`Scored`) holds the rows of `N = P * K` sampled sequences (`K` per
prompt), the policy's log-probs when it sampled them (`old_logps`), the reference
policy's (`ref_logps`), the value model's (PPO) and the shaped rewards. Per algorithm:

- `ppo`: per-token rewards `-kl_coef * k1` (with `kl_estimator=k1`; with `k3` the KL is
  a loss term instead) plus the reward on the last response token; GAE advantages
  (whitened with `whiten_advantages`) and returns for the value model.
- `rloo`: the reward minus `kl_coef` times the sequence's summed k1 KL, then each
  sample's leave-one-out advantage within its prompt, on every response token.
- `grpo`: rewards normalised within each prompt's group, on every response token; the
  k3 KL to the reference is a loss term.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxcai import rl_losses

__all__ = ["PER_TOKEN", "Scored", "rollout_metrics", "targets"]

# The per-token float arrays a single-row RL batch carries beside the token rows.
PER_TOKEN = {
    "ppo": ("old_logps", "ref_logps", "advantages", "returns", "old_values"),
    "rloo": ("old_logps", "ref_logps", "advantages"),
    "grpo": ("old_logps", "ref_logps", "advantages"),
}


@dataclasses.dataclass
class Scored:
    rows: dict[str, np.ndarray]  # tokens, targets, mask, segment_ids, positions [N, T]
    old_logps: np.ndarray  # [N, T]
    ref_logps: np.ndarray  # [N, T]
    rewards: np.ndarray  # [N], shaped
    scores: np.ndarray  # [N], as the source gave them
    samples: int  # K
    values: np.ndarray | None = None  # [N, T] (ppo)

    @property
    def mask(self) -> np.ndarray:
        return self.rows["mask"].astype(np.float32)

    def kl_k1(self) -> np.ndarray:
        """Per-token k1 KL of the sampled tokens, 0 off the response [N, T]."""
        return (self.old_logps - self.ref_logps) * self.mask


def _on_tokens(per_sequence: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return per_sequence[:, None].astype(np.float32) * mask


def _ppo(s: Scored, oc: Any) -> dict[str, np.ndarray]:
    mask = s.mask
    per_token = -oc.kl_coef * s.kl_k1() if oc.kl_estimator == "k1" else np.zeros_like(mask)
    last = np.maximum(mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), 0)
    per_token[np.arange(len(mask)), last] += s.rewards
    advantages, returns = rl_losses.gae(per_token, s.values, mask, oc.gamma, oc.lam)
    if oc.whiten_advantages:
        advantages = rl_losses.whiten(advantages, mask)
    return {"advantages": np.asarray(advantages), "returns": np.asarray(returns),
            "old_values": s.values * mask}  # fmt: skip


def _rloo(s: Scored, oc: Any) -> dict[str, np.ndarray]:
    rewards = s.rewards - oc.kl_coef * s.kl_k1().sum(axis=1)
    adv = np.asarray(rl_losses.rloo_advantages(rewards.reshape(-1, s.samples))).reshape(-1)
    return {"advantages": _on_tokens(adv, s.mask)}


def _grpo(s: Scored, oc: Any) -> dict[str, np.ndarray]:
    adv = np.asarray(rl_losses.grpo_advantages(s.rewards.reshape(-1, s.samples))).reshape(-1)
    return {"advantages": _on_tokens(adv, s.mask)}


_TARGETS = {"ppo": _ppo, "rloo": _rloo, "grpo": _grpo}


def targets(name: str, scored: Scored, oc: Any) -> dict[str, np.ndarray]:
    """The rows of a rollout with the per-token arrays algorithm `name` trains on."""
    out = {**scored.rows, **_TARGETS[name](scored, oc)}
    out["old_logps"] = (scored.old_logps * scored.mask).astype(np.float32)
    out["ref_logps"] = (scored.ref_logps * scored.mask).astype(np.float32)
    out["weight"] = np.ones(len(scored.rewards), np.float32)
    return {k: out[k] for k in (*scored.rows, "weight", *PER_TOKEN[name])}


def rollout_metrics(s: Scored, oc: Any) -> dict[str, float]:
    """`objective/*` metrics of a rollout: the source's score, the KL to the reference
    (summed over each response, k1), the policy's entropy estimate (the sampled tokens'
    summed negative log-probs), and the KL-penalised reward."""
    kl = s.kl_k1().sum(axis=1)
    entropy = -(s.old_logps * s.mask).sum(axis=1)
    return {
        "objective/scores": float(s.scores.mean()),
        "objective/rewards": float(s.rewards.mean()),
        "objective/kl": float(kl.mean()),
        "objective/entropy": float(entropy.mean()),
        "objective/non_score_reward": float(-oc.kl_coef * kl.mean()),
        "objective/rlhf_reward": float((s.rewards - oc.kl_coef * kl).mean()),
        "rollout/response_length": float(s.mask.sum(axis=1).mean()),
    }
