"""Qwen3 and Gemma-3: config.json layouts, presets, the multimodal Gemma-3 text tower,
scan vs unrolled layers, LoRA, refusals, and 8 fake devices vs one.

(Logits parity with transformers, save round trips and greedy generation for these
families run in tests/test_hf.py over the `qwen3*` and `gemma3*` cases of HF_CASES.)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import HF_CASES, _randomize, make_hf_model
from safetensors.numpy import load_file, save_file

from jaxcai import hf, lora
from jaxcai import model as M
from jaxcai.model_config import param_count, preset

SCRIPT = Path(__file__).parent / "scripts" / "sharded_families.py"
forward = jax.jit(M.forward, static_argnums=0)
FAMILY_CASES = sorted(c for c in HF_CASES if c.startswith(("qwen3", "gemma3")))

# ----- config.json layouts --------------------------------------------------------------

# The published config.json files (transformers 4.5x, the older layout).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 262144,
}
# Multimodal: the text tower names only what differs from Gemma3TextConfig's defaults.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}
PUBLISHED = {"qwen3-8b": QWEN3_8B, "gemma3-1b": GEMMA3_1B, "gemma3-4b": GEMMA3_4B}


def _v5_layout(old: dict) -> dict:
    """What the installed transformers (5.x) writes for the same model: `dtype`,
    `rope_parameters` (per layer type for Gemma-3), `layer_types`."""
    if old["model_type"] == "gemma3":
        return transformers.Gemma3Config(**copy.deepcopy(old)).to_dict()
    cls = transformers.AutoConfig.for_model(old["model_type"]).__class__
    return cls(**copy.deepcopy(old)).to_dict()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_parse_to_the_presets_in_both_layouts(name):
    old = PUBLISHED[name]
    new = _v5_layout(old)
    text = new.get("text_config", new)
    assert "rope_parameters" in text and "dtype" in new and "torch_dtype" not in new
    assert "rope_theta" not in text and "layer_types" in text
    assert hf.config_from_hf(old) == preset(name)
    assert hf.config_from_hf(new) == preset(name)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-4b", "gemma3-1b", "gemma3-4b"])
def test_written_config_reads_back_in_both_layouts(name):
    """`config_to_hf` (older layout) and transformers' own rewrite of it (5.x layout)."""
    config = preset(name)
    written = hf.config_to_hf(config, "bfloat16")
    assert hf.config_from_hf(written) == config
    assert hf.config_from_hf(_v5_layout(written)) == config
    hf_config = transformers.AutoConfig.for_model(**copy.deepcopy(written))
    assert hf_config.num_hidden_layers == config.n_layers
    if config.model_type == "gemma3_text":
        assert list(hf_config.layer_types) == list(config.layer_types)
        rope = hf_config.rope_parameters
        assert rope["sliding_attention"]["rope_theta"] == config.rope_local_theta
        assert rope["full_attention"]["rope_theta"] == config.rope_theta


def test_gemma3_layer_types_follow_transformers():
    """`sliding_window_pattern` (older) derives layer_types as Gemma3TextConfig does."""
    for n_layers, pattern in [(7, 3), (26, 6), (4, 1), (5, 2)]:
        old = {**GEMMA3_1B, "num_hidden_layers": n_layers, "sliding_window_pattern": pattern}
        ref = transformers.Gemma3TextConfig(
            num_hidden_layers=n_layers, sliding_window_pattern=pattern
        ).layer_types
        assert list(hf.config_from_hf(old).layer_types) == list(ref)


def test_qwen3_head_dim_defaults_as_in_transformers():
    config = {k: v for k, v in QWEN3_8B.items() if k != "head_dim"}
    config.update(hidden_size=1024, num_attention_heads=16)
    assert transformers.Qwen3Config(**config).head_dim == 128
    assert hf.config_from_hf(config).head_dim == 128  # not hidden_size / heads = 64


def test_hf_model_parameter_counts():
    for case in FAMILY_CASES:
        model = make_hf_model(case)
        config = hf.config_from_hf(json.loads(model.config.to_json_string()))
        assert param_count(config) == sum(p.numel() for p in model.parameters()), case


# ----- refusals -------------------------------------------------------------------------


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(hf.CheckpointError) as info:
        hf.config_from_hf({"model_type": "gemma2"}, source="x/config.json")
    message = str(info.value)
    assert "x/config.json: model_type 'gemma2' is not supported" in message
    for supported in ("gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"):
        assert repr(supported) in message
    with pytest.raises(hf.CheckpointError, match="model_type 'siglip' is not supported"):
        hf.config_from_hf({"model_type": "gemma3", "text_config": {"model_type": "siglip"}})


@pytest.mark.parametrize(
    ("base", "changes", "match"),
    [
        (QWEN3_8B, dict(use_sliding_window=True), "use_sliding_window"),
        (GEMMA3_1B, dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (GEMMA3_1B, dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (GEMMA3_1B, dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
        (GEMMA3_1B, dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
        (GEMMA3_1B, dict(layer_types=["full_attention"] * 3), "layer_types must list 26"),
        (
            GEMMA3_1B,
            dict(
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                }
            ),
            "RoPE scaling of sliding_attention layers",
        ),
        (
            {**QWEN3_8B, "model_type": "qwen2"},
            dict(layer_types=["sliding_attention"] * 36),
            "per-layer sliding windows",
        ),
    ],
)
def test_unsupported_features_are_refused(base, changes, match):
    with pytest.raises(hf.CheckpointError, match=match):
        hf.config_from_hf({**base, **changes})


def test_configs_transformers_would_misread_are_not_saved():
    gemma = preset("gemma3-1b", n_layers=2, layer_types=None, sliding_window=None)
    with pytest.raises(hf.CheckpointError, match="model_type=qwen3 cannot express"):
        hf.config_to_hf(gemma.replace(model_type="qwen3"), "float32")
    with pytest.raises(hf.CheckpointError, match="model_type=llama cannot express.*qk_norm"):
        hf.config_to_hf(preset("qwen3-0.6b", model_type="llama"), "float32")
    with pytest.raises(hf.CheckpointError, match="layer_types"):
        hf.config_to_hf(preset("gemma3-1b", model_type="mistral", qk_norm=False), "float32")
    with pytest.raises(hf.CheckpointError, match="cannot scale RoPE"):
        hf.config_to_hf(preset("gemma3-4b", layer_types=None), "float32")


# ----- the multimodal Gemma-3 text tower ----------------------------------------------


def _multimodal_gemma3():
    text = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rms_norm_eps=1e-5,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
    )
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _randomize(model, 0)
    return model


def test_multimodal_gemma3_loads_as_its_text_tower(tmp_path, rng):
    model = _multimodal_gemma3()
    model.save_pretrained(tmp_path / "mm")
    config, params = hf.load_pretrained(tmp_path / "mm", progress=False)
    assert config.model_type == "gemma3_text" and config.tie_embeddings
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    tokens = rng.integers(0, 297, (2, 16))  # text only, no image tokens
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(forward(config, params, jnp.asarray(tokens)), ref, atol=1e-4)
    # The in-memory naming of transformers >= 4.52 (model.language_model.*) loads the same.
    tensors = load_file(tmp_path / "mm" / "model.safetensors")
    renamed = {
        k.replace("language_model.model.", "model.language_model."): v for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    (tmp_path / "renamed").mkdir()
    save_file(renamed, str(tmp_path / "renamed" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "renamed" / "config.json").write_text((tmp_path / "mm" / "config.json").read_text())
    _, params2 = hf.load_pretrained(tmp_path / "renamed", progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    # Saved back, it is a text-only Gemma3ForCausalLM with the same logits.
    hf.save_pretrained(tmp_path / "text", config, params, progress=False)
    text = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "text", attn_implementation="eager"
    ).eval()
    assert type(text).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        np.testing.assert_allclose(
            text(input_ids=torch.tensor(tokens)).logits.float().numpy(), ref, atol=1e-4
        )


# ----- the model: layers scanned or not, LoRA -----------------------------------------


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    """Tiny qwen3 (untied, biases) and gemma3 (sliding + global) checkpoints."""
    out = {}
    for case in ("qwen3_untied_bias", "gemma3"):
        path = tmp_path_factory.mktemp(case)
        make_hf_model(case).save_pretrained(path)
        out[case] = path
    return out


def test_scanned_and_unrolled_layers_agree(family_checkpoints, rng):
    """Per-layer windows and RoPE bases: a scanned flag per layer, or a static one per
    unrolled layer (test_hf.py compares both layouts with transformers too)."""
    config, params = hf.load_pretrained(family_checkpoints["gemma3"], progress=False)
    assert config.scan_layers
    unrolled_config, unrolled = M.unrolled(config, params)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)))
    scanned = forward(config, params, tokens)
    np.testing.assert_allclose(forward(unrolled_config, unrolled, tokens), scanned, atol=1e-5)
    remat = config.replace(remat_policy="full")
    np.testing.assert_allclose(forward(remat, params, tokens), scanned, atol=1e-5)


def test_lora_on_the_new_params_merges_and_saves(family_checkpoints, tmp_path, rng):
    config, base = hf.load_pretrained(family_checkpoints["gemma3"], progress=False)
    adapted = config.replace(lora_rank=2, lora_alpha=4.0)
    params = lora.add_adapters(adapted, base, jax.random.key(0))
    trainable, frozen = lora.split(params)
    assert "q_norm" in frozen["layers"]["attn"] and "attn_post_norm" in frozen["layers"]
    gen = np.random.default_rng(3)  # B no longer zero, as if trained
    trainable = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.1 * gen.standard_normal(x.shape).astype(x.dtype)
            if "lora_b" in jax.tree_util.keystr(path)
            else x
        ),
        trainable,
    )
    params = lora.combine(trainable, frozen)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 12)))
    with_adapters = forward(adapted, params, tokens)
    assert np.abs(np.asarray(with_adapters - forward(config, base, tokens))).max() > 1e-3
    merged_config, merged = lora.merge(adapted, params)
    np.testing.assert_allclose(forward(merged_config, merged, tokens), with_adapters, atol=2e-5)
    hf.save_pretrained(tmp_path, adapted, params, progress=False)
    _, reloaded = hf.load_pretrained(tmp_path, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, merged)


def test_reward_model_of_a_gemma3_backbone():
    """The reward head comes from a one-layer model: its layer_types shrink with it."""
    config = preset("gemma3-1b", vocab_size=64, d_model=32, d_ff=48, n_heads=2, head_dim=16)
    lm = M.param_shapes(config)
    params = jax.eval_shape(lambda p: M.to_reward_params(config, p, jax.random.key(0)), lm)
    assert params["reward_kernel"].shape == (32,) and params["layers"] == lm["layers"]


def test_new_params_have_logical_axes():
    axes = M.param_logical_axes(preset("gemma3-1b", n_layers=6, vocab_size=64))
    layer = axes["layers"]
    assert layer["attn"]["q_norm"]["scale"] == ("layers", "head_dim")
    assert layer["attn_post_norm"]["scale"] == ("layers", "embed")
    assert layer["mlp_post_norm"]["scale"] == ("layers", "embed")


# ----- 8 fake devices -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_results(family_checkpoints):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    dirs = [str(family_checkpoints[c]) for c in ("qwen3_untied_bias", "gemma3")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *dirs], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["model_type"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.slow  # a subprocess on 8 fake devices
@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_eight_devices_equal_one(sharded_results, model_type):
    """data=2 fsdp=2 tensor=2: logits, and prefill + decode through the sharded KV cache
    (which must keep each layer's window), equal the single-device forward."""
    r = sharded_results[model_type]
    # float32 sums split over devices in another order: 1e-5 of the largest logit (these
    # random checkpoints' logits reach about 2.6 (qwen3) and 5.3 (gemma3)).
    tol = 1e-5 * max(1.0, r["ref_max"])
    assert r["max_diff"] <= tol
    assert r["decode_diff"] <= tol
    assert r["logits_spec"] == "P(('data', 'fsdp'),)"  # a vocabulary of 97 stays whole
    assert r["specs"]["['layers']['attn']['q_kernel']"] == "P(None, 'fsdp', 'tensor', None)"
    assert r["specs"]["['layers']['attn']['q_norm']['scale']"] == "P(None, None)"


def test_saved_directory_is_a_complete_model_for_transformers(tmp_path):
    """`save_pretrained(..., tokenizer=fmt)` writes weights, tokenizer and chat template:
    `AutoTokenizer` and `AutoModelForCausalLM` load it, and jaxcai reads it back the same."""
    from hf_fixtures import qwen2_dir

    from jaxcai import chat
    from jaxcai.load import chat_format

    fmt = chat.load(qwen2_dir(tmp_path / "tok"))
    config = preset("qwen3-0.6b").replace(
        vocab_size=fmt.tokenizer.vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=24,
        d_ff=96,
        max_seq_len=128,
    )
    params = M.init_params(config, jax.random.key(3))
    out = tmp_path / "model"
    hf.save_pretrained(out, config, params, progress=False, tokenizer=fmt)
    messages = [{"role": "user", "content": "Hi there?"}]
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ref_ids == fmt.render(messages, add_generation_prompt=True)
    again = chat_format(out)
    assert again.kind == "template" and again.stop_ids == fmt.stop_ids
    ids = again.prompt_ids(messages)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits.numpy()
    ours = np.asarray(M.forward(config, params, jnp.asarray([ids])))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
