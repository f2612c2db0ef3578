"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text) as Flax modules
used purely: the model's public API.

Use the functions here (`init_params`, `forward`, `forward_with_cache`, `reward_forward`,
...): they take a `ModelConfig` and a params pytree of plain arrays. They live by concern
in sibling modules and are all importable from here:

    jaxcai.layers        parameters with logical axes, LoRA-aware projections, RMSNorm, MLP
    jaxcai.attention     RoPE, masks and positions, grouped-query attention
    jaxcai.decoder       the Flax `Block` and `Decoder`, per-kind masks of layers
    jaxcai.kv_cache      `KVCache`, `init_cache`, `prefill`, `forward_with_cache`
    jaxcai.model_params  init, logical axes, shapes, shardings, `head_of`, `unrolled`

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

Layers of two kinds (Gemma-3's `layer_types`), sliding-window and global, each with its
own mask and RoPE frequencies: see `jaxcai.decoder`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcai.attention import (
    Attention,
    apply_rope,
    attention_mask,
    positions_from_segments,
    rope_inv_frequencies,
    segments_and_positions,
)
from jaxcai.decoder import Block, Decoder, kind_masks
from jaxcai.kv_cache import KVCache, forward_with_cache, init_cache, prefill
from jaxcai.layers import MLP, RMSNorm
from jaxcai.model_config import ModelConfig, flops_per_token, param_count, preset
from jaxcai.model_params import (
    Params,
    head_of,
    init_params,
    init_sharded,
    param_logical_axes,
    param_shapes,
    param_shardings,
    to_reward_params,
    unrolled,
)

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
    # the rest of the model layer, re-exported from the modules that hold it
    "Attention",
    "Block",
    "Decoder",
    "MLP",
    "Params",
    "RMSNorm",
    "apply_rope",
    "attention_mask",
    "head_of",
    "init_sharded",
    "param_shapes",
    "rope_inv_frequencies",
    "to_reward_params",
    "value_forward",
]

Array = jax.Array


def _run(
    config: ModelConfig,
    params: Params,
    head: str,
    tokens_BT: Array,
    segment_ids_BT: Array | None,
    positions_BT: Array | None,
    branch_BT: Array | None = None,
) -> tuple[Array, Array]:
    """The decoder with `head` over a whole batch (causal, same-segment attention), and
    the segment ids it used (defaults filled in)."""
    segment_ids_BT, positions_BT = segments_and_positions(tokens_BT, segment_ids_BT, positions_BT)
    slots_T = jnp.arange(tokens_BT.shape[1])
    branches = None
    if branch_BT is not None:
        branches = (branch_BT, branch_BT, positions_BT, positions_BT)
    masks = kind_masks(config, slots_T, slots_T, segment_ids_BT, segment_ids_BT, branches)
    out, _ = Decoder(config, head).apply({"params": params}, tokens_BT, positions_BT, masks)
    return out, segment_ids_BT


def forward(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
    branch_BT: Array | None = None,
) -> Array:
    """Logits [B, T, V] in float32 for a batch of (optionally packed, padded) sequences.

    `segment_ids_BT` (default all ones) keeps packed examples apart, 0 marks padding;
    `positions_BT` defaults to the index of each token within its segment. `branch_BT`
    marks packed preference pairs (0 the shared prompt, 1 / 2 the responses; see
    `jaxcai.attention.attention_mask`); pass their `positions_BT` with it.
    """
    return _run(config, params, "lm", tokens_BT, segment_ids_BT, positions_BT, branch_BT)[0]


def forward_hidden(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
    branch_BT: Array | None = None,
) -> Array:
    """The final-normed hidden states [B, T, D] that `forward` multiplies by `lm_head`."""
    return _run(config, params, "hidden", tokens_BT, segment_ids_BT, positions_BT, branch_BT)[0]


def lm_head(config: ModelConfig, params: Params) -> Array:
    """The output projection [D, V] (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def value_forward(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
    branch_BT: Array | None = None,
) -> Array:
    """The reward head's scalar at every position [B, T] (a value model: position `t`
    values the state after reading tokens `0..t`)."""
    return _run(config, params, "reward", tokens_BT, segment_ids_BT, positions_BT, branch_BT)[0]


def reward_forward(
    config: ModelConfig,
    params: Params,
    tokens_BT: Array,
    *,
    segment_ids_BT: Array | None = None,
    positions_BT: Array | None = None,
    branch_BT: Array | None = None,
) -> Array:
    """Scalar rewards [B] read at the last non-padding token of each row.

    `params` come from `init_params(config, rng, head="reward")` (or a language model's
    params with the head swapped by `to_reward_params`).
    """
    scores_BT, segment_ids_BT = _run(
        config, params, "reward", tokens_BT, segment_ids_BT, positions_BT, branch_BT
    )
    slots_T = jnp.arange(tokens_BT.shape[1])
    last_B = jnp.max(jnp.where(segment_ids_BT != 0, slots_T, -1), axis=1)
    last_B = jnp.maximum(last_B, 0)  # an all-padding row reads slot 0 rather than wrapping
    return jnp.take_along_axis(scores_BT, last_B[:, None], axis=1)[:, 0]
