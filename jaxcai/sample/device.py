"""The compiled half of `generate`: prefill the prompts, then decode in one
`lax.while_loop` over a preallocated KV cache until every row has stopped."""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp

from jaxcai.model import KVCache, ModelConfig, Params, forward_with_cache, prefill
from jaxcai.sample.filters import sample_tokens

__all__ = [
    "LENGTH", "RUNNING", "STOP_ID", "STOP_REASONS", "STOP_STRING", "DecodeRules", "pick",
]  # fmt: skip

STOP_REASONS = ("running", "stop_id", "stop_string", "length")
RUNNING, STOP_ID, STOP_STRING, LENGTH = range(4)


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # [] tokens generated so far
    last_B: jax.Array  # the newest token of each row
    pos_B: jax.Array  # its position
    reason_B: jax.Array  # 0 while running, else why the row stopped
    tokens_BN: jax.Array
    logps_BN: jax.Array
    keys_B: jax.Array  # [B, 2] uint32 raw keys, one stream per row
    budget_B: jax.Array  # the most tokens each row may generate
    cache: KVCache


@flax.struct.dataclass
class DecodeRules:
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_ids: jax.Array  # [S] (-1 = unused slot)
    # [] ids >= this are never sampled: a model's embedding table may have more rows than
    # its tokenizer has tokens (padded vocabularies), and those ids have no text
    vocab: jax.Array | None = None


def pick(logits_BV, state_keys_B, step, rules: DecodeRules):
    """Each row's next token and its log-prob; the row's key is folded with `step` (the
    tokens it has generated so far: a scalar, or one per row)."""
    steps_B = jnp.broadcast_to(step, state_keys_B.shape[:1])
    fold = lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s)  # noqa: E731
    keys = jax.vmap(fold)(state_keys_B, steps_B)
    allowed_BV = logits_BV
    if rules.vocab is not None:
        allowed_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < rules.vocab, logits_BV, -jnp.inf)
    token_B = sample_tokens(allowed_BV, keys, rules.temperature, rules.top_k, rules.top_p)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, -1), token_B[:, None], -1)[:, 0]
    return token_B, logp_B


def _record(state: DecodeState, token_B, logp_B, rules: DecodeRules) -> DecodeState:
    running_B = state.reason_B == RUNNING
    stopped_B = running_B & jnp.isin(token_B, rules.stop_ids)
    step = state.step + 1
    full_B = running_B & ~stopped_B & (step >= state.budget_B)
    reason_B = jnp.where(stopped_B, STOP_ID, jnp.where(full_B, LENGTH, state.reason_B))
    return state.replace(
        step=step,
        last_B=token_B,
        pos_B=state.pos_B + 1,
        reason_B=reason_B,
        tokens_BN=state.tokens_BN.at[:, state.step].set(token_B),
        logps_BN=state.logps_BN.at[:, state.step].set(logp_B),
    )


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def prefill_step(
    config: ModelConfig,
    params: Params,
    tokens_BP: jax.Array,
    segments_BP: jax.Array,
    keys_B: jax.Array,
    live_B: jax.Array,
    budget_B: jax.Array,
    rules: DecodeRules,
    max_new_tokens: int,
) -> DecodeState:
    """Run the prompts, pick each row's first token. Rows with `live_B` false (batch
    filler) start stopped, so they never keep the decode loop going; a row stops after
    `budget_B` tokens (at most `max_new_tokens`, the buffers' width)."""
    B, P = tokens_BP.shape
    positions_BP = jnp.maximum(jnp.cumsum(segments_BP, axis=1) - 1, 0)
    logits, cache = prefill(
        config,
        params,
        tokens_BP,
        P + max_new_tokens,
        segment_ids_BT=segments_BP,
        positions_BT=positions_BP,
    )
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        last_B=jnp.zeros((B,), jnp.int32),
        pos_B=positions_BP[:, -1],
        reason_B=jnp.where(live_B, RUNNING, LENGTH).astype(jnp.int32),
        tokens_BN=jnp.zeros((B, max_new_tokens), jnp.int32),
        logps_BN=jnp.zeros((B, max_new_tokens), jnp.float32),
        keys_B=keys_B,
        budget_B=budget_B,
        cache=cache,
    )
    token_B, logp_B = pick(logits[:, -1], keys_B, 0, rules)
    return _record(state, token_B, logp_B, rules)


@partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def decode_steps(
    config: ModelConfig, params: Params, state: DecodeState, until: jax.Array, rules: DecodeRules
) -> DecodeState:
    """Decode until every row stopped or `until` tokens are out."""

    def keep_going(s: DecodeState):
        return (s.step < until) & jnp.any(s.reason_B == RUNNING)

    def one(s: DecodeState) -> DecodeState:
        logits, cache = forward_with_cache(
            config, params, s.last_B[:, None], s.cache, positions_BT=s.pos_B[:, None]
        )
        token_B, logp_B = pick(logits[:, -1], s.keys_B, s.step, rules)
        return _record(s.replace(cache=cache), token_B, logp_B, rules)

    return jax.lax.while_loop(keep_going, one, state)
