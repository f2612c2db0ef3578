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
}


def make_hf_model(case: str, seed: int = 0):
    """A tiny random `transformers` model of the named case, float32, eager attention."""
    import torch
    import transformers

    spec = HF_CASES[case]
    cls = getattr(transformers, spec["cls"])
    config_cls = cls.config_class
    config = config_cls(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        **spec["kwargs"],
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, seed)
    return model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
