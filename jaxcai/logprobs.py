"""Token log-probs of a batch's targets, computed only where a loss reads them.

A loss reads the log-prob of a target only where its mask is set: the response of an SFT
row or of a preference pair, never the prompt or the padding. The LM head (a `[D, V]`
matmul per position), its log-softmax over the vocabulary and their backward pass are a
large share of a step for a small model or a big vocabulary, so `token_logps_of` with a
mask runs them on the masked positions only.

Shapes stay static: the masked positions of each row are gathered into `M` slots, where
`M` is the smallest of a few fixed fractions of the row length (1/4, 1/2, 3/4, whole)
that holds the fullest row of the batch (for vocabularies of at least `MIN_GATHER_VOCAB`;
smaller ones run the dense head and zero the rest). Every fraction is compiled once into a
`lax.switch`, and the device runs the one branch the batch needs. The values scatter
back to `[B, T]`, zero where the mask is not set, so callers see the layout they always
had. Each kept position's log-prob is the same product of its hidden state and the head
as the dense computation's, up to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcai.losses import chunked_token_logps, token_logps
from jaxcai.model import Params, forward, forward_hidden, lm_head
from jaxcai.model_config import ModelConfig

__all__ = ["MIN_GATHER_VOCAB", "SLOT_FRACTIONS", "gather_sizes", "token_logps_of"]

Array = jax.Array

SLOT_FRACTIONS = (4, 2, 4 / 3)  # gather T / f positions per row: a quarter, half, 3/4
MIN_GATHER = 64  # rows shorter than this always run the dense head
# Smaller vocabularies run the dense head: there the saving was within the noise of a
# step (benchmarks/README.md), while the extra branches cost compile time.
MIN_GATHER_VOCAB = 32768


def gather_sizes(length: int) -> tuple[int, ...]:
    """The gathered widths a row of `length` positions may run with, shortest first; the
    last is `length` itself (the dense head, no gather)."""
    if length < MIN_GATHER:
        return (length,)
    sizes = {-(-int(length / f) // 8) * 8 for f in SLOT_FRACTIONS}
    return (*sorted(s for s in sizes if s < length), length)


def _head_logps(mc: ModelConfig, params: Params, hidden_BTD: Array, targets_BT: Array):
    """Log-probs of the targets and argmax hits from final hidden states [B, T]."""
    head_DV, cap = lm_head(mc, params), mc.final_logit_softcap
    if mc.logits_chunk:
        return chunked_token_logps(hidden_BTD, head_DV, targets_BT, mc.logits_chunk, cap)
    logits = jnp.einsum(
        "btd,dv->btv", hidden_BTD, head_DV.astype(hidden_BTD.dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    return token_logps(logits, targets_BT), jnp.argmax(logits, axis=-1) == targets_BT


def _gathered(mc, params, hidden_BTD, targets_BT, mask_BT, size: int):
    """`_head_logps` on each row's first `size` masked positions, scattered back."""
    B, T = targets_BT.shape
    slots_BM = jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=T)[0])(mask_BT)
    at_BM = jnp.minimum(slots_BM, T - 1)
    hidden_BMD = jnp.take_along_axis(hidden_BTD, at_BM[..., None], axis=1)
    logps_BM, hits_BM = _head_logps(
        mc, params, hidden_BMD, jnp.take_along_axis(targets_BT, at_BM, axis=1)
    )
    rows_B1 = jnp.arange(B)[:, None]
    logps = jnp.zeros((B, T), logps_BM.dtype).at[rows_B1, slots_BM].set(logps_BM, mode="drop")
    hits = jnp.zeros((B, T), bool).at[rows_B1, slots_BM].set(hits_BM, mode="drop")
    return logps, hits


def token_logps_of(
    mc: ModelConfig,
    params: Params,
    inputs: dict,
    targets_BT: Array,
    mask_BT: Array | None = None,
) -> tuple[Array, Array]:
    """Token log-probs of `targets_BT` and argmax hits [B, T], from the full logits or
    `mc.logits_chunk` positions at a time (`losses.chunked_token_logps`).

    With `mask_BT`, the head runs on the masked positions only (see the module
    docstring) and both outputs are zero (False) elsewhere: pass it when every reader
    of the result masks it the same way."""
    if mask_BT is None:
        if mc.logits_chunk:
            hidden = forward_hidden(mc, params, **inputs)
            return _head_logps(mc, params, hidden, targets_BT)
        logits = forward(mc, params, **inputs)
        return token_logps(logits, targets_BT), jnp.argmax(logits, axis=-1) == targets_BT
    mask_BT = mask_BT != 0
    sizes = gather_sizes(targets_BT.shape[1])
    if len(sizes) == 1 or mc.vocab_size < MIN_GATHER_VOCAB:  # the unmasked path, zeroed
        logps, hits = token_logps_of(mc, params, inputs, targets_BT)
        return jnp.where(mask_BT, logps, 0.0), hits & mask_BT
    hidden = forward_hidden(mc, params, **inputs)

    def dense(h):
        logps, hits = _head_logps(mc, params, h, targets_BT)
        return jnp.where(mask_BT, logps, 0.0), hits & mask_BT

    branches = [
        (lambda h, s=s: _gathered(mc, params, h, targets_BT, mask_BT, s)) for s in sizes[:-1]
    ]
    fullest = jnp.max(jnp.sum(mask_BT, axis=1, dtype=jnp.int32))
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), fullest)
    return jax.lax.switch(index, [*branches, dense], hidden)
