"""The model's own invariants: KV cache, packing, scan/remat, dtypes, reward head."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import model as M
from jaxcai.model_config import ModelConfig, RopeScaling

# Jitted once per config: eager flax dispatch is slow on CPU.
forward = jax.jit(M.forward, static_argnums=0)
forward_with_cache = jax.jit(M.forward_with_cache, static_argnums=0)

# Gemma-3 in small: windows of 3 in layers 0 and 2, a global layer 1 with its own scaled
# RoPE base, (1 + w) pre- and post-norms, q/k norms, GeGLU, scaled embeddings, soft-capping.
GEMMA3 = ModelConfig.tiny(
    n_layers=3,
    head_dim=24,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    sliding_window=3,
    rope_local_theta=100.0,
    rope_scaling=RopeScaling(4.0, rope_type="linear"),
    qk_norm=True,
    norm_style="gemma",
    post_norms=True,
    mlp_activation="gelu_tanh",
    embed_scale=True,
    query_pre_attn_scalar=20.0,
    final_logit_softcap=5.0,
    model_type="gemma3_text",
)
CONFIGS = {
    "tiny": ModelConfig.tiny(),
    "untied_biases": ModelConfig.tiny(
        tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True, n_kv_heads=1
    ),
    "window": ModelConfig.tiny(sliding_window=3, scan_layers=False),
    "qwen3": ModelConfig.tiny(head_dim=24, qk_norm=True, tie_embeddings=False, model_type="qwen3"),
    "gemma3": GEMMA3,  # unrolled: tests/test_hf_families.py, and decoding in test_hf.py
}


@functools.cache
def _params(config, seed=0):
    """Random params with non-trivial norms and biases: 0.1-scale noise around the init
    (Llama norm scales around 1), drawn on the host into the shapes `init_params` gives
    (traced, not compiled: compiling every config's init would dominate these tests)."""
    gen = np.random.default_rng(seed)

    def draw(path, shape):
        x = 0.1 * gen.standard_normal(shape.shape)
        if path[-1].key == "scale" and config.norm_style == "llama":
            x += 1.0
        return jnp.asarray(x, shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, M.param_shapes(config))


def _tokens(shape, seed=0, vocab=1024):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_decode_equals_full_forward(name):
    config = CONFIGS[name]
    params = _params(config)
    tokens = _tokens((2, 12))
    full = forward(config, params, tokens)
    cache = M.init_cache(config, 2, 16)
    logits, cache = forward_with_cache(config, params, tokens[:, :5], cache)
    pieces = [logits]
    for t in range(5, 12):
        step, cache = forward_with_cache(config, params, tokens[:, t : t + 1], cache)
        pieces.append(step)
    assert int(cache.index) == 12
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_chunks_equal_full_forward(name):
    """`prefill` fills a fresh cache; later chunks of several tokens attend to it."""
    config = CONFIGS[name]
    params = _params(config)
    tokens = _tokens((2, 12), seed=1)
    full = forward(config, params, tokens)
    logits, cache = jax.jit(M.prefill, static_argnums=(0, 3))(config, params, tokens[:, :4], 16)
    assert int(cache.index) == 4 and cache.max_len == 16
    chunk, cache = forward_with_cache(config, params, tokens[:, 4:9], cache)
    step, cache = forward_with_cache(config, params, tokens[:, 9:12], cache)
    np.testing.assert_allclose(np.concatenate([logits, chunk, step], 1), full, atol=1e-5, rtol=0)


def test_left_padded_decode_equals_unpadded_forward():
    config = CONFIGS["untied_biases"]
    params = _params(config)
    short = _tokens((1, 6), seed=3)
    # Row 0 is the short sequence left-padded by 4; its logits must not see the padding.
    padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), short], 1)
    segments = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 6), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(segments, 1) - 1, 0)
    cache = M.init_cache(config, 1, 12)
    logits, cache = forward_with_cache(
        config,
        params,
        padded[:, :7],
        cache,
        segment_ids_BT=segments[:, :7],
        positions_BT=positions[:, :7],
    )
    rest = [logits[:, 4:]]
    for t in range(7, 10):
        step, cache = forward_with_cache(
            config, params, padded[:, t : t + 1], cache, positions_BT=positions[:, t : t + 1]
        )
        rest.append(step)
    np.testing.assert_allclose(
        np.concatenate(rest, 1), forward(config, params, short), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_segments_equal_separate_runs(name):
    config = CONFIGS[name]
    params = _params(config)
    lengths = [5, 3, 6]
    seqs = [_tokens((1, n), seed=i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate([*seqs, jnp.zeros((1, 2), jnp.int32)], 1)  # 2 padding tokens
    segments = jnp.asarray([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0, 0]])
    logits = forward(config, params, packed, segment_ids_BT=segments)
    start = 0
    for seq, n in zip(seqs, lengths, strict=True):
        np.testing.assert_allclose(
            logits[:, start : start + n], forward(config, params, seq), atol=1e-5, rtol=0
        )
        start += n


def test_positions_from_segments():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    expected = [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    assert M.positions_from_segments(segments).tolist() == expected


def test_sliding_window_mask():
    slots = jnp.arange(5)
    mask = M.attention_mask(slots, slots, jnp.ones((1, 5)), jnp.ones((1, 5)), 2)[0, 0]
    expected = np.tril(np.ones((5, 5), bool)) & ~np.tril(np.ones((5, 5), bool), -2)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_scan_and_remat_do_not_change_values_or_grads(remat):
    base = ModelConfig.tiny(tie_embeddings=False)
    scanned = _params(base)
    unscanned = {k: v for k, v in scanned.items() if k != "layers"}
    for i in range(base.n_layers):
        unscanned[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], scanned["layers"])
    tokens = _tokens((2, 8))

    def loss(config, params):
        return jnp.mean(jax.nn.log_softmax(forward(config, params, tokens))[..., 0])

    ref_loss, ref_grads = jax.value_and_grad(loss, argnums=1)(base, scanned)
    for scan, params in ((True, scanned), (False, unscanned)):
        config = base.replace(scan_layers=scan, remat_policy=remat)
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(
            config, params
        )
        np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
        if not scan:
            grads = {
                **grads,
                "layers": jax.tree_util.tree_map(
                    lambda *xs: jnp.stack(xs), *[grads[f"layers_{i}"] for i in range(2)]
                ),
            }
            grads = {k: v for k, v in grads.items() if not k.startswith("layers_")}
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads
        )


def test_bf16_compute_with_fp32_params():
    config = ModelConfig.tiny(dtype="bfloat16")
    params = _params(config)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    tokens = _tokens((2, 10))
    logits = jax.jit(M.forward, static_argnums=0)(config, params, tokens)
    assert logits.dtype == jnp.float32
    ref = forward(config.replace(dtype="float32"), params, tokens)
    assert np.all(np.isfinite(logits))
    # bf16 has 8 mantissa bits: close to fp32, but not equal.
    np.testing.assert_allclose(logits, ref, atol=0.15, rtol=0)
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() > 0
    cache = M.init_cache(config, 2, 12)
    assert cache.k.dtype == jnp.bfloat16
    step, _ = forward_with_cache(config, params, tokens, cache)
    np.testing.assert_allclose(step, logits, atol=0.05, rtol=0)


def test_bf16_params():
    config = ModelConfig.tiny(param_dtype="bfloat16", dtype="bfloat16")
    params = M.init_params(config, jax.random.key(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert np.all(np.isfinite(forward(config, params, _tokens((1, 4)))))


def test_reward_model_reads_last_real_token():
    config = ModelConfig.tiny()
    lm = _params(config)
    params = M.to_reward_params(config, lm, jax.random.key(5))
    assert "lm_head" not in params and params["reward_kernel"].shape == (config.d_model,)
    tokens = _tokens((1, 7))
    padded = jnp.concatenate([tokens, jnp.full((1, 3), 0)], 1)
    segments = jnp.asarray([[1] * 7 + [0] * 3])
    r_padded = M.reward_forward(config, params, padded, segment_ids_BT=segments)
    r_plain = M.reward_forward(config, params, tokens)
    np.testing.assert_allclose(r_padded, r_plain, atol=1e-5)
    # Independently: the head applied to the final-norm hidden state of the last token.
    lm_params = {k: v for k, v in params.items() if not k.startswith("reward_")}
    lm_params["embed"] = params["embed"]
    hidden = _final_hidden(config, lm_params, tokens)
    expected = hidden[0, -1] @ params["reward_kernel"] + params["reward_bias"]
    np.testing.assert_allclose(r_plain[0], expected, rtol=1e-5, atol=1e-5)
    assert r_plain.shape == (1,)


def test_head_of_tells_a_reward_model_from_a_language_model():
    config = ModelConfig.tiny()
    lm = _params(config)
    assert M.head_of(lm) == "lm"
    assert M.head_of(M.to_reward_params(config, lm, jax.random.key(5))) == "reward"
    assert M.head_of(M.param_shapes(config, head="reward")) == "reward"
    assert M.head_of(M.unrolled(config, lm)[1]) == "lm"


def _final_hidden(config, params, tokens):
    """Final-norm hidden states via the tied LM head: logits = h @ E^T, so solve for h."""
    # With tied embeddings logits_BTV = h_BTD @ embed_VD.T; least squares recovers h.
    logits = forward(config, params, tokens)
    embed = np.asarray(params["embed"], np.float64)
    h, *_ = np.linalg.lstsq(embed, np.asarray(logits[0], np.float64).T, rcond=None)
    return h.T[None]


def test_init_cache_shapes():
    config = ModelConfig.tiny()
    cache = M.init_cache(config, batch_size=3, max_len=20)
    assert cache.k.shape == (2, 3, 2, 20, 16) and cache.max_len == 20  # [L, B, K, S, H]
    assert int(cache.index) == 0 and cache.segment_ids.shape == (3, 20)


def test_unrolled_params_give_the_same_model():
    """`unrolled` splits stacked layers into one subtree per layer (the decoding layout)."""
    config = CONFIGS["untied_biases"]
    params = _params(config)
    config2, params2 = M.unrolled(config, params)
    assert not config2.scan_layers and "layers" not in params2
    assert sorted(k for k in params2 if k.startswith("layers_")) == ["layers_0", "layers_1"]
    tokens = _tokens((2, 9), seed=3)
    np.testing.assert_allclose(
        forward(config2, params2, tokens), forward(config, params, tokens), atol=1e-5, rtol=0
    )
    assert M.unrolled(config2, params2)[1] is params2  # already unrolled: unchanged
