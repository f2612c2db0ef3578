"""The online RL objectives as records of the objective registry: `ppo`, `rloo`, `grpo`
and `online_dpo`.

Each reads `prompts` data and makes its own batches (`feed`: `jaxcai.rl.feed`); its
loss is pure and runs in the one shared train step, over rows the rollout laid out
(`extra_layout`: the per-token arrays beside the token rows):

- `ppo`: the clipped surrogate on GAE advantages, plus `kl_coef` times the k3 KL to the
  reference when `kl_estimator=k3` (with `k1` the KL is in the reward). The value model
  is PPO's own (`jaxcai.rl.value`), stepped by the rollout hook after each update.
- `rloo`: the clipped surrogate on leave-one-out advantages (with one epoch the ratio is
  1 and this is REINFORCE with the RLOO baseline).
- `grpo`: `rl_losses.grpo_loss`: the clipped surrogate on group-normalised advantages
  plus `kl_coef` times the k3 KL to the reference.
- `online_dpo`: the DPO loss (`objective.loss_type`, soft labels with
  `objective.soft_labels`) on pairs of fresh samples labelled by the judge or reward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcai import objectives, rl_losses
from jaxcai.logprobs import token_logps_of
from jaxcai.objectives import Objective, model_inputs

__all__ = ["RL_OBJECTIVES", "validate_rl"]

RL_OBJECTIVES = ("ppo", "rloo", "grpo", "online_dpo")


def _per_token(*keys: str):
    def layout(oc: Any, rows: int, length: int) -> dict:
        return {k: jax.ShapeDtypeStruct((rows, length), jnp.float32) for k in keys}

    return layout


def _logps(mc, params, batch) -> jax.Array:
    inputs = model_inputs(batch)
    return token_logps_of(mc, params, inputs, batch["targets"], batch["mask"])[0]


def _counts(batch) -> jax.Array:
    return batch["mask"].astype(jnp.float32).sum()


def ppo_loss(mc, oc, params, batch, ref_params=None):
    """PPO's clipped surrogate (and, with `kl_estimator=k3`, the KL term)."""
    logps, mask = _logps(mc, params, batch), batch["mask"]
    loss, metrics = rl_losses.ppo_policy_loss(
        logps, batch["old_logps"], batch["advantages"], mask, oc.clip
    )
    if oc.kl_estimator == "k3":
        kl = rl_losses.masked_mean(rl_losses.kl_k3(logps, batch["ref_logps"]), mask)
        loss = loss + oc.kl_coef * kl
        metrics["policy/kl_k3"] = kl
    return loss, {**metrics, "policy/loss": loss, "tokens": _counts(batch)}


def rloo_loss(mc, oc, params, batch, ref_params=None):
    """The clipped surrogate on RLOO's advantages (the KL is in the reward)."""
    logps = _logps(mc, params, batch)
    loss, metrics = rl_losses.ppo_policy_loss(
        logps, batch["old_logps"], batch["advantages"], batch["mask"], oc.clip
    )
    return loss, {**metrics, "policy/loss": loss, "tokens": _counts(batch)}


def grpo_objective_loss(mc, oc, params, batch, ref_params=None):
    """GRPO: the clipped surrogate plus `kl_coef` times the k3 KL to the reference."""
    logps = _logps(mc, params, batch)
    loss, metrics = rl_losses.grpo_loss(
        logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], batch["mask"],
        oc.clip, oc.kl_coef,
    )  # fmt: skip
    metrics["policy/kl_k3"] = metrics.pop("objective/kl")
    return loss, {**metrics, "policy/loss": loss, "tokens": _counts(batch)}


def _pair_refs(oc: Any, rows: int, length: int) -> dict:
    per_row = jax.ShapeDtypeStruct((rows,), jnp.float32)
    return {"ref_chosen_logps": per_row, "ref_rejected_logps": per_row}


def _feed(ctx: Any, fmt: Any):
    from jaxcai.rl.feed import make_feed

    return make_feed(ctx, fmt)


def _hooks(ctx: Any) -> list:
    from jaxcai.rl.feed import RolloutHook

    return [RolloutHook()]


def validate_rl(cfg: Any) -> None:
    """Config checks of an online RL run; `ConfigError` naming the key."""
    from jaxcai.config import KL_ESTIMATORS, REWARD_NORMALIZE, ConfigError

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"config {key}={value!r}: {why}")

    o, rc, r, t = cfg.objective, cfg.rollout, cfg.reward, cfg.trainer
    sources = [k for k in ("reward_model", "reward.judge", "reward.fn")
               if (cfg.get(k) if k == "reward_model" else r[k.split(".")[1]])]  # fmt: skip
    check(len(sources) == 1, "reward_model", cfg.get("reward_model"),
          f"objective {o.name} needs exactly one reward source: reward_model=PATH, "
          f"reward.judge=PATH or reward.fn=module:function (set: {sources or 'none'})")  # fmt: skip
    check(o.kl_estimator in KL_ESTIMATORS, "objective.kl_estimator", o.kl_estimator,
          f"choose one of {KL_ESTIMATORS}")  # fmt: skip
    check(r.normalize in REWARD_NORMALIZE, "reward.normalize", r.normalize,
          f"choose one of {REWARD_NORMALIZE}")  # fmt: skip
    check(r.clip >= 0, "reward.clip", r.clip, "must be >= 0 (0 = off)")
    check(o.clip > 0, "objective.clip", o.clip, "must be positive")
    check(o.kl_coef >= 0, "objective.kl_coef", o.kl_coef, "must be >= 0")
    for key in ("prompts", "samples", "max_new_tokens", "epochs", "batch_size"):
        check(rc[key] > 0, f"rollout.{key}", rc[key], "must be positive")
    if o.name in ("rloo", "grpo"):
        check(rc.samples >= 2, "rollout.samples", rc.samples, f"{o.name} needs >= 2 per prompt")
    if o.name == "online_dpo":
        check(rc.samples == 2, "rollout.samples", rc.samples, "online_dpo samples a pair")
    check(r.judge is None or rc.samples >= 2, "rollout.samples", rc.samples,
          "a judge compares >= 2 samples of each prompt")  # fmt: skip
    room = f"leaves no room for a prompt in data.max_len={cfg.data.max_len}"
    check(rc.max_new_tokens + 3 <= cfg.data.max_len, "rollout.max_new_tokens", rc.max_new_tokens,
          room)  # fmt: skip
    updates = rc.prompts * (1 if o.name == "online_dpo" else rc.samples)
    check(updates % t.batch_size == 0, "trainer.batch_size", t.batch_size,
          f"must divide the {updates} {'pairs' if o.name == 'online_dpo' else 'sequences'} "
          "of a rollout (rollout.prompts x rollout.samples)")  # fmt: skip
    check(not t.generate_eval, "trainer.generate_eval", t.generate_eval,
          "online RL has no references to score answers against")  # fmt: skip


def _record(name: str, loss, per_token: tuple[str, ...], doc: str) -> Objective:
    return Objective(
        name, "prompts", loss, weight="tokens", feed=_feed, hooks=_hooks,
        extra_layout=_per_token(*per_token), validate=validate_rl, doc=doc,
    )  # fmt: skip


PPO = objectives.register(_record(
    "ppo", ppo_loss, ("old_logps", "ref_logps", "advantages", "returns", "old_values"),
    "PPO against a reward source, with a value model and GAE",
))  # fmt: skip
RLOO = objectives.register(_record(
    "rloo", rloo_loss, ("old_logps", "ref_logps", "advantages"),
    "REINFORCE with a leave-one-out baseline over k samples per prompt",
))  # fmt: skip
GRPO = objectives.register(_record(
    "grpo", grpo_objective_loss, ("old_logps", "ref_logps", "advantages"),
    "group-normalised advantages, clipped ratio, k3 KL to the reference",
))  # fmt: skip
ONLINE_DPO = objectives.register(Objective(
    "online_dpo", "prompts", objectives.dpo_objective_loss, pairs=True, weight="pairs",
    feed=_feed, hooks=_hooks, extra_layout=_pair_refs, validate=validate_rl,
    doc="DPO on fresh pairs of policy samples labelled by the judge or reward",
))  # fmt: skip
