"""The decoder as Flax modules: the pre-norm residual `Block` and the `Decoder` (embedding,
scanned or unrolled blocks with optional remat, final norm, and an LM, reward or hidden
head), and the per-kind masks and RoPE tables of its layers.

Layers of two kinds (Gemma-3's `layer_types`): sliding-window layers and global layers,
each kind with its own mask and RoPE frequencies. The caller builds one mask per kind
(`kind_masks`, in the order of `kind_windows`); each layer picks its own, statically
when layers are unrolled and by a scanned per-layer flag when they are one
`nn.scan`-ned module.

Array names carry their shapes in the letters of the axis glossary in `jaxcai.model`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcai.attention import Attention, attention_mask, rope_inv_frequencies
from jaxcai.layers import MLP, RMSNorm, param
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import constrain

__all__ = ["Block", "Decoder", "kind_masks", "kind_windows"]

Array = jax.Array

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def kind_windows(config: ModelConfig) -> tuple[int | None, ...]:
    """The window of each kind of layer: (global,) or, with sliding layers in
    `layer_types`, (global, sliding). Masks and RoPE tables come in tuples like this."""
    if config.layer_types is None:
        return (config.sliding_window,)
    return (None, config.sliding_window) if any(config.local_layers) else (None,)


def kind_masks(
    config: ModelConfig,
    q_slots_T: Array,
    kv_slots_S: Array,
    q_seg_BT: Array,
    kv_seg_BS: Array,
    branches: tuple[Array, Array, Array, Array] | None = None,
) -> tuple[Array, ...]:
    """One attention mask [B, 1, T, S] per kind of layer (`kind_windows`); `branches`
    as in `jaxcai.attention.attention_mask` (packed preference pairs)."""
    return tuple(
        attention_mask(q_slots_T, kv_slots_S, q_seg_BT, kv_seg_BS, window, branches)
        for window in kind_windows(config)
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
    `masks_old_B1TS` hold one mask per kind of layer (`kind_masks`)."""

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
        rope = rope[: len(kind_windows(c))]  # per kind of layer, like the masks
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

    `masks_B1TS` holds one mask per kind of layer (`kind_masks`). With `return_kv`, also
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
        embed_VD = param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"))
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
            w_D = param(self, "reward_kernel", (c.d_model,), ("embed",))
            b = param(self, "reward_bias", (), (), nn.initializers.zeros)
            out = jnp.einsum(
                "btd,d->bt", x, w_D.astype(c.jnp_dtype), preferred_element_type=jnp.float32
            ) + b.astype(jnp.float32)
            return constrain(out, ("batch", "length")), new_kv
        if c.tie_embeddings:
            logits = jnp.einsum(
                "btd,vd->btv", x, embed_VD.astype(c.jnp_dtype), preferred_element_type=jnp.float32
            )
        else:
            w_DV = param(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"))
            logits = jnp.einsum(
                "btd,dv->btv", x, w_DV.astype(c.jnp_dtype), preferred_element_type=jnp.float32
            )
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
        return constrain(logits, ("batch", "length", "vocab")), new_kv
