"""Hugging Face weights: logits parity with `transformers`, save round trips, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HF_CASES, make_hf_model
from safetensors.numpy import load_file, save_file

from jaxcai import hf
from jaxcai import model as M
from jaxcai.sample import greedy_generate

B, T = 3, 16
forward = jax.jit(M.forward, static_argnums=0)  # compiled once per config: eager is slow


def _batch(rng: np.random.Generator, vocab: int):
    """Random tokens with a right-padded row and a left-padded row."""
    tokens = rng.integers(0, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 11:] = 0
    mask[2, :4] = 0
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _assert_padded_logits_match(hf_model, config, params, rng) -> None:
    """Our logits equal the reference's on every non-padding token of a padded batch."""
    tokens, mask, positions = _batch(rng, config.vocab_size)
    ref = _hf_logits(hf_model, tokens, mask, positions)
    ours = np.asarray(
        forward(config, params, jnp.asarray(tokens), segment_ids_BT=jnp.asarray(mask))
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_logits_match_transformers(checkpoint, rng):
    _, model, path = checkpoint
    config, params = hf.load_pretrained(path, progress=False)
    _assert_padded_logits_match(model, config, params, rng)


def test_logits_match_at_far_positions(checkpoint, rng):
    """Positions past `original_max_position_embeddings` exercise the Llama-3 scaling."""
    _, model, path = checkpoint
    config, params = hf.load_pretrained(path, progress=False, scan_layers=False)
    tokens, _, _ = _batch(rng, config.vocab_size)
    mask = np.ones_like(tokens)
    positions = np.arange(T)[None].repeat(B, 0) + np.array([[0], [20], [40]])
    ref = _hf_logits(model, tokens, mask, positions)
    ours = forward(config, params, jnp.asarray(tokens), positions_BT=jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_load_config_fields():
    model = make_hf_model("llama_gqa_rope3")
    config = hf.config_from_hf(json.loads(model.config.to_json_string()))
    assert (config.n_kv_heads, config.tie_embeddings, config.rope_theta) == (2, False, 500_000.0)
    assert config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 16
    qwen = hf.config_from_hf(json.loads(make_hf_model("qwen2").config.to_json_string()))
    assert qwen.qkv_bias and not qwen.out_bias and qwen.tie_embeddings
    mistral = hf.config_from_hf(json.loads(make_hf_model("mistral_window").config.to_json_string()))
    assert (mistral.sliding_window, mistral.head_dim) == (5, 24)
    qwen3 = hf.config_from_hf(json.loads(make_hf_model("qwen3").config.to_json_string()))
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.layer_types) == (
        24,
        True,
        False,
        None,
    )
    gemma = hf.config_from_hf(json.loads(make_hf_model("gemma3_scaled").config.to_json_string()))
    assert gemma.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma.sliding_window, gemma.rope_theta, gemma.rope_local_theta) == (5, 5e4, 300.0)
    assert (gemma.rope_scaling.rope_type, gemma.rope_scaling.factor) == ("linear", 8.0)
    assert (gemma.query_pre_attn_scalar, gemma.final_logit_softcap) == (32.0, 3.0)
    assert gemma.norm_style == "gemma" and gemma.post_norms and gemma.embed_scale


def test_bf16_params(checkpoint):
    _, _, path = checkpoint
    config, params = hf.load_pretrained(path, progress=False, param_dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def _noisy(params, seed: int):
    """Every weight moved by fresh noise (host-side: no compile per shape)."""
    gen = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x + 0.05 * gen.standard_normal(x.shape).astype(x.dtype)), params
    )


@pytest.mark.parametrize("max_shard_bytes", [2**30, 40_000])
def test_save_pretrained_loads_in_transformers(checkpoint, tmp_path, rng, max_shard_bytes):
    import transformers

    _, _, path = checkpoint
    config, loaded = hf.load_pretrained(path, progress=False)
    params = _noisy(loaded, seed=2)  # new values everywhere, biases and norms too
    out = tmp_path / "saved"
    hf.save_pretrained(out, config, params, max_shard_bytes=max_shard_bytes, progress=False)
    sharded = (out / hf.INDEX_FILE).exists()
    assert sharded == (max_shard_bytes < 2**30)
    if sharded:
        assert len(list(out.glob("*.safetensors"))) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    _assert_padded_logits_match(reloaded, config, params, rng)
    # And our own loader reads back exactly what was written.
    config2, params2 = hf.load_pretrained(out, progress=False)
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_load_save_keeps_tensors_bitwise(checkpoint, tmp_path):
    _, _, path = checkpoint
    config, params = hf.load_pretrained(path, progress=False, scan_layers=False)
    hf.save_pretrained(tmp_path, config, params, progress=False)
    original = load_file(path / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


@pytest.mark.parametrize("case", ["llama_gqa_rope3", "qwen2", "mistral_window", "gemma3"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    model = make_hf_model(case)
    model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(tmp_path, progress=False)
    prompts = [[5, 17, 3, 44, 2, 9, 1], [9, 8, 7]]  # left-padded together
    ours = greedy_generate(config, params, prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, ours, strict=True):
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert got == out[0, len(prompt) :].tolist()


# ----- bad input ---------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path):
    make_hf_model("llama_gqa_rope3").save_pretrained(tmp_path)
    return tmp_path


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        hf.load_pretrained(llama_dir, progress=False)


def test_wrong_shape_is_named(llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :8
        ]

    _edit_tensors(llama_dir, edit)
    with pytest.raises(
        hf.CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
        r"\.weight' has shape \(8, 64\), expected \(32, 64\)",
    ):
        hf.load_pretrained(llama_dir, progress=False)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_model_type_is_named(llama_dir):
    _edit_config(llama_dir, model_type="gpt_neox")
    with pytest.raises(hf.CheckpointError, match=r"config\.json: model_type 'gpt_neox' is not"):
        hf.load_pretrained(llama_dir, progress=False)


def test_unsupported_rope_and_missing_field(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(hf.CheckpointError, match="rope type 'yarn'"):
        hf.load_pretrained(llama_dir, progress=False)
    config = json.loads((llama_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0}
    del config["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match="missing field 'hidden_size'"):
        hf.load_pretrained(llama_dir, progress=False)


def test_missing_or_corrupt_files(tmp_path, llama_dir):
    with pytest.raises(hf.CheckpointError, match="no config.json"):
        hf.load_pretrained(tmp_path / "nowhere", progress=False)
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(hf.CheckpointError, match="invalid JSON"):
        hf.load_pretrained(llama_dir, progress=False)
    make_hf_model("llama_tied").save_pretrained(llama_dir)
    (llama_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: cannot read"):
        hf.load_pretrained(llama_dir, progress=False)
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(hf.CheckpointError, match="pickled weights are never loaded"):
        hf.load_pretrained(llama_dir, progress=False)


def test_index_naming_a_missing_shard(tmp_path):
    config, params = hf.load_pretrained(_saved(tmp_path / "src"), progress=False)
    hf.save_pretrained(tmp_path / "out", config, params, max_shard_bytes=40_000, progress=False)
    victim = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(hf.CheckpointError, match=f"{victim.name}: listed in the index but missing"):
        hf.load_pretrained(tmp_path / "out", progress=False)


def _saved(path):
    make_hf_model("qwen2").save_pretrained(path)
    return path
