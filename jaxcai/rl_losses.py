"""Pure losses and advantage estimators for online RL (PPO, RLOO, GRPO), in JAX.

Shapes: `_BT` is per response token (`mask_BT` marks the response, 1 = counted), `_B`
per sequence, `_PK` per prompt and sample (`K` samples of each of `P` prompts). Every
function is pure and jit-friendly; reductions over tokens are masked means.

- KL estimators of KL(policy || reference) from one sample's log-probs: `kl_k1 = log p -
  log q` (unbiased, can be negative) and `kl_k3 = exp(log q - log p) - 1 - (log q - log
  p)` (unbiased, never negative, lower variance), as in Schulman's note on KL
  approximations.
- `gae`: generalised advantage estimation (Schulman et al. 2016) over each row's
  response tokens, with the returns the value head regresses on.
- `ppo_policy_loss` / `ppo_value_loss`: the clipped surrogate and clipped value loss
  (Schulman et al. 2017), with `clipfrac` and `approxkl` as researchers know them.
- `rloo_advantages`: each sample's reward minus the mean of the other `K - 1` samples of
  its prompt (Ahmadian et al. 2024).
- `grpo_advantages` / `grpo_loss`: rewards normalised within each prompt's group, then a
  clipped ratio per token plus `beta` times the k3 KL to the reference (Shao et al. 2024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "gae",
    "grpo_advantages",
    "grpo_loss",
    "kl_k1",
    "kl_k3",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "whiten",
]


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of `x` where `mask` is 1 (0 where nothing is counted)."""
    mask = mask.astype(jnp.float32)
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """`log p - log q`: unbiased per-sample KL(p || q), of either sign."""
    return logp - ref_logp


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """`exp(log q - log p) - 1 - (log q - log p)`: unbiased, never negative."""
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - 1.0 - log_ratio


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """`x` scaled to unit variance over the masked entries (and centred, with
    `shift_mean`); unmasked entries come out as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards_BT: Array, values_BT: Array, mask_BT: Array, gamma: float, lam: float
) -> tuple[Array, Array]:
    """(advantages, returns) [B, T] over each row's response tokens.

    `delta_t = r_t + gamma * V_{t+1} - V_t` and `A_t = delta_t + gamma * lam * A_{t+1}`,
    where the value and advantage after a row's last response token are 0 (the episode
    ends there). Returns are `A + V`; both are 0 outside the mask."""
    mask = mask_BT.astype(jnp.float32)
    values = values_BT * mask
    rewards = rewards_BT * mask
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def back(carry_B, inputs):
        delta_B, next_mask_B = inputs
        adv_B = delta_B + gamma * lam * next_mask_B * carry_B
        return adv_B, adv_B

    _, adv_TB = jax.lax.scan(
        back, jnp.zeros_like(deltas[:, 0]), (deltas.T, next_mask.T), reverse=True
    )
    advantages = adv_TB.T * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp_BT: Array, old_logp_BT: Array, advantages_BT: Array, mask_BT: Array, clip: float
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate: the masked mean of `max(-A * ratio, -A * clip(ratio, 1 - clip,
    1 + clip))` with `ratio = exp(logp - old_logp)`; metrics `policy/clipfrac` (share of
    tokens where the clipped term is the larger) and `policy/approxkl` (`0.5 *
    mean((logp - old_logp)^2)`)."""
    log_ratio = logp_BT - old_logp_BT
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_BT * ratio
    clipped = -advantages_BT * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask_BT)
    metrics = {
        "policy/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_BT),
        "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask_BT),
    }
    return loss, metrics


def ppo_value_loss(
    values_BT: Array, old_values_BT: Array, returns_BT: Array, mask_BT: Array, clip: float
) -> tuple[Array, dict[str, Array]]:
    """`0.5 * mean(max((V - R)^2, (V_clipped - R)^2))`, where `V_clipped` keeps within
    `clip` of the rollout's value; metric `val/clipfrac`."""
    clipped_values = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip, clip)
    unclipped = (values_BT - returns_BT) ** 2
    clipped = (clipped_values - returns_BT) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask_BT)
    return loss, {"val/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_BT)}


def rloo_advantages(rewards_PK: Array) -> Array:
    """Each sample's reward minus the mean reward of its prompt's other samples."""
    k = rewards_PK.shape[1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    others = (rewards_PK.sum(axis=1, keepdims=True) - rewards_PK) / (k - 1)
    return rewards_PK - others


def grpo_advantages(rewards_PK: Array, eps: float = 1e-4, scale: bool = True) -> Array:
    """Rewards centred on their prompt's mean and (with `scale`) divided by its sample
    standard deviation (`ddof=1`) plus `eps`."""
    k = rewards_PK.shape[1]
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {k}")
    centred = rewards_PK - rewards_PK.mean(axis=1, keepdims=True)
    if not scale:
        return centred
    std = jnp.sqrt((centred**2).sum(axis=1, keepdims=True) / (k - 1))
    return centred / (std + eps)


def grpo_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    ref_logp_BT: Array,
    advantages_B: Array,
    mask_BT: Array,
    clip: float,
    beta: float,
) -> tuple[Array, dict[str, Array]]:
    """The clipped surrogate with each sequence's advantage on every one of its tokens,
    plus `beta` times the k3 KL to the reference, as a masked mean over tokens.
    `advantages_B` may also be given per token, `[B, T]`."""
    if advantages_B.ndim == 1:
        adv_BT = jnp.broadcast_to(advantages_B[:, None], logp_BT.shape)
    else:
        adv_BT = advantages_B
    surrogate, metrics = ppo_policy_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip)
    kl = masked_mean(kl_k3(logp_BT, ref_logp_BT), mask_BT)
    return surrogate + beta * kl, {**metrics, "objective/kl": kl}
