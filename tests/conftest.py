"""Shared fixtures: tiny randomly initialised Hugging Face reference models."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Bundled and raw data files are prepared into this cache (shared by subprocesses).
os.environ.setdefault("JAXCAI_CACHE", tempfile.mkdtemp(prefix="jaxcai-test-cache-"))

import numpy as np
import pytest


def _randomize(model, seed: int) -> None:
    """Give every weight (biases and norm scales too) a distinctive random value."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.08
            p.copy_(1.0 + noise if "norm" in name else noise)


HF_CASES = {
    "llama_gqa_rope3": dict(
        cls="LlamaForCausalLM",
        kwargs=dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500_000.0,
        ),
    ),
    "llama_tied": dict(
        cls="LlamaForCausalLM", kwargs=dict(num_key_value_heads=4, tie_word_embeddings=True)
    ),
    "llama_biases": dict(
        cls="LlamaForCausalLM",
        kwargs=dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    ),
    "qwen2": dict(
        cls="Qwen2ForCausalLM",
        kwargs=dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0),
    ),
    "mistral_window": dict(
        cls="MistralForCausalLM", kwargs=dict(num_key_value_heads=2, sliding_window=5, head_dim=24)
    ),
    # Qwen3: q/k norms, head_dim != hidden / heads.
    "qwen3": dict(
        cls="Qwen3ForCausalLM",
        kwargs=dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    ),
    "qwen3_untied_bias": dict(
        cls="Qwen3ForCausalLM",
        kwargs=dict(
            num_key_value_heads=2,
            head_dim=24,
            tie_word_embeddings=False,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        ),
    ),
    # Gemma-3: sliding (window 4 < the tests' 16 tokens) and global layers with their own
    # RoPE bases, a query scale that is not head_dim.
    "gemma3": dict(
        cls="Gemma3ForCausalLM",
        kwargs=dict(
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=4,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
    # The older layout: pattern, top-level bases, linear scaling of the global layers; an
    # untied head and final logit soft-capping.
    "gemma3_scaled": dict(
        cls="Gemma3ForCausalLM",
        kwargs=dict(
            num_hidden_layers=3,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=32,
            sliding_window=5,
            sliding_window_pattern=2,
            rope_theta=50_000.0,
            rope_local_base_freq=300.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            tie_word_embeddings=False,
            final_logit_softcapping=3.0,
        ),
    ),
}


def make_hf_model(case: str, seed: int = 0):
    """A tiny random `transformers` model of the named case, float32, eager attention."""
    import torch
    import transformers

    spec = HF_CASES[case]
    cls = getattr(transformers, spec["cls"])
    config_cls = cls.config_class
    defaults = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    config = config_cls(**{**defaults, **spec["kwargs"]})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, seed)
    return model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
