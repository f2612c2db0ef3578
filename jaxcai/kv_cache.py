"""The KV cache: its layout (`KVCache`), an empty one (`init_cache`), writing the new
tokens' keys and values into it, and the two passes that use it: `prefill` (prompts into
a new cache) and `forward_with_cache` (new tokens against the cache, decoding with T = 1).

Array names carry their shapes in the letters of the axis glossary in `jaxcai.model`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxcai.attention import segments_and_positions
from jaxcai.decoder import Decoder, kind_masks
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import constrain

__all__ = ["KVCache", "forward_with_cache", "init_cache", "prefill"]

Array = jax.Array
Params = Any


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: `[L, B, K, S, H]` arrays with `scan_layers`, else
    tuples of L `[B, K, S, H]` arrays (each layer its own buffer, which decoding reads
    without slicing). Heads come before slots, so attention reads each head's keys as one
    contiguous matrix. `index` is the next slot to write."""

    k: Array
    v: Array
    segment_ids: Array  # [B, S], 0 marks empty slots and padding
    index: Array  # [] int32

    @property
    def max_len(self) -> int:
        return (self.k[0] if isinstance(self.k, tuple) else self.k).shape[-2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (compute dtype by default)."""
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    dtype = config.jnp_dtype if dtype is None else dtype
    if config.scan_layers:
        k = jnp.zeros((config.n_layers, *shape), dtype)
        v = jnp.zeros((config.n_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(
        k=k,
        v=v,
        segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def _write_cache(cache: KVCache, k_LBTKH: Array, v_LBTKH: Array, seg_BT: Array) -> KVCache:
    """The cache with the new tokens' keys and values written at `cache.index` (in place
    when the cache is a donated buffer or a loop carry)."""
    names = ("layers", "batch", "kv_heads", "cache_length", "head_dim")

    def write(old, new_LBTKH):
        new_LBKTH = new_LBTKH.transpose(0, 1, 3, 2, 4)
        if isinstance(old, tuple):
            return tuple(
                constrain(
                    jax.lax.dynamic_update_slice(
                        layer, new_LBKTH[i].astype(layer.dtype), (0, 0, cache.index, 0)
                    ),
                    names[1:],
                )
                for i, layer in enumerate(old)
            )
        start = (0, 0, 0, cache.index, 0)
        return constrain(
            jax.lax.dynamic_update_slice(old, new_LBKTH.astype(old.dtype), start), names
        )

    k, v = write(cache.k, k_LBTKH), write(cache.v, v_LBTKH)
    seg = jax.lax.dynamic_update_slice(
        cache.segment_ids, seg_BT.astype(jnp.int32), (0, cache.index)
    )
    return KVCache(k=k, v=v, segment_ids=seg, index=cache.index + seg_BT.shape[1])


def prefill(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    max_len: int,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
) -> tuple[Array, KVCache]:
    """Run a batch of prompts into a new cache of `max_len` slots: the same logits as
    `forward`, plus the cache (the prompts occupy slots `0 ... T - 1`)."""
    B, T = tokens_BT.shape
    segment_ids_BT, positions_BT = segments_and_positions(tokens_BT, segment_ids_BT, positions_BT)
    slots_T = jnp.arange(T, dtype=jnp.int32)
    masks = kind_masks(config, slots_T, slots_T, segment_ids_BT, segment_ids_BT)
    logits, (k, v) = Decoder(config, "lm", return_kv=True).apply(
        {"params": params}, tokens_BT, positions_BT, masks
    )
    return logits, _write_cache(init_cache(config, B, max_len), k, v, segment_ids_BT)


def forward_with_cache(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    cache: KVCache,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
) -> tuple[Array, KVCache]:
    """Run T new tokens against the cache (a prompt chunk with T > 1, decode with T = 1).

    The tokens attend to every earlier slot of their own segment and to each other
    causally, then are written at slots `cache.index ... cache.index + T - 1`.
    `positions_BT` defaults to the slot index; left-padded prompts should pass positions
    counted from their first real token. The caller keeps `cache.index + T <=
    cache.max_len` (past it, writes are clamped).
    """
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    q_slots_T = cache.index + jnp.arange(T, dtype=jnp.int32)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(q_slots_T, (B, T))
    masks_new = kind_masks(config, q_slots_T, q_slots_T, segment_ids_BT, segment_ids_BT)
    kv_slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
    written_S = kv_slots_S < cache.index  # slots written earlier
    masks_old = tuple(
        mask & written_S[None, None, None, :]
        for mask in kind_masks(config, q_slots_T, kv_slots_S, segment_ids_BT, cache.segment_ids)
    )
    logits, (k, v) = Decoder(config, "lm", return_kv=True).apply(
        {"params": params}, tokens_BT, positions_BT, masks_new, (cache.k, cache.v), masks_old
    )
    return logits, _write_cache(cache, k, v, segment_ids_BT)
