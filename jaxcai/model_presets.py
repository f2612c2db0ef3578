"""Preset constructors of `ModelConfig`: the published shapes of real checkpoints
(Llama-3, Qwen2.5, Mistral, Qwen3, Gemma-3 text) and of the repository's own test and
benchmark models. `ModelConfig` inherits them (`ModelConfig.tiny()`,
`ModelConfig.llama3_2_1b(...)`); `jaxcai.model_config.preset` looks them up by name.

A preset's `rope_scaling` is written as the mapping a YAML file or `config.json` holds;
`ModelConfig` turns it into a `RopeScaling`.
"""

from __future__ import annotations

from typing import Any, Self

__all__ = ["ModelPresets", "gemma3_layer_types"]


class ModelPresets:
    """Preset constructors mixed into `ModelConfig`: each returns `cls(**fields)` with the
    preset's fields, then any `overrides`."""

    @classmethod
    def tiny(cls, **overrides: Any) -> Self:
        """Two layers, 64 wide, GQA 4:2; fits the bundled 1024-piece tokenizer and CPU tests."""
        return cls(
            **{
                "vocab_size": 1024,
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "d_ff": 128,
                "max_seq_len": 256,
                "tie_embeddings": True,
                **overrides,
            }
        )

    @classmethod
    def small(cls, **overrides: Any) -> Self:
        """About 100M parameters (12 layers, 768 wide, tied 32k vocabulary)."""
        return cls(
            **{
                "vocab_size": 32_000,
                "d_model": 768,
                "n_layers": 12,
                "n_heads": 12,
                "n_kv_heads": 4,
                "d_ff": 2048,
                "max_seq_len": 2048,
                "rope_theta": 10_000.0,
                "tie_embeddings": True,
                **overrides,
            }
        )

    @classmethod
    def bench_ref(cls, **overrides: Any) -> Self:
        """The benchmarks' fixed reference workload: Llama architecture, vocab 8192, hidden
        512, 8 layers, 8 heads / 4 KV heads, MLP 1408, float32 (32.0M parameters); trained
        with full remat and 128-position logit chunks (benchmarks/README.md)."""
        return cls(
            **{
                "remat_policy": "full",
                "logits_chunk": 128,
                "vocab_size": 8192,
                "d_model": 512,
                "n_layers": 8,
                "n_heads": 8,
                "n_kv_heads": 4,
                "d_ff": 1408,
                "max_seq_len": 2048,
                "rope_theta": 10_000.0,
                "tie_embeddings": False,
                **overrides,
            }
        )

    @classmethod
    def llama3_2_1b(cls, **overrides: Any) -> Self:
        return cls(
            **{
                "vocab_size": 128_256,
                "d_model": 2048,
                "n_layers": 16,
                "n_heads": 32,
                "n_kv_heads": 8,
                "d_ff": 8192,
                "head_dim": 64,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500_000.0,
                "rope_scaling": {
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "max_seq_len": 131_072,
                "tie_embeddings": True,
                "model_type": "llama",
                **overrides,
            }
        )

    @classmethod
    def llama3_1_8b(cls, **overrides: Any) -> Self:
        return cls(
            **{
                "vocab_size": 128_256,
                "d_model": 4096,
                "n_layers": 32,
                "n_heads": 32,
                "n_kv_heads": 8,
                "d_ff": 14_336,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500_000.0,
                "rope_scaling": {
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "max_seq_len": 131_072,
                "model_type": "llama",
                **overrides,
            }
        )

    @classmethod
    def qwen2_5_0_5b(cls, **overrides: Any) -> Self:
        return cls(
            **{
                "vocab_size": 151_936,
                "d_model": 896,
                "n_layers": 24,
                "n_heads": 14,
                "n_kv_heads": 2,
                "d_ff": 4864,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1_000_000.0,
                "max_seq_len": 32_768,
                "tie_embeddings": True,
                "qkv_bias": True,
                "model_type": "qwen2",
                **overrides,
            }
        )

    @classmethod
    def qwen2_5_7b(cls, **overrides: Any) -> Self:
        return cls(
            **{
                "vocab_size": 152_064,
                "d_model": 3584,
                "n_layers": 28,
                "n_heads": 28,
                "n_kv_heads": 4,
                "d_ff": 18_944,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1_000_000.0,
                "max_seq_len": 32_768,
                "qkv_bias": True,
                "model_type": "qwen2",
                **overrides,
            }
        )

    @classmethod
    def mistral_7b(cls, **overrides: Any) -> Self:
        """Mistral-7B-v0.1: 4096-token sliding-window attention."""
        return cls(
            **{
                "vocab_size": 32_000,
                "d_model": 4096,
                "n_layers": 32,
                "n_heads": 32,
                "n_kv_heads": 8,
                "d_ff": 14_336,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10_000.0,
                "max_seq_len": 32_768,
                "sliding_window": 4096,
                "model_type": "mistral",
                **overrides,
            }
        )

    @classmethod
    def _qwen3(cls, **values: Any) -> Self:
        """Qwen3 dense models: q/k norms, head_dim 128, no biases, 40960 positions."""
        return cls(
            **{
                "vocab_size": 151_936,
                "head_dim": 128,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1_000_000.0,
                "max_seq_len": 40_960,
                "qk_norm": True,
                "model_type": "qwen3",
                **values,
            }
        )

    @classmethod
    def qwen3_0_6b(cls, **overrides: Any) -> Self:
        return cls._qwen3(
            **{"d_model": 1024, "n_layers": 28, "n_heads": 16, "n_kv_heads": 8, "d_ff": 3072},
            tie_embeddings=True,
            **overrides,
        )

    @classmethod
    def qwen3_1_7b(cls, **overrides: Any) -> Self:
        return cls._qwen3(
            **{"d_model": 2048, "n_layers": 28, "n_heads": 16, "n_kv_heads": 8, "d_ff": 6144},
            tie_embeddings=True,
            **overrides,
        )

    @classmethod
    def qwen3_4b(cls, **overrides: Any) -> Self:
        return cls._qwen3(
            **{"d_model": 2560, "n_layers": 36, "n_heads": 32, "n_kv_heads": 8, "d_ff": 9728},
            tie_embeddings=True,
            **overrides,
        )

    @classmethod
    def qwen3_8b(cls, **overrides: Any) -> Self:
        return cls._qwen3(
            **{"d_model": 4096, "n_layers": 36, "n_heads": 32, "n_kv_heads": 8, "d_ff": 12_288},
            tie_embeddings=False,
            **overrides,
        )

    @classmethod
    def _gemma3(cls, **values: Any) -> Self:
        """Gemma-3 text: (1 + w) norms before and after attention and MLP, q/k norms, GeGLU,
        scaled embeddings, five sliding-window layers to one global layer."""
        n_layers = values["n_layers"]
        return cls(
            **{
                "head_dim": 256,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1_000_000.0,
                "rope_local_theta": 10_000.0,
                "tie_embeddings": True,
                "layer_types": gemma3_layer_types(n_layers),
                "qk_norm": True,
                "norm_style": "gemma",
                "post_norms": True,
                "mlp_activation": "gelu_tanh",
                "embed_scale": True,
                "query_pre_attn_scalar": 256.0,
                "model_type": "gemma3_text",
                **values,
            }
        )

    @classmethod
    def gemma3_1b(cls, **overrides: Any) -> Self:
        """Gemma-3-1B (text only): 512-token windows, 32k positions."""
        return cls._gemma3(
            **{
                "vocab_size": 262_144,
                "d_model": 1152,
                "n_layers": 26,
                "n_heads": 4,
                "n_kv_heads": 1,
                "d_ff": 6912,
                "sliding_window": 512,
                "max_seq_len": 32_768,
                **overrides,
            }
        )

    @classmethod
    def gemma3_4b(cls, **overrides: Any) -> Self:
        """Gemma-3-4B's text tower: 1024-token windows, 128k positions by linear RoPE
        scaling (factor 8) of the global layers."""
        return cls._gemma3(
            **{
                "vocab_size": 262_208,
                "d_model": 2560,
                "n_layers": 34,
                "n_heads": 8,
                "n_kv_heads": 4,
                "d_ff": 10_240,
                "sliding_window": 1024,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "max_seq_len": 131_072,
                **overrides,
            }
        )


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma-3's interleaving (`sliding_window_pattern` in Hugging Face): every
    `pattern`-th layer is global, the rest slide."""
    return tuple(
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
    )
