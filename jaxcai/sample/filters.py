"""Sampling rules as pure functions: top-k / top-p filtering and one token per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["filter_logits", "sample_tokens"]


def filter_logits(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with every token outside the top-k, then outside the top-p nucleus, set to
    `-inf`. `top_k = 0` and `top_p >= 1` switch a filter off. The nucleus is the smallest
    set of most likely tokens whose probability reaches `top_p` (the token that crosses
    it is kept); tokens tied with the last kept one are kept too."""
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B1 = jnp.take_along_axis(
        sorted_BV, jnp.broadcast_to(k - 1, sorted_BV.shape[:-1] + (1,)), -1
    )
    sorted_BV = jnp.where(jnp.arange(V) < k, sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (mass_before_BV < top_p) | (top_p >= 1.0)
    n_keep_B1 = jnp.maximum(jnp.sum(keep_BV & (sorted_BV > -jnp.inf), -1, keepdims=True), 1)
    pth_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    threshold_B1 = jnp.maximum(kth_B1, pth_B1)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def sample_tokens(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token per row: argmax when `temperature == 0`, else a draw from the
    temperature-scaled, top-k/top-p-filtered distribution with each row's own key."""
    greedy_B = jnp.argmax(logits_BV, axis=-1)

    def draw(_):
        scaled = logits_BV / jnp.maximum(temperature, 1e-6)
        filtered = jax.lax.cond(
            (top_k > 0) | (top_p < 1.0),
            lambda x: filter_logits(x, top_k, top_p),
            lambda x: x,
            scaled,
        )
        return jax.vmap(jax.random.categorical)(keys_B, filtered)

    sampled_B = jax.lax.cond(temperature > 0, draw, lambda _: greedy_B, None)
    return sampled_B.astype(jnp.int32)
