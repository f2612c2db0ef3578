"""Large vocabularies: chunked logits by default over 32k entries (presets, YAML, a
Hugging Face config.json, an adopted checkpoint), Gemma's softcap inside the chunks, and
LoRA's DPO reference as the base itself rather than a second copy of it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import hf, lora, model, sharding
from jaxcai.config import compose, model_config
from jaxcai.losses import chunked_token_logps, token_logps
from jaxcai.model_config import AUTO_CHUNK, DEFAULT_CHUNK, ModelConfig, preset
from jaxcai.objectives import token_logps_of
from jaxcai.trainer import abstract_batch, adopt_init_model, build

QWEN3_JSON = {  # Qwen3-0.6B's config.json, cut to two layers
    "architectures": ["Qwen3ForCausalLM"],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 2,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
SMALL = dict(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)

# ----- the default ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "chunk"),
    [("qwen3-8b", 256), ("llama3.1-8b", 256), ("gemma3-1b", 256), ("tiny", 0), ("mistral-7b", 0)],
)
def test_yaml_presets_resolve_the_chunk_by_vocabulary(name, chunk):
    cfg = compose([f"model={name}"])
    assert cfg.model.logits_chunk == AUTO_CHUNK  # the YAML says "auto"
    assert model_config(cfg.model).logits_chunk == chunk == preset(name).logits_chunk


def test_an_explicit_chunk_is_kept_and_auto_resolves_again_on_replace():
    assert model_config(compose(["model=qwen3-8b", "model.logits_chunk=0"]).model).logits_chunk == 0
    assert ModelConfig(**SMALL, logits_chunk=64).logits_chunk == 64
    big = ModelConfig(**SMALL).replace(vocab_size=40_000)  # resolved: stays 0
    assert big.logits_chunk == 0
    assert big.replace(logits_chunk=AUTO_CHUNK).logits_chunk == DEFAULT_CHUNK
    with pytest.raises(ValueError, match="logits_chunk"):
        ModelConfig(**SMALL, logits_chunk=-2)


def test_gemma_softcap_and_chunking_go_together():
    gemma = preset("gemma3-1b", final_logit_softcap=30.0)
    assert gemma.logits_chunk == DEFAULT_CHUNK


def test_a_qwen3_config_json_gets_chunking(tmp_path):
    assert hf.config_from_hf(QWEN3_JSON).logits_chunk == DEFAULT_CHUNK
    assert hf.config_from_hf({**QWEN3_JSON, "vocab_size": 32_000}).logits_chunk == 0
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_JSON))
    cfg = compose(["model=tiny", f"trainer.init_from={tmp_path}"])
    adopt_init_model(cfg)  # the checkpoint's architecture, the tiny preset's "auto"
    assert (cfg.model.vocab_size, cfg.model.logits_chunk) == (151936, DEFAULT_CHUNK)
    cfg = compose(["model=tiny", "model.logits_chunk=0", f"trainer.init_from={tmp_path}"])
    adopt_init_model(cfg)
    assert cfg.model.logits_chunk == 0  # asked for full logits


# ----- chunked = full -------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_log_probs_equal_the_full_ones(softcap):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (2, 37, 16))  # 37: the last chunk is padded
    head = 2.0 * jax.random.normal(k2, (16, 300))
    targets = jax.random.randint(k3, (2, 37), 0, 300)
    logits = hidden @ head
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logps, correct = chunked_token_logps(hidden, head, targets, 8, softcap)
    np.testing.assert_allclose(logps, token_logps(logits, targets), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == targets)


def test_chunked_model_log_probs_and_gradients_equal_the_full_ones():
    """Through `token_logps_of`, with Gemma's softcap (the model's head applies it to the
    full logits, `chunked_token_logps` inside each chunk)."""
    full = ModelConfig(**SMALL, tie_embeddings=True, final_logit_softcap=3.0, logits_chunk=0)
    chunked = full.replace(logits_chunk=16)
    params = model.init_params(full, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, SMALL["vocab_size"])
    inputs, targets = {"tokens_BT": tokens}, jnp.roll(tokens, -1, axis=1)

    @jax.jit
    def logps_and_grads(p):
        run = lambda mc, p: token_logps_of(mc, p, inputs, targets)[0]
        grad = lambda mc: jax.grad(lambda p: run(mc, p).sum())(p)
        return run(full, p), run(chunked, p), grad(full), grad(chunked)

    want, got, g_full, g_chunk = logps_and_grads(params)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(g_chunk), leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----- LoRA: the reference is the base --------------------------------------------------

LORA_DPO = [
    "experiment=smoke_sft", "objective=dpo", "data=preferences", "data.pack_pairs=false",
    "objective.reference=model",
    "model.n_layers=1", "model.lora_rank=4", "trainer.batch_size=4", "data.max_len=32",
    "optimizer.lr=3e-2", "optimizer.warmup_steps=0",
]  # fmt: skip


def _batch(cfg, mesh) -> dict:
    """A random DPO batch of `cfg`'s shapes: chosen and rejected rows of random tokens."""
    rng = np.random.default_rng(0)
    vocab = cfg.model.vocab_size

    def leaf(path, s):
        name = path[-1].key
        if name in ("tokens", "targets"):
            return jnp.asarray(rng.integers(4, vocab, s.shape), s.dtype)
        if name == "positions":
            return jnp.broadcast_to(jnp.arange(s.shape[-1], dtype=s.dtype), s.shape)
        return jnp.full(s.shape, 1 if name != "p_chosen" else 0.7, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_batch(cfg, mesh))


def test_lora_dpo_reference_is_the_base_and_equals_a_copied_reference():
    cfg = compose(LORA_DPO)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh), jax.devices()[:1])
    trainer = build(cfg, mesh)
    assert trainer.ref_params is None  # no second copy of the weights
    batch = _batch(cfg, mesh)
    copied = jax.tree_util.tree_map(jnp.copy, trainer.state.params)  # what build used to keep
    base_state = jax.tree_util.tree_map(jnp.copy, trainer.state)
    copy_state = trainer.state
    losses_base, losses_copy = [], []
    for _ in range(3):
        base_state, m_base = trainer.step(base_state, batch, None)
        copy_state, m_copy = trainer.step(copy_state, batch, copied)
        losses_base.append(float(m_base["loss"]))
        losses_copy.append(float(m_copy["loss"]))
    assert losses_base == losses_copy
    assert losses_base[-1] < losses_base[0]  # the adapters moved away from the reference
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(base_state.params), leaves(copy_state.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_lora_dpo_eval_reference_is_the_base():
    cfg = compose(LORA_DPO)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh), jax.devices()[:1])
    trainer = build(cfg, mesh)
    batch = _batch(cfg, mesh)
    copied = jax.tree_util.tree_map(jnp.copy, trainer.state.params)
    state, _ = trainer.step(trainer.state, batch, None)  # adapters away from zero
    m_base = trainer.eval_step(state.params, batch, None)
    m_copy = trainer.eval_step(state.params, batch, copied)
    assert float(m_base["loss"]) == float(m_copy["loss"]) != float(np.log(2.0))


def test_adapters_off_is_the_base_model():
    c = ModelConfig(**SMALL, lora_rank=2)
    params = lora.add_adapters(
        c, model.init_params(lora.base_config(c), jax.random.key(0)), jax.random.key(1)
    )
    trained = jax.tree_util.tree_map(lambda x: x + 0.1, params)  # non-zero B everywhere
    off = lora.adapters_off(trained)
    base = lora.split(trained)[1]
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, SMALL["vocab_size"])
    forward = jax.jit(model.forward, static_argnums=0)
    want = forward(lora.base_config(c), base, tokens)
    # Two compiled programs (with and without the adapter matmuls): equal up to rounding.
    np.testing.assert_allclose(forward(c, off, tokens), want, rtol=1e-5, atol=1e-5)
    assert np.abs(forward(c, trained, tokens) - want).max() > 1e-3


@pytest.mark.slow
def test_lora_dpo_compiles_without_a_reference_copy():
    """The abstract step's arguments: the state and the batch, no reference params."""
    from jaxcai.aot import compile_train_step, memory_report

    cfg = compose(LORA_DPO)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh), jax.devices()[:1])
    compiled, state, _ = compile_train_step(cfg, mesh)
    r = memory_report(compiled, state)
    full = compose([*LORA_DPO, "model.lora_rank=0"])
    compiled_full, state_full, _ = compile_train_step(full, mesh)
    r_full = memory_report(compiled_full, state_full)
    # Full fine-tuning keeps a frozen copy: its arguments hold the params twice.
    assert r_full["arguments_mb"] >= 2 * r_full["params_mb"] + r_full["opt_state_mb"]
    assert r["arguments_mb"] < 1.5 * r["params_mb"] + r["opt_state_mb"]
