"""Losses against independent float64 numpy formulas; gradients against finite differences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import losses as L

TOL = dict(rtol=1e-5, atol=1e-5)
LOGITS_SHAPES = [(2, 5, 7), (3, 1, 11), (4, 6, 3)]
DPO_TYPES = ["sigmoid", "ipo", "hinge", "robust"]
B = 6  # pairs per batch: one shape keeps eager dispatch caches warm


# ----- numpy references (float64) ---------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    top = x.max(-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_mean(x, m):
    return float(x[m].mean()) if m.any() else 0.0


def np_token_logps(logits, targets):
    return np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]


def np_reward(c, r, margin=None, p=None, center=0.0, mask=None):
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    m = np.ones(c.shape, bool) if mask is None else np.asarray(mask) != 0
    d = c - r - (0.0 if margin is None else margin)
    if p is None:
        per = -np_log_sigmoid(d)
    else:
        per = -(p * np_log_sigmoid(d) + (1 - p) * np_log_sigmoid(-d))
    loss = np_mean(per, m) + center * np_mean((c + r) ** 2, m)
    both = np.concatenate([c[m], r[m]])
    metrics = {
        "loss": loss,
        "accuracy": np_mean((c > r).astype(float), m),
        "margin": np_mean(c - r, m),
        "rewards/chosen": np_mean(c, m),
        "rewards/rejected": np_mean(r, m),
        "rewards/mean": both.mean() if both.size else 0.0,
        "rewards/min": both.min() if both.size else 0.0,
        "rewards/max": both.max() if both.size else 0.0,
        "pairs": m.sum(),
    }
    return loss, metrics


def np_dpo(pc, pr, rc, rr, beta, loss_type, e=0.0, p=None, cc=None, rcnt=None, mask=None):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    m = np.ones(pc.shape, bool) if mask is None else np.asarray(mask) != 0
    z = beta * ((pc - rc) - (pr - rr))
    if loss_type == "sigmoid":
        q = 1 - e if p is None else p
        per = -(q * np_log_sigmoid(z) + (1 - q) * np_log_sigmoid(-z))
    elif loss_type == "ipo":
        per = ((pc - rc) / cc - (pr - rr) / rcnt - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        per = np.maximum(0.0, 1 - z)
    else:
        per = (-(1 - e) * np_log_sigmoid(z) + e * np_log_sigmoid(-z)) / (1 - 2 * e)
    wc, wr = beta * (pc - rc), beta * (pr - rr)
    metrics = {
        "loss": np_mean(per, m),
        "rewards/chosen": np_mean(wc, m),
        "rewards/rejected": np_mean(wr, m),
        "rewards/margins": np_mean(wc - wr, m),
        "rewards/accuracies": np_mean((wc > wr).astype(float), m),
        "logps/chosen": np_mean(pc, m),
        "logps/rejected": np_mean(pr, m),
        "pairs": m.sum(),
    }
    return metrics["loss"], metrics


def assert_metrics(got, want, tol=TOL):
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(got[k]), v, err_msg=k, **tol)
        assert got[k].shape == ()


# ----- inputs ------------------------------------------------------------------------


def lm_batch(rng, shape, dtype=np.float32):
    b, t, v = shape
    logits = (3 * rng.standard_normal(shape)).astype(dtype)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.7
    mask[0, -1] = True  # at least one token
    if b > 2:
        mask[-1] = False  # an all-masked row
    return logits, targets, mask


def pairs(rng, b, dpo=False):
    if dpo:  # sequence log-probs, plausible scale
        return [-rng.uniform(5, 40, b) for _ in range(4)]
    return [rng.standard_normal(b) for _ in range(2)]


def x64(fn):
    """Run the test body with 64-bit types enabled, only for that test."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapped


def finite_diff(f, xs, eps=1e-6):
    """Central differences of scalar `f(*xs)` w.r.t. each float64 array in `xs`."""
    f, grads = jax.jit(f), []
    for i, x in enumerate(xs):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            hi, lo = [a.copy() for a in xs], [a.copy() for a in xs]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            g[idx] = (float(f(*hi)) - float(f(*lo))) / (2 * eps)
        grads.append(g)
    return grads


# ----- token level ------------------------------------------------------------------


@pytest.mark.parametrize("shape", LOGITS_SHAPES)
def test_token_and_sequence_logps(rng, shape):
    logits, targets, mask = lm_batch(rng, shape)
    want = np_token_logps(logits, targets)
    got = L.token_logps(logits, targets)
    assert got.dtype == jnp.float32 and got.shape == shape[:2]
    np.testing.assert_allclose(got, want, **TOL)

    for m in (mask, mask.astype(np.float32)):
        logps, counts = L.sequence_logps(logits, targets, m)
        assert logps.dtype == counts.dtype == jnp.float32
        np.testing.assert_allclose(logps, (want * mask).sum(-1), **TOL)
        np.testing.assert_array_equal(counts, mask.sum(-1))
    if shape[0] > 2:
        assert float(logps[-1]) == 0.0 and float(counts[-1]) == 0.0


@pytest.mark.parametrize("shape", LOGITS_SHAPES)
def test_sft_loss(rng, shape):
    logits, targets, mask = lm_batch(rng, shape)
    targets[0, 0] = logits[0, 0].argmax()  # at least one correct prediction
    mask[0, 0] = True
    nll = -np_token_logps(logits, targets)
    loss, metrics = L.sft_loss(logits, targets, mask)
    want = {
        "loss": nll[mask].mean(),
        "accuracy": (logits.argmax(-1) == targets)[mask].mean(),
        "tokens": mask.sum(),
    }
    assert_metrics(metrics, want)
    assert loss == metrics["loss"] and metrics["tokens"].dtype == jnp.float32


def test_masked_out_padding_targets_are_harmless(rng):
    logits, targets, mask = lm_batch(rng, LOGITS_SHAPES[2])
    padded = np.where(mask, targets, -100).astype(np.int32)
    for fn in (L.sequence_logps, L.sft_loss):
        np.testing.assert_allclose(fn(logits, padded, mask)[0], fn(logits, targets, mask)[0])
    g = jax.grad(lambda x: L.sft_loss(x, padded, mask)[0])(logits)
    assert np.isfinite(g).all() and not np.asarray(g)[~mask].any()


def test_sft_empty_mask_is_zero_not_nan(rng):
    logits, targets, _ = lm_batch(rng, LOGITS_SHAPES[0])
    mask = np.zeros(targets.shape, bool)
    loss, metrics = L.sft_loss(logits, targets, mask)
    assert float(loss) == 0.0 and float(metrics["accuracy"]) == 0.0
    assert float(metrics["tokens"]) == 0.0
    g = jax.grad(lambda x: L.sft_loss(x, targets, mask)[0])(logits)
    assert np.isfinite(g).all() and not np.asarray(g).any()


def test_bf16_logits(rng):
    logits, targets, mask = lm_batch(rng, LOGITS_SHAPES[0])
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    exact = np.asarray(logits_bf16.astype(jnp.float32))
    logps = L.token_logps(logits_bf16, targets)
    assert logps.dtype == jnp.float32
    np.testing.assert_allclose(logps, np_token_logps(exact, targets), **TOL)
    seq, counts = L.sequence_logps(logits_bf16, targets, mask)
    assert seq.dtype == counts.dtype == jnp.float32
    loss, metrics = L.sft_loss(logits_bf16, targets, mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, -np_token_logps(exact, targets)[mask].mean(), **TOL)


# ----- reward model -----------------------------------------------------------------


REWARD_CASES = {
    "plain": {},
    "scalar_margin": dict(margin=0.7),
    "example_margin": dict(margin="B"),
    "soft_label": dict(soft_label="B"),
    "center": dict(center_coef=0.3),
    "mask": dict(mask_B="B"),
    "all": dict(margin="B", soft_label="B", center_coef=0.1, mask_B="B"),
}


def reward_kwargs(rng, b, case):
    kwargs = dict(REWARD_CASES[case])
    if kwargs.get("margin") == "B":
        kwargs["margin"] = rng.uniform(0, 1, b)
    if kwargs.get("soft_label") == "B":
        kwargs["soft_label"] = rng.uniform(0, 1, b)
    if kwargs.get("mask_B") == "B":
        kwargs["mask_B"] = np.arange(b) % 3 != 1
    return kwargs


@pytest.mark.parametrize("b", [1, B])
@pytest.mark.parametrize("case", list(REWARD_CASES))
def test_reward_loss(rng, case, b):
    c, r = pairs(rng, b)
    kwargs = reward_kwargs(rng, b, case)
    np_kwargs = dict(
        margin=kwargs.get("margin"),
        p=kwargs.get("soft_label"),
        center=kwargs.get("center_coef", 0.0),
        mask=kwargs.get("mask_B"),
    )
    want_loss, want = np_reward(c, r, **np_kwargs)
    loss, metrics = L.reward_loss(c.astype(np.float32), r.astype(np.float32), **kwargs)
    assert_metrics(metrics, want)
    np.testing.assert_allclose(loss, want_loss, **TOL)


def test_reward_mask_excludes_examples(rng):
    c, r = pairs(rng, B)
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    garbage_c, garbage_r = c.copy(), r.copy()
    garbage_c[mask == 0], garbage_r[mask == 0] = 1e3, -1e3
    full = L.reward_loss(c[mask == 1], r[mask == 1])
    masked = L.reward_loss(garbage_c, garbage_r, mask_B=mask, center_coef=0.0)
    assert_metrics(masked[1], {k: np.asarray(v) for k, v in full[1].items()})
    empty = L.reward_loss(c, r, mask_B=np.zeros(B), center_coef=1.0)
    assert_metrics(empty[1], {k: 0.0 for k in full[1]})


def test_reward_soft_label_limits(rng):
    c, r = pairs(rng, B)
    plain = L.reward_loss(c, r, margin=0.2)[0]
    np.testing.assert_allclose(L.reward_loss(c, r, margin=0.2, soft_label=np.ones(B))[0], plain)
    half = np.full(B, 0.5)
    np.testing.assert_allclose(
        L.reward_loss(c, r, soft_label=half)[0], L.reward_loss(r, c, soft_label=half)[0], **TOL
    )


# ----- DPO ----------------------------------------------------------------------------


def dpo_kwargs(rng, b, loss_type):
    kwargs = dict(beta=0.1, loss_type=loss_type)
    if loss_type == "ipo":
        kwargs.update(
            chosen_counts_B=rng.integers(1, 30, b), rejected_counts_B=rng.integers(1, 30, b)
        )
    if loss_type == "robust":
        kwargs["label_smoothing"] = 0.2
    if loss_type == "sigmoid":
        kwargs["label_smoothing"] = 0.1
    return kwargs


def np_dpo_call(logps, kwargs, soft_label=None, mask=None):
    return np_dpo(
        *logps,
        kwargs["beta"],
        kwargs["loss_type"],
        e=kwargs.get("label_smoothing", 0.0),
        p=soft_label,
        cc=kwargs.get("chosen_counts_B"),
        rcnt=kwargs.get("rejected_counts_B"),
        mask=mask,
    )


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss(rng, loss_type, masked):
    b = B
    logps = pairs(rng, b, dpo=True)
    kwargs = dpo_kwargs(rng, b, loss_type)
    mask = (np.arange(b) % 4 != 2).astype(np.float32) if masked else None
    want_loss, want = np_dpo_call(logps, kwargs, mask=mask)
    loss, metrics = L.dpo_loss(*[x.astype(np.float32) for x in logps], mask_B=mask, **kwargs)
    assert_metrics(metrics, want, tol=dict(rtol=1e-5, atol=1e-4))  # logps ~ 40 in float32
    np.testing.assert_allclose(loss, want_loss, **TOL)


def test_dpo_sigmoid_soft_labels(rng):
    logps = pairs(rng, B, dpo=True)
    p = rng.uniform(0, 1, B)
    want_loss, _ = np_dpo(*logps, 0.5, "sigmoid", p=p)
    np.testing.assert_allclose(L.dpo_loss(*logps, beta=0.5, soft_label=p)[0], want_loss, **TOL)
    standard = L.dpo_loss(*logps, beta=0.5)[0]
    np.testing.assert_allclose(L.dpo_loss(*logps, beta=0.5, soft_label=np.ones(B))[0], standard)
    for e in (0.0, 0.1, 0.3):
        smoothed = L.dpo_loss(*logps, beta=0.5, label_smoothing=e)[0]
        soft = L.dpo_loss(*logps, beta=0.5, soft_label=np.full(B, 1 - e))[0]
        np.testing.assert_allclose(smoothed, soft, **TOL)


def test_dpo_robust_without_noise_is_standard(rng):
    logps = pairs(rng, B, dpo=True)
    np.testing.assert_allclose(
        L.dpo_loss(*logps, beta=0.3, loss_type="robust")[0], L.dpo_loss(*logps, beta=0.3)[0]
    )


def test_dpo_empty_mask(rng):
    logps = pairs(rng, B, dpo=True)
    loss, metrics = L.dpo_loss(*logps, beta=0.1, mask_B=np.zeros(B, bool))
    assert all(float(v) == 0.0 for v in metrics.values()) and float(loss) == 0.0


def test_dpo_errors(rng):
    logps = pairs(rng, B, dpo=True)
    with pytest.raises(ValueError, match="counts"):
        L.dpo_loss(*logps, beta=0.1, loss_type="ipo", chosen_counts_B=np.ones(B))
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(*logps, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="'kto_pair'.*hinge.*ipo.*robust.*sigmoid"):
        L.dpo_loss(*logps, beta=0.1, loss_type="kto_pair")
    assert set(L.DPO_LOSSES) == set(DPO_TYPES)


# ----- gradients (float64 finite differences) -----------------------------------------


@x64
def test_sft_grad(rng):
    logits, targets, mask = lm_batch(rng, (2, 3, 4), np.float64)
    f = lambda x: L.sft_loss(x, targets, mask)[0]
    g = jax.grad(f)(logits)
    assert g.dtype == jnp.float64
    np.testing.assert_allclose(g, finite_diff(f, [logits])[0], rtol=1e-6, atol=1e-8)


@x64
def test_reward_grad(rng):
    b = B
    c, r = pairs(rng, b)
    kwargs = dict(
        margin=rng.uniform(0, 1, b),
        soft_label=rng.uniform(0, 1, b),
        center_coef=0.25,
        mask_B=np.array([1, 1, 0, 1, 1, 0]),
    )
    f = lambda c, r: L.reward_loss(c, r, **kwargs)[0]
    got = jax.grad(f, argnums=(0, 1))(c, r)
    for g, want in zip(got, finite_diff(f, [c, r]), strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-8)
    assert got[0][2] == 0.0 and got[1][2] == 0.0


@x64
@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_grad(rng, loss_type):
    b = B
    logps = pairs(rng, b, dpo=True)
    kwargs = dpo_kwargs(rng, b, loss_type)
    kwargs["beta"] = 0.01 if loss_type == "hinge" else 0.5  # hinge: stay below the kink
    if loss_type == "sigmoid":
        kwargs["soft_label"] = rng.uniform(0, 1, b)
    kwargs["mask_B"] = np.array([True, True, False, True, True, False])
    f = lambda *xs: L.dpo_loss(*xs, **kwargs)[0]
    got = jax.grad(f, argnums=(0, 1, 2, 3))(*logps)
    want = finite_diff(lambda pc, pr: f(pc, pr, *logps[2:]), logps[:2])
    for g, w in zip(got[:2], want, strict=True):
        assert np.abs(w).max() > 1e-3  # a meaningful gradient (hinge not saturated)
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8)
    assert not np.asarray(got[2]).any() and not np.asarray(got[3]).any()


# ----- jit ----------------------------------------------------------------------------


def test_everything_under_jit(rng):
    logits, targets, mask = lm_batch(rng, LOGITS_SHAPES[2])
    for fn in (L.sequence_logps, L.sft_loss):
        eager, jitted = fn(logits, targets, mask), jax.jit(fn)(logits, targets, mask)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), eager, jitted)
    np.testing.assert_allclose(
        jax.jit(L.token_logps)(logits, targets), L.token_logps(logits, targets)
    )

    c, r = pairs(rng, B)
    kwargs = reward_kwargs(rng, B, "all")
    jitted = jax.jit(lambda c, r, kw: L.reward_loss(c, r, **kw))(c, r, kwargs)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **TOL), L.reward_loss(c, r, **kwargs), jitted
    )

    logps = pairs(rng, B, dpo=True)
    mask_B = np.arange(B) % 2 == 0
    for loss_type in DPO_TYPES:
        kwargs = dpo_kwargs(rng, B, loss_type)
        static = {k: kwargs.pop(k) for k in ("loss_type", "label_smoothing") if k in kwargs}
        fn = jax.jit(lambda *xs, kw, static=static: L.dpo_loss(*xs, **kw, **static))
        jitted = fn(*logps, kw=dict(kwargs, mask_B=mask_B))
        eager = L.dpo_loss(*logps, mask_B=mask_B, **kwargs, **static)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), eager, jitted)
        grads = jax.jit(jax.grad(lambda *xs, kw=kwargs, st=static: L.dpo_loss(*xs, **kw, **st)[0]))(
            *logps
        )
        assert np.isfinite(grads).all()


# ----- chunked logits ---------------------------------------------------------------


@pytest.mark.parametrize("T,chunk", [(7, 3), (8, 4), (5, 16), (6, 1)])
def test_chunked_token_logps_matches_full_logits(rng, T, chunk):
    B, D, V = 3, 5, 11
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T))
    targets[0, -1] = -100  # a padding target: any value, masked later
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), head)
    logps, correct = L.chunked_token_logps(hidden, head, targets, chunk)
    keep = targets >= 0
    want = np_token_logps(logits, np.where(keep, targets, 0))
    np.testing.assert_allclose(np.asarray(logps)[keep], want[keep], **TOL)
    np.testing.assert_array_equal(np.asarray(correct)[keep], (logits.argmax(-1) == targets)[keep])

    # Gradients of a masked sum through the rematerialised chunks equal the full path's.
    w = rng.normal(size=(B, T)).astype(np.float32) * keep

    def full(h, k):
        return jnp.sum(w * L.token_logps(jnp.einsum("btd,dv->btv", h, k), targets))

    def chunked(h, k):
        return jnp.sum(w * L.chunked_token_logps(h, k, targets, chunk)[0])

    g_full = jax.grad(full, argnums=(0, 1))(hidden, head)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    for a, b in zip(g_full, g_chunk, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_token_logps_in_bf16_matches_full_logits(rng):
    hidden = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.bfloat16)
    head = jnp.asarray(rng.normal(size=(8, 13)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 13, (2, 6)))
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    logps, _ = L.chunked_token_logps(hidden, head, targets, 4)
    assert logps.dtype == jnp.float32
    np.testing.assert_allclose(logps, L.token_logps(logits, targets), rtol=1e-5, atol=1e-5)
