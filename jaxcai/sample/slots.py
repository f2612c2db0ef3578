"""The compiled half of continuous batching: a batch of B slots over one KV cache whose
rows each keep their own length, a program that prefills waiting prompts into free slots,
and a decode loop that stops for the host as soon as enough slots are free to refill.

A slot's prompt sits at cache slots `0 ... length - 1` (right-padded to its bucket, the
padding never read), positions counted from 0, so a row's position is its cache index.
Decode steps read only the first `window` slots of the cache (a static length bucket of
the longest running row), not the whole preallocated cache.
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp

from jaxcai.kv_cache import forward_with_cache, init_cache, prefill_rows
from jaxcai.model import KVCache, ModelConfig, Params
from jaxcai.sample.device import LENGTH, RUNNING, STOP_ID, DecodeRules, pick
from jaxcai.sharding import constrain

__all__ = ["SlotState", "decode_slots", "empty_slots", "fill_slots"]

_CACHE_NAMES = ("batch", "kv_heads", "cache_length", "head_dim")


@flax.struct.dataclass
class SlotState:
    steps_B: jax.Array  # tokens each slot's sequence has generated
    last_B: jax.Array  # its newest token (written to the cache at the next step)
    reason_B: jax.Array  # RUNNING, else why it stopped (free slots read as stopped)
    tokens_BN: jax.Array
    logps_BN: jax.Array
    keys_B: jax.Array  # [B, 2] uint32 raw keys, one stream per sequence
    budget_B: jax.Array  # the most tokens each sequence may generate
    cache: KVCache  # index [B]: each row's filled length, also its next position


@partial(jax.jit, static_argnames=("config", "batch", "max_new_tokens", "cache_len"))
def empty_slots(config: ModelConfig, batch: int, max_new_tokens: int, cache_len: int) -> SlotState:
    """B free slots over an empty cache of `cache_len` slots per row."""
    cache = init_cache(config, batch, cache_len)
    names = _CACHE_NAMES if isinstance(cache.k, tuple) else ("layers", *_CACHE_NAMES)
    shard = lambda kv: jax.tree_util.tree_map(lambda a: constrain(a, names), kv)  # noqa: E731
    zeros_B = lambda: constrain(jnp.zeros((batch,), jnp.int32), ("batch",))  # noqa: E731
    cache = cache.replace(k=shard(cache.k), v=shard(cache.v), index=zeros_B())
    return SlotState(
        steps_B=zeros_B(),
        last_B=zeros_B(),
        reason_B=zeros_B() + LENGTH,
        tokens_BN=constrain(jnp.zeros((batch, max_new_tokens), jnp.int32), ("batch", None)),
        logps_BN=constrain(jnp.zeros((batch, max_new_tokens), jnp.float32), ("batch", None)),
        keys_B=jnp.zeros((batch, 2), jnp.uint32),
        budget_B=zeros_B(),
        cache=cache,
    )


def _stop_reason(token_B, steps_B, budget_B, rules: DecodeRules):
    """STOP_ID, LENGTH or RUNNING for sequences that just generated `token_B`."""
    stopped_B = jnp.isin(token_B, rules.stop_ids)
    return jnp.where(stopped_B, STOP_ID, jnp.where(steps_B >= budget_B, LENGTH, RUNNING))


@partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def fill_slots(
    config: ModelConfig,
    params: Params,
    state: SlotState,
    tokens_RP: jax.Array,
    lengths_R: jax.Array,
    rows_R: jax.Array,
    keys_R: jax.Array,
    budget_R: jax.Array,
    rules: DecodeRules,
) -> SlotState:
    """Prefill R right-padded prompts into slots `rows_R` and pick each one's first token
    (a row of `rows_R` past the batch is filler: it changes nothing)."""
    logits, cache = prefill_rows(config, params, state.cache, tokens_RP, lengths_R, rows_R)
    last_RV = jnp.take_along_axis(logits, (lengths_R - 1)[:, None, None], axis=1)[:, 0]
    token_R, logp_R = pick(last_RV, keys_R, 0, rules)
    ones_R = jnp.ones_like(lengths_R)
    put = lambda a, v: a.at[rows_R].set(v.astype(a.dtype), mode="drop")  # noqa: E731
    return state.replace(
        steps_B=put(state.steps_B, ones_R),
        last_B=put(state.last_B, token_R),
        reason_B=put(state.reason_B, _stop_reason(token_R, ones_R, budget_R, rules)),
        tokens_BN=state.tokens_BN.at[rows_R, 0].set(token_R, mode="drop"),
        logps_BN=state.logps_BN.at[rows_R, 0].set(logp_R, mode="drop"),
        keys_B=put(state.keys_B, keys_R),
        budget_B=put(state.budget_B, budget_R),
        cache=cache,
    )


def _step(config: ModelConfig, params: Params, s: SlotState, rules, window: int) -> SlotState:
    """One token for every running slot; stopped slots compute but change nothing."""
    B, N = s.tokens_BN.shape
    running_B = s.reason_B == RUNNING
    index_B = s.cache.index
    logits, cache = forward_with_cache(
        config, params, s.last_B[:, None], s.cache, positions_BT=index_B[:, None], window=window
    )
    cache = cache.replace(index=jnp.where(running_B, cache.index, index_B))
    token_B, logp_B = pick(logits[:, -1], s.keys_B, s.steps_B, rules)
    col_B = jnp.where(running_B, s.steps_B, N)  # out of bounds: dropped
    rows_B = jnp.arange(B)
    steps_B = s.steps_B + running_B
    reason_B = _stop_reason(token_B, steps_B, s.budget_B, rules)
    return s.replace(
        steps_B=steps_B,
        last_B=jnp.where(running_B, token_B, s.last_B),
        reason_B=jnp.where(running_B, reason_B, s.reason_B),
        tokens_BN=s.tokens_BN.at[rows_B, col_B].set(token_B, mode="drop"),
        logps_BN=s.logps_BN.at[rows_B, col_B].set(logp_B, mode="drop"),
        cache=cache,
    )


@partial(jax.jit, static_argnames=("config", "window"), donate_argnames=("state",))
def decode_slots(
    config: ModelConfig,
    params: Params,
    state: SlotState,
    rules: DecodeRules,
    refill_at: jax.Array,
    max_steps: jax.Array,
    window: int,
) -> SlotState:
    """Decode until no slot runs, `refill_at` slots are free, `max_steps` steps are done,
    or a running row's cache outgrows `window` (the host then picks the next bucket)."""
    B = state.reason_B.shape[0]

    def keep_going(carry) -> jax.Array:
        s, i = carry
        running_B = s.reason_B == RUNNING
        fits = jnp.all(~running_B | (s.cache.index <= window))
        return running_B.any() & fits & (B - running_B.sum() < refill_at) & (i < max_steps)

    def one(carry):
        s, i = carry
        return _step(config, params, s, rules, window), i + 1

    return jax.lax.while_loop(keep_going, one, (state, jnp.zeros((), jnp.int32)))[0]
