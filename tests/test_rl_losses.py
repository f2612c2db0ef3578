"""RL losses and advantages against their published formulas, written out independently
in numpy here: GAE on hand-made sequences, PPO's clipped policy and value losses, the
k1/k3 KL estimators, RLOO's leave-one-out baseline, GRPO's group normalisation, and a
finite-difference check of the clipped surrogate's gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import rl_losses as R


def _gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE per row, walking each row's response tokens backwards."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        running = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_value = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    returns = (adv + values) * mask
    return adv, returns


def test_gae_on_hand_made_sequences():
    # Row 0: prompt of 2 tokens then a 4-token response, reward only on the last token.
    # Row 1: a 2-token response followed by padding.
    rewards = np.array([[0, 0, 0, 0, 0, 1.0], [0, 0.5, -1.0, 0, 0, 0]], np.float32)
    values = np.array([[9, 9, 0.2, 0.4, 0.1, 0.3], [0, 0.6, -0.2, 9, 9, 9]], np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]], np.float32)
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.9, 0.0)):
        adv, ret = R.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
        want_adv, want_ret = _gae_reference(rewards, values * mask, mask, gamma, lam)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-6, atol=1e-6)
    # gamma = lam = 1: the advantage is the return-to-go minus the value.
    adv, _ = R.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
    np.testing.assert_allclose(adv[0, 2:], 1.0 - values[0, 2:], rtol=1e-6)


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (4, 7)).astype(np.float32)
    mask = (rng.random((4, 7)) > 0.3).astype(np.float32)
    out = np.asarray(R.whiten(jnp.asarray(x), jnp.asarray(mask)))
    kept = out[mask == 1]
    assert abs(kept.mean()) < 1e-5 and abs(kept.var() - 1.0) < 1e-4
    assert np.all(out[mask == 0] == 0)
    m = x[mask == 1]
    unshifted = np.asarray(R.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(unshifted[mask == 1], (m - m.mean()) / m.std() + m.mean(), rtol=1e-4)


def test_ppo_policy_and_value_losses_follow_the_clipped_formulas():
    rng = np.random.default_rng(1)
    logp = rng.normal(-2, 0.5, (3, 5)).astype(np.float32)
    old = logp + rng.normal(0, 0.3, (3, 5)).astype(np.float32)
    adv = rng.normal(0, 1, (3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], np.float32)
    clip = 0.2
    loss, m = R.ppo_policy_loss(*(jnp.asarray(a) for a in (logp, old, adv, mask)), clip)
    ratio = np.exp(logp - old)
    terms = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    on = mask == 1
    np.testing.assert_allclose(float(loss), terms[on].mean(), rtol=1e-5)
    clipped = (-adv * np.clip(ratio, 1 - clip, 1 + clip)) > (-adv * ratio)
    np.testing.assert_allclose(float(m["policy/clipfrac"]), clipped[on].mean(), rtol=1e-6)
    np.testing.assert_allclose(
        float(m["policy/approxkl"]), 0.5 * ((logp - old)[on] ** 2).mean(), rtol=1e-5
    )

    values = rng.normal(0, 1, (3, 5)).astype(np.float32)
    old_values = values + rng.normal(0, 0.5, (3, 5)).astype(np.float32)
    returns = rng.normal(0, 1, (3, 5)).astype(np.float32)
    vloss, vm = R.ppo_value_loss(
        *(jnp.asarray(a) for a in (values, old_values, returns, mask)), clip
    )
    v_clip = old_values + np.clip(values - old_values, -clip, clip)
    want = 0.5 * np.maximum((values - returns) ** 2, (v_clip - returns) ** 2)[on].mean()
    np.testing.assert_allclose(float(vloss), want, rtol=1e-5)
    frac = ((v_clip - returns) ** 2 > (values - returns) ** 2)[on].mean()
    np.testing.assert_allclose(float(vm["val/clipfrac"]), frac, rtol=1e-6)


def test_clipped_surrogate_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    logp = rng.normal(-1.5, 0.3, (2, 4))
    old = logp + rng.normal(0, 0.05, (2, 4))  # inside the clip range: a smooth region
    adv = rng.normal(0, 1, (2, 4))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float64)

    def f(x):
        ratio = np.exp(x - old)
        terms = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
        return terms[mask == 1].mean()

    grad = jax.grad(
        lambda x: R.ppo_policy_loss(x, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                                    jnp.asarray(mask, jnp.float32), 0.2)[0]
    )(jnp.asarray(logp, jnp.float32))  # fmt: skip
    h = 1e-5
    for b in range(2):
        for t in range(4):
            e = np.zeros_like(logp)
            e[b, t] = h
            numeric = (f(logp + e) - f(logp - e)) / (2 * h)
            assert abs(float(grad[b, t]) - numeric) < 1e-4, (b, t)


def test_kl_estimators():
    rng = np.random.default_rng(3)
    logp = rng.normal(-2, 0.5, 1000).astype(np.float32)
    ref = logp + rng.normal(0, 0.4, 1000).astype(np.float32)
    np.testing.assert_allclose(R.kl_k1(jnp.asarray(logp), jnp.asarray(ref)), logp - ref, rtol=1e-6)
    k3 = np.asarray(R.kl_k3(jnp.asarray(logp), jnp.asarray(ref)))
    r = ref - logp
    np.testing.assert_allclose(k3, np.exp(r) - 1 - r, rtol=1e-4, atol=1e-6)
    assert np.all(k3 >= 0)
    # Both estimate KL(p || q) without bias: with samples x ~ p and q = p shifted,
    # their means agree with the exact KL of two unit Gaussians, (mu_p - mu_q)^2 / 2.
    x = rng.normal(0.0, 1.0, 200_000)
    lp = -0.5 * x**2
    lq = -0.5 * (x - 0.5) ** 2
    exact = 0.5**2 / 2
    assert abs(float(np.mean(R.kl_k1(jnp.asarray(lp), jnp.asarray(lq)))) - exact) < 0.01
    assert abs(float(np.mean(R.kl_k3(jnp.asarray(lp), jnp.asarray(lq)))) - exact) < 0.01


def test_rloo_and_grpo_advantages():
    rewards = np.array([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]], np.float32)
    rloo = np.asarray(R.rloo_advantages(jnp.asarray(rewards)))
    for p in range(2):
        for k in range(4):
            others = np.delete(rewards[p], k).mean()
            assert abs(rloo[p, k] - (rewards[p, k] - others)) < 1e-6
    grpo = np.asarray(R.grpo_advantages(jnp.asarray(rewards)))
    for p in range(2):
        g = rewards[p]
        want = (g - g.mean()) / (g.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(grpo[p], want, rtol=1e-5, atol=1e-6)
    assert np.all(grpo[1] == 0)  # a group that agrees teaches nothing
    centred = np.asarray(R.grpo_advantages(jnp.asarray(rewards), scale=False))
    np.testing.assert_allclose(centred, rewards - rewards.mean(1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        R.rloo_advantages(jnp.ones((3, 1)))


def test_grpo_loss_is_surrogate_plus_beta_k3():
    rng = np.random.default_rng(4)
    logp = rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
    old = logp + rng.normal(0, 0.2, (4, 6)).astype(np.float32)
    ref = logp + rng.normal(0, 0.3, (4, 6)).astype(np.float32)
    adv = rng.normal(0, 1, 4).astype(np.float32)
    mask = (rng.random((4, 6)) > 0.2).astype(np.float32)
    loss, m = R.grpo_loss(*(jnp.asarray(a) for a in (logp, old, ref, adv, mask)), 0.2, 0.04)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    surrogate = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
    k3 = np.exp(ref - logp) - 1 - (ref - logp)
    on = mask == 1
    np.testing.assert_allclose(float(m["objective/kl"]), k3[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), surrogate[on].mean() + 0.04 * k3[on].mean(), rtol=1e-5)
