"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text) as Flax modules
used purely.

Use the functions at the bottom (`init_params`, `forward`, `forward_with_cache`,
`reward_forward`): they take a `ModelConfig` and a params pytree of plain arrays.

Axis glossary. Logical names (mapped to mesh axes by `jaxcai.sharding`) and the letters
used in array names:

    B  batch       examples in a batch
    T  length      query positions of this call
    S  cache_length  key/value positions (T without a cache, the cache size with one)
    D  embed       model width
    N  heads       query heads
    K  kv_heads    key/value heads (N % K == 0; K < N is grouped-query attention)
    H  head_dim    width of one head
    F  mlp         hidden width of the SwiGLU MLP
    V  vocab       vocabulary
    L  layers      stacked layers (with `scan_layers`)

Segment ids mark which example each token belongs to (0 = padding): a token attends
only to earlier tokens of its own segment, so packed sequences never mix.

Layers of two kinds (Gemma-3's `layer_types`): sliding-window layers and global layers,
each kind with its own mask and RoPE frequencies. The caller builds one mask per kind
(`_kind_windows`); each layer picks its own, statically when layers are unrolled and by
a scanned per-layer flag when they are one `nn.scan`-ned module.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcai.model_config import ModelConfig, flops_per_token, param_count, preset
from jaxcai.sharding import DEFAULT_RULES, Rules, constrain, tree_shardings

__all__ = [
    "KVCache",
    "ModelConfig",
    "flops_per_token",
    "forward",
    "forward_hidden",
    "lm_head",
    "forward_with_cache",
    "init_cache",
    "prefill",
    "unrolled",
    "init_params",
    "param_count",
    "param_logical_axes",
    "param_shardings",
    "positions_from_segments",
    "preset",
    "reward_forward",
]

Array = jax.Array
Params = Any

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_init = nn.initializers.normal(stddev=0.02)


def _param(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    names: tuple[str | None, ...],
    init: Any = _init,
    dtype: Any = None,
) -> Array:
    config: ModelConfig = module.config
    dtype = config.jnp_param_dtype if dtype is None else dtype
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


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


# ----- layers -------------------------------------------------------------------------


def _project(
    module: nn.Module,
    name: str,
    x: Array,
    dims: str,
    shape: tuple[int, ...],
    names: tuple[str, ...],
) -> Array:
    """`x @ {name}_kernel` in the compute dtype; `dims` = "in,out" letters of the kernel
    (e.g. "d,nh": x is [B, T, D], the kernel [D, N, H]). When `name` is a LoRA target, adds
    (alpha / r) * (x @ A) @ B with float32 adapters `{name}_lora_a` [in..., r] (random) and
    `{name}_lora_b` [r, out...] (zeros, so a fresh adapter leaves the model unchanged)."""
    c: ModelConfig = module.config
    dt = c.jnp_dtype
    ins, outs = dims.split(",")
    kernel = _param(module, f"{name}_kernel", shape, names)
    y = jnp.einsum(f"bt{ins},{ins}{outs}->bt{outs}", x, kernel.astype(dt))
    if not c.lora_rank or name not in c.lora_targets:
        return y
    r, n_in = c.lora_rank, len(ins)
    fan_in = math.prod(shape[:n_in])
    a_init = nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    # Adapters are trained, so they keep float32 master weights even over a bf16 base.
    a_names, b_names = (*names[:n_in], None), (None, *names[n_in:])
    a = _param(module, f"{name}_lora_a", (*shape[:n_in], r), a_names, a_init, jnp.float32)
    b = _param(
        module, f"{name}_lora_b", (r, *shape[n_in:]), b_names, nn.initializers.zeros, jnp.float32
    )
    xa = jnp.einsum(f"bt{ins},{ins}r->btr", x, a.astype(dt))
    delta = jnp.einsum(f"btr,r{outs}->bt{outs}", xa, b.astype(dt))
    return y + (c.lora_alpha / r) * delta


class RMSNorm(nn.Module):
    """RMS norm over the last axis (logically `axis`): `w * norm(x)` in the compute dtype,
    or with `norm_style="gemma"` `(1 + w) * norm(x)` in float32 (w starts at zero)."""

    config: ModelConfig
    axis: str = "embed"

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        c = self.config
        gemma = c.norm_style == "gemma"
        init = nn.initializers.zeros if gemma else nn.initializers.ones
        scale_D = _param(self, "scale", (x_BTD.shape[-1],), (self.axis,), init)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps)
        if gemma:
            return (x * (1.0 + scale_D.astype(jnp.float32))).astype(c.jnp_dtype)
        return x.astype(c.jnp_dtype) * scale_D.astype(c.jnp_dtype)


class Attention(nn.Module):
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
        q = _project(self, "q", x_BTD, "d,nh", (D, N, H), ("embed", "heads", "head_dim"))
        k = _project(self, "k", x_BTD, "d,kh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        v = _project(self, "v", x_BTD, "d,kh", (D, K, H), ("embed", "kv_heads", "head_dim"))
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dt)
            k = k + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
            v = v + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if c.qk_norm:  # per head, before the rotation
            q = RMSNorm(c, "head_dim", name="q_norm")(q)
            k = RMSNorm(c, "head_dim", name="k_norm")(k)
        q = apply_rope(q, positions_BT, inv_freq)
        k = apply_rope(k, positions_BT, inv_freq)

        scale = 1.0 / math.sqrt(c.query_pre_attn_scalar or H)
        if cache is None:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask_B1TS, scale=scale, implementation=c.attention_impl
            )
        else:
            out = _attend_with_cache(q, k, v, *cache, mask_B1TS, scale)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = _project(self, "o", out, "nh,d", (N, H, D), ("heads", "head_dim", "embed"))
        if c.out_bias:
            y = y + _param(self, "o_bias", (D,), ("embed",), nn.initializers.zeros).astype(dt)
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


_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": partial(nn.gelu, approximate=True)}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        c = self.config
        dt = c.jnp_dtype
        zeros = nn.initializers.zeros
        gate = _project(self, "gate", x_BTD, "d,f", (c.d_model, c.d_ff), ("embed", "mlp"))
        up = _project(self, "up", x_BTD, "d,f", (c.d_model, c.d_ff), ("embed", "mlp"))
        if c.mlp_bias:
            gate = gate + _param(self, "gate_bias", (c.d_ff,), ("mlp",), zeros).astype(dt)
            up = up + _param(self, "up_bias", (c.d_ff,), ("mlp",), zeros).astype(dt)
        h = constrain(_ACTIVATIONS[c.mlp_activation](gate) * up, ("batch", "length", "mlp"))
        y = _project(self, "down", h, "f,d", (c.d_ff, c.d_model), ("mlp", "embed"))
        if c.mlp_bias:
            y = y + _param(self, "down_bias", (c.d_model,), ("embed",), zeros).astype(dt)
        return constrain(y, ("batch", "length", "embed"))


def _kind_windows(config: ModelConfig) -> tuple[int | None, ...]:
    """The window of each kind of layer: (global,) or, with sliding layers in
    `layer_types`, (global, sliding). Masks and RoPE tables come in tuples like this."""
    if config.layer_types is None:
        return (config.sliding_window,)
    return (None, config.sliding_window) if any(config.local_layers) else (None,)


def _kind_masks(
    config: ModelConfig, q_slots_T: Array, kv_slots_S: Array, q_seg_BT: Array, kv_seg_BS: Array
) -> tuple[Array, ...]:
    """One attention mask [B, 1, T, S] per kind of layer (`_kind_windows`)."""
    return tuple(
        attention_mask(q_slots_T, kv_slots_S, q_seg_BT, kv_seg_BS, window)
        for window in _kind_windows(config)
    )


def _pick(per_kind: tuple[Any, ...], local: bool | Array) -> Any:
    """This layer's entry of a per-kind tuple: chosen statically for an unrolled layer
    (`local` a Python bool), by a traced flag under scan."""
    if len(per_kind) == 1:
        return per_kind[0]
    if isinstance(local, bool):
        return per_kind[1] if local else per_kind[0]
    return jax.tree_util.tree_map(lambda a, b: jnp.where(local, b, a), *per_kind)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (Gemma-3 norms
    the attention and MLP outputs too); with `return_kv` it also returns the new tokens'
    (keys, values) for a KV cache. `local` (unrolled) or the `local_flag` argument
    (scanned) says whether this is a sliding-window layer; `masks_B1TS` and
    `masks_old_B1TS` hold one mask per kind of layer (`_kind_masks`)."""

    config: ModelConfig
    return_kv: bool = False
    local: bool | None = None

    @nn.compact
    def __call__(
        self,
        x_BTD: Array,
        cache: tuple[Array, Array] | None,
        positions_BT: Array,
        masks_B1TS: tuple[Array, ...],
        masks_old_B1TS: tuple[Array, ...] | None,
        local_flag: Array | None = None,
    ):
        c = self.config
        local = self.local if self.local is not None else local_flag
        layer_cache = None if cache is None else (*cache, _pick(masks_old_B1TS, local))
        rope = (rope_inv_frequencies(c), rope_inv_frequencies(c, local=True))
        rope = rope[: len(_kind_windows(c))]  # per kind of layer, like the masks
        h, new_kv = Attention(c, name="attn")(
            RMSNorm(c, name="attn_norm")(x_BTD),
            positions_BT,
            _pick(rope, local),
            _pick(masks_B1TS, local),
            layer_cache,
        )
        if c.post_norms:
            h = RMSNorm(c, name="attn_post_norm")(h)
        x_BTD = x_BTD + h
        h = MLP(c, name="mlp")(RMSNorm(c, name="mlp_norm")(x_BTD))
        if c.post_norms:
            h = RMSNorm(c, name="mlp_post_norm")(h)
        x_BTD = x_BTD + h
        return x_BTD, (new_kv if self.return_kv else None)


class Decoder(nn.Module):
    """Embedding, `n_layers` blocks, final norm and a head: `lm` logits or `reward` scalars.

    `masks_B1TS` holds one mask per kind of layer (`_kind_masks`). With `return_kv`, also
    returns every layer's keys and values of the new tokens, `[L, B, T, K, H]` each;
    `cache` (earlier slots `[L, B, K, S, H]`) and `masks_old_B1TS` let the new tokens
    attend to a KV cache, `masks_B1TS` then covering the new tokens."""

    config: ModelConfig
    head: str = "lm"
    return_kv: bool = False

    @nn.compact
    def __call__(
        self,
        tokens_BT: Array,
        positions_BT: Array,
        masks_B1TS: tuple[Array, ...],
        cache: tuple[Array, Array] | None = None,
        masks_old_B1TS: tuple[Array, ...] | None = None,
    ):
        c = self.config
        embed_VD = _param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"))
        x = jnp.take(embed_VD, tokens_BT, axis=0).astype(c.jnp_dtype)
        if c.embed_scale:  # the normaliser rounded to the compute dtype, as Gemma does
            x = x * jnp.asarray(c.d_model**0.5, c.jnp_dtype)
        x = constrain(x, ("batch", "length", "embed"))

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=_REMAT[c.remat_policy], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            local_L = jnp.asarray(c.local_layers)  # scanned: each layer reads its own flag
            x, new_kv = stack(c, self.return_kv, name="layers")(
                x, cache, positions_BT, masks_B1TS, masks_old_B1TS, local_L
            )
        else:
            per_layer = []
            for i in range(c.n_layers):
                layer_cache = None if cache is None else (cache[0][i], cache[1][i])
                x, layer_kv = block(c, self.return_kv, c.local_layers[i], name=f"layers_{i}")(
                    x, layer_cache, positions_BT, masks_B1TS, masks_old_B1TS
                )
                per_layer.append(layer_kv)
            new_kv = (
                tuple(jnp.stack([layer[j] for layer in per_layer]) for j in range(2))
                if self.return_kv
                else None
            )
        x = RMSNorm(c, name="final_norm")(x)

        if self.head == "hidden":
            return x, new_kv
        if self.head == "reward":
            w_D = _param(self, "reward_kernel", (c.d_model,), ("embed",))
            b = _param(self, "reward_bias", (), (), nn.initializers.zeros)
            out = jnp.einsum(
                "btd,d->bt", x, w_D.astype(c.jnp_dtype), preferred_element_type=jnp.float32
            ) + b.astype(jnp.float32)
            return constrain(out, ("batch", "length")), new_kv
        if c.tie_embeddings:
            logits = jnp.einsum(
                "btd,vd->btv", x, embed_VD.astype(c.jnp_dtype), preferred_element_type=jnp.float32
            )
        else:
            w_DV = _param(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"))
            logits = jnp.einsum(
                "btd,dv->btv", x, w_DV.astype(c.jnp_dtype), preferred_element_type=jnp.float32
            )
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
        return constrain(logits, ("batch", "length", "vocab")), new_kv


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
) -> Array:
    """[B, 1, T, S] bool: causal by slot, same segment, within the sliding window if any."""
    allowed_TS = kv_slots_S[None, :] <= q_slots_T[:, None]
    if sliding_window is not None:
        allowed_TS &= q_slots_T[:, None] - kv_slots_S[None, :] < sliding_window
    same_BTS = q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    return (allowed_TS[None] & same_BTS)[:, None]


def _defaults(
    tokens_BT: Array, segment_ids_BT: Array | None, positions_BT: Array | None
) -> tuple[Array, Array]:
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    if positions_BT is None:
        positions_BT = positions_from_segments(segment_ids_BT)
    return segment_ids_BT, positions_BT


# ----- the pure API -------------------------------------------------------------------


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


def _boxed_params(config: ModelConfig, rng: Array, head: str) -> Params:
    """Initial params still wrapped in their logical-axis metadata boxes."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    masks = (jnp.ones((1, 1, 1, 1), bool),) * len(_kind_windows(config))
    return Decoder(config, head).init(rng, tokens, tokens, masks)["params"]


@partial(jax.jit, static_argnames=("config", "head"))
def init_params(config: ModelConfig, rng: Array, *, head: str = "lm") -> Params:
    """Randomly initialised params (plain arrays) of the LM (`head="lm"`) or reward model."""
    return nn.unbox(_boxed_params(config, rng, head))


def param_logical_axes(config: ModelConfig, *, head: str = "lm") -> Params:
    """A tree like the params whose leaves are tuples of logical axis names."""
    boxed = jax.eval_shape(lambda: _boxed_params(config, jax.random.key(0), head))
    return jax.tree_util.tree_map(
        lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def param_shapes(config: ModelConfig, *, head: str = "lm") -> Params:
    """A tree of `jax.ShapeDtypeStruct` like the params, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), head=head))


def param_shardings(
    config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES, *, head: str = "lm"
) -> Params:
    """A `NamedSharding` per parameter, from its logical axes and `rules`."""
    return tree_shardings(
        param_logical_axes(config, head=head), param_shapes(config, head=head), mesh, rules
    )


def init_sharded(
    config: ModelConfig,
    rng: Array,
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    head: str = "lm",
) -> Params:
    """`init_params` created directly in its shards (no full copy on one device)."""
    shardings = param_shardings(config, mesh, rules, head=head)
    return jax.jit(lambda r: init_params(config, r, head=head), out_shardings=shardings)(rng)


def _run(
    config: ModelConfig,
    params: Params,
    head: str,
    tokens_BT: Array,
    segment_ids_BT: Array | None,
    positions_BT: Array | None,
) -> tuple[Array, Array]:
    """The decoder with `head` over a whole batch (causal, same-segment attention), and
    the segment ids it used (defaults filled in)."""
    segment_ids_BT, positions_BT = _defaults(tokens_BT, segment_ids_BT, positions_BT)
    slots_T = jnp.arange(tokens_BT.shape[1])
    masks = _kind_masks(config, slots_T, slots_T, segment_ids_BT, segment_ids_BT)
    out, _ = Decoder(config, head).apply({"params": params}, tokens_BT, positions_BT, masks)
    return out, segment_ids_BT


def forward(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
) -> Array:
    """Logits [B, T, V] in float32 for a batch of (optionally packed, padded) sequences.

    `segment_ids_BT` (default all ones) keeps packed examples apart, 0 marks padding;
    `positions_BT` defaults to the index of each token within its segment.
    """
    return _run(config, params, "lm", tokens_BT, segment_ids_BT, positions_BT)[0]


def forward_hidden(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
) -> Array:
    """The final-normed hidden states [B, T, D] that `forward` multiplies by `lm_head`."""
    return _run(config, params, "hidden", tokens_BT, segment_ids_BT, positions_BT)[0]


def lm_head(config: ModelConfig, params: Params) -> Array:
    """The output projection [D, V] (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def reward_forward(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
) -> Array:
    """Scalar rewards [B] read at the last non-padding token of each row.

    `params` come from `init_params(config, rng, head="reward")` (or a language model's
    params with the head swapped by `to_reward_params`).
    """
    scores_BT, segment_ids_BT = _run(
        config, params, "reward", tokens_BT, segment_ids_BT, positions_BT
    )
    slots_T = jnp.arange(tokens_BT.shape[1])
    last_B = jnp.max(jnp.where(segment_ids_BT != 0, slots_T, -1), axis=1)
    last_B = jnp.maximum(last_B, 0)  # an all-padding row reads slot 0 rather than wrapping
    return jnp.take_along_axis(scores_BT, last_B[:, None], axis=1)[:, 0]


def to_reward_params(config: ModelConfig, lm_params: Params, rng: Array) -> Params:
    """A reward model's params from a language model's: same backbone, fresh scalar head."""
    types = None if config.layer_types is None else config.layer_types[:1]
    fresh = init_params(config.replace(n_layers=1, layer_types=types), rng, head="reward")
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    params["reward_kernel"] = fresh["reward_kernel"]
    params["reward_bias"] = fresh["reward_bias"]
    return params


def unrolled(
    config: ModelConfig,
    params: Params,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> tuple[ModelConfig, Params]:
    """The same model with one params subtree per layer (`scan_layers=False`): the layout
    decoding runs fastest in, since a scanned decoder slices (copies) every layer's
    weights out of the stacked arrays at every step. Placed on `mesh` when given."""
    if not config.scan_layers:
        return config, params
    new = config.replace(scan_layers=False)
    head = "reward" if "reward_kernel" in params else "lm"
    return new, _unroll_fn(new, mesh, tuple(rules), head)(params)


@functools.lru_cache(maxsize=16)
def _unroll_fn(new: ModelConfig, mesh, rules: Rules, head: str):
    """A jitted stacked -> per-layer conversion (cached: built and compiled once)."""

    def convert(p):
        out = {k: v for k, v in p.items() if k != "layers"}
        for i in range(new.n_layers):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], p["layers"])
        return out

    shardings = None if mesh is None else param_shardings(new, mesh, rules, head=head)
    return jax.jit(convert, out_shardings=shardings)


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
    segment_ids_BT, positions_BT = _defaults(tokens_BT, segment_ids_BT, positions_BT)
    slots_T = jnp.arange(T, dtype=jnp.int32)
    masks = _kind_masks(config, slots_T, slots_T, segment_ids_BT, segment_ids_BT)
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
    masks_new = _kind_masks(config, q_slots_T, q_slots_T, segment_ids_BT, segment_ids_BT)
    kv_slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
    written_S = kv_slots_S < cache.index  # slots written earlier
    masks_old = tuple(
        mask & written_S[None, None, None, :]
        for mask in _kind_masks(config, q_slots_T, kv_slots_S, segment_ids_BT, cache.segment_ids)
    )
    logits, (k, v) = Decoder(config, "lm", return_kv=True).apply(
        {"params": params}, tokens_BT, positions_BT, masks_new, (cache.k, cache.v), masks_old
    )
    return logits, _write_cache(cache, k, v, segment_ids_BT)
