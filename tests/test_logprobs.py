"""Log-probs only where the loss reads them (`jaxcai.logprobs`): each gathered width of
the head gives the dense head's values and gradients on the masked positions, and zeros
elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import model as M
from jaxcai.logprobs import MIN_GATHER_VOCAB, gather_sizes, token_logps_of
from jaxcai.model_config import ModelConfig

T = 96  # widths 24, 48, 72 and the dense 96


def test_gather_sizes_end_with_the_row_length():
    assert gather_sizes(96) == (24, 48, 72, 96)
    assert gather_sizes(1000) == (256, 504, 752, 1000)
    assert gather_sizes(40) == (40,)


# (logits chunk, masked positions of the fullest row): the smallest and the largest
# gathered width, the dense head, and the chunked head with a soft-cap.
@pytest.mark.parametrize("chunk,fullest", [(0, 5), (0, 70), (0, 96), (32, 40)])
def test_masked_head_equals_the_dense_head(chunk, fullest):
    cfg = ModelConfig.tiny(
        vocab_size=MIN_GATHER_VOCAB,  # smaller vocabularies always run the dense head
        logits_chunk=chunk,
        final_logit_softcap=30.0 if chunk else None,
    )
    params = M.init_params(cfg, jax.random.key(0))
    gen = np.random.default_rng(fullest)
    tokens = jnp.asarray(gen.integers(3, cfg.vocab_size, (3, T)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = np.zeros((3, T), np.int32)
    for row, n in enumerate((fullest, fullest // 2, 0)):  # one full, one half, one empty
        mask[row, np.sort(gen.choice(T, n, replace=False))] = 1
    mask = jnp.asarray(mask)
    inputs = {"tokens_BT": tokens}

    def total(p, with_mask):
        logps, hits = token_logps_of(cfg, p, inputs, targets, mask if with_mask else None)
        return jnp.sum(jnp.where(mask != 0, logps, 0.0)), (logps, hits)

    (dense_sum, (dense, dense_hits)), dense_grad = jax.value_and_grad(total, has_aux=True)(
        params, False
    )
    run = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
    (sparse_sum, (sparse, hits)), grad = run(params, True)
    on = np.asarray(mask) != 0
    np.testing.assert_allclose(np.asarray(sparse)[on], np.asarray(dense)[on], rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(sparse)[~on] == 0) and not np.asarray(hits)[~on].any()
    np.testing.assert_array_equal(np.asarray(hits)[on], np.asarray(dense_hits)[on])
    np.testing.assert_allclose(float(sparse_sum), float(dense_sum), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(dense_grad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
