"""Training losses: SFT cross entropy, Bradley-Terry reward modelling and DPO variants.

Pure, jit- and grad-safe functions on arrays. Logits are already aligned with their
targets (logits at position t predict `targets[t]`); masks are 0/1 arrays, bool or float.
Log-softmax runs in float32 (float64 stays float64). Every mean is over masked-in
tokens or examples and is 0, never NaN, when nothing is masked in; values at masked-out
positions (padding targets such as -100 included) affect neither losses nor gradients.

Letters in array names: B batch, T length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "DPO_LOSSES",
    "chunked_token_logps",
    "dpo_loss",
    "reward_loss",
    "sequence_logps",
    "sequence_logps_from_logps",
    "sft_loss",
    "sft_loss_from_logps",
    "token_logps",
]

Array = jax.Array
Metrics = dict[str, Array]


def _float(x: Array | float) -> Array | float:
    """`x` as float32 at least (bf16/f16/ints promote; float64 and Python scalars stay)."""
    if isinstance(x, int | float):
        return float(x)
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask(mask: Array | None, like: Array) -> Array:
    """A bool mask shaped like `like` (all True when `mask` is None)."""
    if mask is None:
        return jnp.ones(like.shape, bool)
    return jnp.broadcast_to(jnp.asarray(mask) != 0, like.shape)


def _count(mask: Array) -> Array:
    """Number of True entries, float32."""
    return jnp.sum(mask, dtype=jnp.float32)


def _masked_sum(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Sum of `x` where `mask`; masked-out values (even NaN or inf) do not reach the sum."""
    return jnp.sum(jnp.where(mask, x, 0), axis=axis)


def _masked_mean(x_B: Array, mask_B: Array | None) -> Array:
    """Mean of `x_B` over entries where `mask_B` (None: all); 0 when the mask is empty."""
    mask_B = _mask(mask_B, x_B)
    return _masked_sum(x_B, mask_B) / jnp.maximum(_count(mask_B), 1.0)


# ----- token level ------------------------------------------------------------------


def token_logps(logits_BTV: Array, targets_BT: Array) -> Array:
    """log p(targets[b, t]) under softmax(logits[b, t]) [B, T], float32."""
    logps_BTV = jax.nn.log_softmax(_float(logits_BTV), axis=-1)
    return jnp.take_along_axis(logps_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def chunked_token_logps(
    hidden_BTD: Array,
    head_DV: Array,
    targets_BT: Array,
    chunk: int,
    softcap: float | None = None,
) -> tuple[Array, Array]:
    """`token_logps(hidden @ head, targets)` and whether each target is the argmax [B, T],
    computed `chunk` positions at a time so that the full `[B, T, V]` logits never exist.

    Each chunk's logits (matmul in the hidden dtype, accumulated in float32) live only
    inside a rematerialised scan step: the backward pass recomputes them chunk by chunk,
    so peak memory holds one `[B, chunk, V]` float32 block instead of the whole batch's
    logits, their log-softmax and their gradient. `softcap` caps them as the model's
    head does (Gemma's `final_logit_softcap`: `cap * tanh(logits / cap)`).
    """
    B, T, _ = hidden_BTD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    h_NBCD = hidden_BTD.reshape(B, n, chunk, -1).swapaxes(0, 1)
    y_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1).astype(jnp.int32)
    head_DV = head_DV.astype(hidden_BTD.dtype)

    @jax.checkpoint
    def one(h_BCD: Array, y_BC: Array) -> tuple[Array, Array]:
        logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, head_DV, preferred_element_type=jnp.float32)
        if softcap is not None:
            logits_BCV = softcap * jnp.tanh(logits_BCV / softcap)
        target_BC = jnp.take_along_axis(logits_BCV, y_BC[..., None], axis=-1)[..., 0]
        logps_BC = target_BC - jax.nn.logsumexp(logits_BCV, axis=-1)
        return logps_BC, jnp.argmax(logits_BCV, axis=-1) == y_BC

    logps_NBC, correct_NBC = jax.lax.map(lambda hy: one(*hy), (h_NBCD, y_NBC))
    unchunk = lambda x_NBC: x_NBC.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
    return unchunk(logps_NBC), unchunk(correct_NBC)


def sequence_logps(logits_BTV: Array, targets_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """Per-sequence sum of token log-probs over `mask_BT` [B], and masked-in counts [B] (f32)."""
    return sequence_logps_from_logps(token_logps(logits_BTV, targets_BT), mask_BT)


def sequence_logps_from_logps(logps_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """`sequence_logps` from token log-probs [B, T] already gathered."""
    mask_BT = _mask(mask_BT, logps_BT)
    return _masked_sum(logps_BT, mask_BT, axis=-1), jnp.sum(mask_BT, -1, dtype=jnp.float32)


def sft_loss(logits_BTV: Array, targets_BT: Array, mask_BT: Array) -> tuple[Array, Metrics]:
    """Mean cross entropy over masked-in tokens, and {"loss", "accuracy", "tokens"}."""
    correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return sft_loss_from_logps(token_logps(logits_BTV, targets_BT), correct_BT, mask_BT)


def sft_loss_from_logps(
    logps_BT: Array, correct_BT: Array, mask_BT: Array
) -> tuple[Array, Metrics]:
    """`sft_loss` from token log-probs [B, T] and argmax hits [B, T] (`chunked_token_logps`)."""
    mask_BT = _mask(mask_BT, logps_BT)
    tokens = _count(mask_BT)
    denom = jnp.maximum(tokens, 1.0)
    loss = -_masked_sum(logps_BT, mask_BT) / denom
    accuracy = _masked_sum(correct_BT.astype(jnp.float32), mask_BT) / denom
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": tokens}


# ----- preference pairs -------------------------------------------------------------


def _soft_bce(d_B: Array, p_B: Array | None) -> Array:
    """-(p log sigmoid(d) + (1-p) log sigmoid(-d)); plain -log sigmoid(d) when p is None."""
    if p_B is None:
        return -jax.nn.log_sigmoid(d_B)
    p_B = _float(p_B)
    return -(p_B * jax.nn.log_sigmoid(d_B) + (1 - p_B) * jax.nn.log_sigmoid(-d_B))


def _reward_stats(chosen_B: Array, rejected_B: Array, mask_B: Array) -> Metrics:
    """Mean / min / max over both rewards of masked-in pairs (0 when none)."""
    pairs = _count(mask_B)
    both = jnp.concatenate([chosen_B, rejected_B])
    both_mask = jnp.concatenate([mask_B, mask_B])
    empty = pairs == 0
    return {
        "rewards/mean": _masked_sum(both, both_mask) / jnp.maximum(2 * pairs, 1.0),
        "rewards/min": jnp.where(empty, 0.0, jnp.min(jnp.where(both_mask, both, jnp.inf))),
        "rewards/max": jnp.where(empty, 0.0, jnp.max(jnp.where(both_mask, both, -jnp.inf))),
    }


def reward_loss(
    chosen_B: Array,
    rejected_B: Array,
    *,
    margin: Array | float | None = None,
    soft_label: Array | None = None,
    center_coef: float = 0.0,
    mask_B: Array | None = None,
) -> tuple[Array, Metrics]:
    """Bradley-Terry loss on reward pairs, with optional margin, soft labels and centering.

    d = chosen - rejected - margin; loss = mean(-(p log σ(d) + (1-p) log σ(-d)))
    + center_coef * mean((chosen + rejected)^2), p = soft_label (1 when None).
    """
    chosen_B, rejected_B = _float(chosen_B), _float(rejected_B)
    mask_B = _mask(mask_B, chosen_B)
    d_B = chosen_B - rejected_B - (0.0 if margin is None else _float(margin))
    loss = _masked_mean(_soft_bce(d_B, soft_label), mask_B)
    loss = loss + center_coef * _masked_mean(jnp.square(chosen_B + rejected_B), mask_B)
    metrics = {
        "loss": loss,
        "accuracy": _masked_mean((chosen_B > rejected_B).astype(jnp.float32), mask_B),
        "margin": _masked_mean(chosen_B - rejected_B, mask_B),
        "rewards/chosen": _masked_mean(chosen_B, mask_B),
        "rewards/rejected": _masked_mean(rejected_B, mask_B),
        **_reward_stats(chosen_B, rejected_B, mask_B),
        "pairs": _count(mask_B),
    }
    return loss, metrics


# ----- DPO --------------------------------------------------------------------------
# Each loss maps the chosen / rejected log-ratios log pi - log pi_ref [B] to per-pair
# losses [B]; all take the same keyword arguments and ignore those they do not use.


def _dpo_sigmoid(chosen_B, rejected_B, *, beta, label_smoothing, soft_label, **_) -> Array:
    """-(q log σ(βh) + (1-q) log σ(-βh)), q = soft_label or 1 - label_smoothing."""
    q = 1.0 - label_smoothing if soft_label is None else soft_label
    return _soft_bce(beta * (chosen_B - rejected_B), q)


def _dpo_ipo(chosen_B, rejected_B, *, beta, chosen_counts_B, rejected_counts_B, **_) -> Array:
    """(h_norm - 1/(2β))^2 on length-normalised log-ratios (Azar et al. 2023)."""
    if chosen_counts_B is None or rejected_counts_B is None:
        raise ValueError("dpo_loss: loss_type='ipo' needs chosen_counts_B and rejected_counts_B")
    chosen_B = chosen_B / jnp.maximum(_float(chosen_counts_B), 1.0)
    rejected_B = rejected_B / jnp.maximum(_float(rejected_counts_B), 1.0)
    return jnp.square(chosen_B - rejected_B - 1 / (2 * beta))


def _dpo_hinge(chosen_B, rejected_B, *, beta, **_) -> Array:
    """relu(1 - βh) (SLiC-style hinge)."""
    return jax.nn.relu(1 - beta * (chosen_B - rejected_B))


def _dpo_robust(chosen_B, rejected_B, *, beta, label_smoothing, **_) -> Array:
    """Unbiased loss under label flips with rate e < 0.5, a Python float (Chowdhury et al. 2024)."""
    e = label_smoothing
    if e >= 0.5:
        raise ValueError(f"dpo_loss: loss_type='robust' needs label_smoothing < 0.5, got {e}")
    z_B = beta * (chosen_B - rejected_B)
    return (-(1 - e) * jax.nn.log_sigmoid(z_B) + e * jax.nn.log_sigmoid(-z_B)) / (1 - 2 * e)


DPO_LOSSES: dict[str, Callable[..., Array]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
    "robust": _dpo_robust,
}


def dpo_loss(
    policy_chosen_logps_B: Array,
    policy_rejected_logps_B: Array,
    ref_chosen_logps_B: Array,
    ref_rejected_logps_B: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    soft_label: Array | None = None,
    chosen_counts_B: Array | None = None,
    rejected_counts_B: Array | None = None,
    mask_B: Array | None = None,
) -> tuple[Array, Metrics]:
    """Direct preference optimisation loss of `loss_type` (a key of `DPO_LOSSES`), and metrics.

    Inputs are sequence log-probs [B]; the reference ones get no gradient. `soft_label` is
    used by "sigmoid" only, `label_smoothing` by "sigmoid" and "robust", counts by "ipo".
    """
    loss_fn = DPO_LOSSES.get(loss_type)
    if loss_fn is None:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; known: {sorted(DPO_LOSSES)}")
    pi_c, pi_r = _float(policy_chosen_logps_B), _float(policy_rejected_logps_B)
    ref_c = jax.lax.stop_gradient(_float(ref_chosen_logps_B))
    ref_r = jax.lax.stop_gradient(_float(ref_rejected_logps_B))
    mask_B = _mask(mask_B, pi_c)
    chosen_B, rejected_B = pi_c - ref_c, pi_r - ref_r
    losses_B = loss_fn(
        chosen_B,
        rejected_B,
        beta=beta,
        label_smoothing=label_smoothing,
        soft_label=soft_label,
        chosen_counts_B=chosen_counts_B,
        rejected_counts_B=rejected_counts_B,
    )
    loss = _masked_mean(losses_B, mask_B)
    reward_c = jax.lax.stop_gradient(beta * chosen_B)
    reward_r = jax.lax.stop_gradient(beta * rejected_B)
    metrics = {
        "loss": loss,
        "rewards/chosen": _masked_mean(reward_c, mask_B),
        "rewards/rejected": _masked_mean(reward_r, mask_B),
        "rewards/margins": _masked_mean(reward_c - reward_r, mask_B),
        "rewards/accuracies": _masked_mean((reward_c > reward_r).astype(jnp.float32), mask_B),
        "logps/chosen": _masked_mean(jax.lax.stop_gradient(pi_c), mask_B),
        "logps/rejected": _masked_mean(jax.lax.stop_gradient(pi_r), mask_B),
        "pairs": _count(mask_B),
    }
    return loss, metrics
