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

__all__ = ["KVCache", "forward_with_cache", "init_cache", "prefill", "prefill_rows"]

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
    when the cache is a donated buffer or a loop carry). With a per-row index `[B]`, each
    row writes at its own slot (a scatter) and advances its own index."""
    names = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
    per_row = cache.index.ndim == 1

    def put(layer_BKSH, new_BKTH):
        new_BKTH = new_BKTH.astype(layer_BKSH.dtype)
        if not per_row:
            return jax.lax.dynamic_update_slice(layer_BKSH, new_BKTH, (0, 0, cache.index, 0))
        row = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0))  # noqa: E731
        return jax.vmap(row)(layer_BKSH, new_BKTH, cache.index)

    def write(old, new_LBTKH):
        new_LBKTH = new_LBTKH.transpose(0, 1, 3, 2, 4)
        if isinstance(old, tuple):
            return tuple(
                constrain(put(layer, new_LBKTH[i]), names[1:]) for i, layer in enumerate(old)
            )
        if per_row:
            return constrain(jax.vmap(put)(old, new_LBKTH), names)
        start = (0, 0, 0, cache.index, 0)
        return constrain(
            jax.lax.dynamic_update_slice(old, new_LBKTH.astype(old.dtype), start), names
        )

    k, v = write(cache.k, k_LBTKH), write(cache.v, v_LBTKH)
    seg_BT = seg_BT.astype(jnp.int32)
    if per_row:
        row = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i,))  # noqa: E731
        seg = jax.vmap(row)(cache.segment_ids, seg_BT, cache.index)
    else:
        seg = jax.lax.dynamic_update_slice(cache.segment_ids, seg_BT, (0, cache.index))
    return KVCache(k=k, v=v, segment_ids=seg, index=cache.index + seg_BT.shape[1])


def prefill_rows(
    config: ModelConfig, params: Params, cache: KVCache, tokens_RP: Array, lengths_R: Array,
    rows_R: Array,
) -> tuple[Array, KVCache]:  # fmt: skip
    """Run R right-padded prompts (`lengths_R` real tokens each) and write them into rows
    `rows_R` of a per-row-index cache, at slots `0 ... P - 1`; each row's index becomes its
    length (the padding after it is never read). A row of `rows_R` past the batch (batch
    filler) writes nothing. Returns the logits `[R, P, V]`, positions counted from 0."""
    R, P = tokens_RP.shape
    segment_ids_RP = (jnp.arange(P)[None, :] < lengths_R[:, None]).astype(jnp.int32)
    positions_RP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
    slots_P = jnp.arange(P, dtype=jnp.int32)
    masks = kind_masks(config, slots_P, slots_P, segment_ids_RP, segment_ids_RP)
    logits, (k, v) = Decoder(config, "lm", return_kv=True).apply(
        {"params": params}, tokens_RP, positions_RP, masks
    )

    def write(old, new_LRPKH):
        new_LRKPH = new_LRPKH.transpose(0, 1, 3, 2, 4)
        if isinstance(old, tuple):
            return tuple(
                layer.at[rows_R, :, :P].set(new_LRKPH[i].astype(layer.dtype), mode="drop")
                for i, layer in enumerate(old)
            )
        return old.at[:, rows_R, :, :P].set(new_LRKPH.astype(old.dtype), mode="drop")

    return logits, KVCache(
        k=write(cache.k, k),
        v=write(cache.v, v),
        segment_ids=cache.segment_ids.at[rows_R, :P].set(segment_ids_RP, mode="drop"),
        index=cache.index.at[rows_R].set(lengths_R.astype(jnp.int32), mode="drop"),
    )


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


def _old_masks(
    config: ModelConfig, q_slots_BT: Array, seg_BT: Array, cache: KVCache, width: int
) -> tuple[Array, ...]:
    """Per kind of layer, which of the first `width` cache slots each new token reads
    `[B, 1, T, S]`: slots written earlier (below the row's index), of its segment, causal
    and within the sliding window by slot. `q_slots_BT` are the new tokens' slots."""
    kv_slots_S = jnp.arange(width, dtype=jnp.int32)
    index_B = jnp.broadcast_to(cache.index, q_slots_BT.shape[:1])
    written_B11S = (kv_slots_S[None, :] < index_B[:, None])[:, None, None, :]
    row = lambda q_T, qs_T, ks_S: kind_masks(config, q_T, kv_slots_S, qs_T[None], ks_S[None])  # noqa: E731
    per_row = jax.vmap(row)(q_slots_BT, seg_BT, cache.segment_ids[:, :width])
    return tuple(mask[:, 0] & written_B11S for mask in per_row)


def _window(kv: Any, width: int) -> Any:
    """The first `width` slots of every layer's keys or values (a static slice)."""
    if isinstance(kv, tuple):
        return tuple(layer[:, :, :width] for layer in kv)
    return kv[:, :, :, :width]


def forward_with_cache(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    cache: KVCache,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
    window: int | None = None,
) -> tuple[Array, KVCache]:
    """Run T new tokens against the cache (a prompt chunk with T > 1, decode with T = 1).

    The tokens attend to every earlier slot of their own segment and to each other
    causally, then are written at slots `cache.index ... cache.index + T - 1` (each row at
    its own index when `cache.index` is `[B]`). `positions_BT` defaults to the slot index;
    left-padded prompts should pass positions counted from their first real token. A
    static `window` reads only the first `window` slots (the caller keeps every row's
    index <= window), so a short sequence in a big cache never reads the empty slots.
    The caller keeps `cache.index + T <= cache.max_len` (past it, writes are clamped).
    """
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    index_B1 = jnp.broadcast_to(cache.index, (B,))[:, None]
    q_slots_BT = index_B1 + jnp.arange(T, dtype=jnp.int32)[None, :]
    if positions_BT is None:
        positions_BT = q_slots_BT
    new_slots_T = jnp.arange(T, dtype=jnp.int32)  # only their differences matter here
    masks_new = kind_masks(config, new_slots_T, new_slots_T, segment_ids_BT, segment_ids_BT)
    width = cache.max_len if window is None else min(window, cache.max_len)
    masks_old = _old_masks(config, q_slots_BT, segment_ids_BT, cache, width)
    old = (_window(cache.k, width), _window(cache.v, width))
    logits, (k, v) = Decoder(config, "lm", return_kv=True).apply(
        {"params": params}, tokens_BT, positions_BT, masks_new, old, masks_old
    )
    # The writes wait for the logits, hence for every read of the old slots: otherwise
    # XLA may order a write first and copy the whole cache each step to keep the reads.
    logits, k, v = jax.lax.optimization_barrier((logits, k, v))
    return logits, _write_cache(cache, k, v, segment_ids_BT)
