"""Generation with the KV cache: left-padded prefill, then one token per step.

`greedy_generate` is the first sampler: a jitted prefill and a `lax.while_loop` decode
that stops when every row has emitted `eos_id` or `max_new_tokens` are out.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxcai.model import ModelConfig, Params, forward_with_cache, init_cache

__all__ = ["greedy_generate", "left_pad"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists to one length: (tokens [B, P], segment ids [B, P], 0 = padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        segments[i, width - len(p) :] = 1
    return tokens, segments


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _greedy(
    config: ModelConfig,
    params: Params,
    tokens_BP: jax.Array,
    segments_BP: jax.Array,
    max_new_tokens: int,
    eos_id: int,
) -> jax.Array:
    B, P = tokens_BP.shape
    cache = init_cache(config, B, P + max_new_tokens)
    positions_BP = jnp.maximum(jnp.cumsum(segments_BP, axis=1) - 1, 0)
    logits, cache = forward_with_cache(
        config, params, tokens_BP, cache, segment_ids_BT=segments_BP, positions_BT=positions_BP
    )
    first_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out_BN = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)
    state = (1, first_B, positions_BP[:, -1] + 1, first_B == eos_id, out_BN, cache)

    def keep_going(state):
        step, _, _, done_B, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def decode_one(state):
        step, last_B, pos_B, done_B, out_BN, cache = state
        logits, cache = forward_with_cache(
            config, params, last_B[:, None], cache, positions_BT=pos_B[:, None]
        )
        next_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        next_B = jnp.where(done_B, eos_id, next_B)
        out_BN = out_BN.at[:, step].set(next_B)
        return step + 1, next_B, pos_B + 1, done_B | (next_B == eos_id), out_BN, cache

    return jax.lax.while_loop(keep_going, decode_one, state)[4]


def greedy_generate(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int = 0,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of id-list prompts; each stops before its first `eos_id`."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    tokens, segments = left_pad(prompts, pad_id)
    if tokens.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"max_seq_len {config.max_seq_len}"
        )
    stop = -1 if eos_id is None else eos_id
    out = np.asarray(
        _greedy(config, params, jnp.asarray(tokens), jnp.asarray(segments), max_new_tokens, stop)
    )
    results = []
    for row in out.tolist():
        results.append(row[: row.index(stop)] if stop in row else row)
    return results
