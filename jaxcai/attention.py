"""Attention: rotary embeddings, the masks and positions of (packed) sequences, and the
grouped-query attention layer, over the new tokens alone or against a KV cache.

Array names carry their shapes in the letters of the axis glossary in `jaxcai.model`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcai.layers import RMSNorm, causal_attention, param, project
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import constrain

__all__ = [
    "Attention",
    "apply_rope",
    "attention_mask",
    "positions_from_segments",
    "rope_inv_frequencies",
    "segments_and_positions",
]

Array = jax.Array

# ----- rotary embeddings --------------------------------------------------------------


def rope_inv_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] of global layers (scaled by `config.rope_scaling` when
    set), or with `local` of sliding-window layers (`rope_local_theta`, unscaled)."""
    h = config.head_dim
    theta = config.rope_theta
    if local and config.rope_local_theta is not None:
        theta = config.rope_local_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    s = None if local else config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTNH: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
    """Rotate halves of each head (the Hugging Face convention) by position-dependent angles."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles_BT1H = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * jnp.cos(angles_BT1H) + rotated * jnp.sin(angles_BT1H)
    return out.astype(x_BTNH.dtype)


# ----- masks and positions ------------------------------------------------------------


def positions_from_segments(segment_ids_BT: Array) -> Array:
    """Position of each token within its segment (restarting at 0 where the id changes)."""
    B, T = segment_ids_BT.shape
    idx_T = jnp.arange(T, dtype=jnp.int32)
    prev = jnp.concatenate([jnp.full((B, 1), -1, segment_ids_BT.dtype), segment_ids_BT[:, :-1]], 1)
    starts_BT = jnp.where(segment_ids_BT != prev, idx_T, 0)
    return idx_T - jax.lax.cummax(starts_BT, axis=1)


def attention_mask(
    q_slots_T: Array,
    kv_slots_S: Array,
    q_seg_BT: Array,
    kv_seg_BS: Array,
    sliding_window: int | None,
    branches: tuple[Array, Array, Array, Array] | None = None,
) -> Array:
    """[B, 1, T, S] bool: causal by slot, same segment, within the sliding window if any.

    `branches` = (q_branch_BT, kv_branch_BS, q_pos_BT, kv_pos_BS) marks a packed
    preference row (`jaxcai.data.pairs`): branch 0 is a pair's shared prompt, 1 and 2 its
    two responses. A response token sees the shared prompt and its own branch, never the
    other response; the sliding window then counts positions, not slots (the second
    response's positions continue from the prompt, not from the first response)."""
    allowed_TS = kv_slots_S[None, :] <= q_slots_T[:, None]
    if sliding_window is not None and branches is None:
        allowed_TS &= q_slots_T[:, None] - kv_slots_S[None, :] < sliding_window
    allowed_BTS = allowed_TS[None] & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])
    if branches is not None:
        q_branch, kv_branch, q_pos, kv_pos = branches
        kv_b = kv_branch[:, None, :]
        allowed_BTS &= (kv_b == 0) | (kv_b == q_branch[:, :, None])
        if sliding_window is not None:
            allowed_BTS &= q_pos[:, :, None] - kv_pos[:, None, :] < sliding_window
    return allowed_BTS[:, None]


def segments_and_positions(
    tokens_BT: Array, segment_ids_BT: Array | None, positions_BT: Array | None
) -> tuple[Array, Array]:
    """The segment ids and positions a whole-batch pass uses: the given ones, or one
    segment per row and each token's index within its segment."""
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    if positions_BT is None:
        positions_BT = positions_from_segments(segment_ids_BT)
    return segment_ids_BT, positions_BT


# ----- attention ---------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; q/k norms and biases as the config says."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: Array,
        positions_BT: Array,
        inv_freq: Array,
        mask_B1TS: Array,
        cache: tuple[Array, Array, Array] | None,
    ):
        """`inv_freq` [H/2] are this layer's RoPE frequencies. `cache`, when given, is this
        layer's read-only (keys, values) of earlier slots `[B, K, S, H]` and their mask
        `[B, 1, T, S]`; `mask_B1TS` then covers the new tokens among themselves
        `[B, 1, T, T]`. Returns the output and the new tokens' (keys, values), which the
        caller writes into the cache."""
        c = self.config
        D, N, K, H, dt = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.jnp_dtype
        q = project(self, "q", x_BTD, "d,nh", (D, N, H), ("embed", "heads", "head_dim"))
        k = project(self, "k", x_BTD, "d,kh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        v = project(self, "v", x_BTD, "d,kh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dt)
            k = k + param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
            v = v + param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if c.qk_norm:  # per head, before the rotation
            q = RMSNorm(c, "head_dim", name="q_norm")(q)
            k = RMSNorm(c, "head_dim", name="k_norm")(k)
        q = apply_rope(q, positions_BT, inv_freq)
        k = apply_rope(k, positions_BT, inv_freq)

        scale = 1.0 / math.sqrt(c.query_pre_attn_scalar or H)
        if cache is None and c.attention_impl is None and jax.default_backend() == "cpu":
            # Without a cache the mask is causal by slot: skip the blocks above the diagonal.
            out = causal_attention(q, k, v, mask_B1TS, scale)
        elif cache is None:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask_B1TS, scale=scale, implementation=c.attention_impl
            )
        else:
            out = _attend_with_cache(q, k, v, *cache, mask_B1TS, scale)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = project(self, "o", out, "nh,d", (N, H, D), ("heads", "head_dim", "embed"))
        if c.out_bias:
            y = y + param(self, "o_bias", (D,), ("embed",), nn.initializers.zeros).astype(dt)
        return constrain(y, ("batch", "length", "embed")), (k, v)


def _attend_with_cache(
    q_BTNH: Array,
    k_BTKH: Array,
    v_BTKH: Array,
    k_old_BKSH: Array,
    v_old_BKSH: Array,
    mask_old_B1TS: Array,
    mask_new_B1TT: Array,
    scale: float,
) -> Array:
    """Attention over earlier cache slots and the new tokens, one softmax across both,
    without writing the new keys into a copy of the cache first (so a decode step reads
    the cache once and never copies it)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    f32, dt = jnp.float32, q.dtype
    # Products in the compute dtype (accumulated in fp32 by the hardware), softmax in fp32.
    s_old = jnp.einsum("btkgh,bksh->bkgts", q, k_old_BKSH.astype(dt)).astype(f32)
    s_new = jnp.einsum("btkgh,bukh->bkgtu", q, k_BTKH).astype(f32)
    s_old = jnp.where(mask_old_B1TS[:, :, None], s_old * scale, -jnp.inf)
    s_new = jnp.where(mask_new_B1TT[:, :, None], s_new * scale, -jnp.inf)
    top = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p_old, p_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
    denom = p_old.sum(-1) + p_new.sum(-1)  # [B, K, G, T]
    out = jnp.einsum("bkgts,bksh->btkgh", p_old.astype(dt), v_old_BKSH.astype(dt)).astype(f32)
    out += jnp.einsum("bkgtu,bukh->btkgh", p_new.astype(dt), v_BTKH).astype(f32)
    out = out / jnp.maximum(denom, 1e-30).transpose(0, 3, 1, 2)[..., None]
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype)
