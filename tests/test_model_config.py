"""`ModelConfig`: YAML presets, parameter and FLOP counts, validation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import pytest
import yaml

from jaxcai.config import compose, model_config
from jaxcai.model import init_params
from jaxcai.model_config import (
    PRESETS,
    ModelConfig,
    RopeScaling,
    flops_per_token,
    gemma3_layer_types,
    param_count,
    preset,
)

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
YAML_FILES = sorted(MODEL_CONFIGS.glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ----- presets --------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_yaml_preset_equals_python_preset(path):
    values = _load_yaml(path)
    name = values["name"]
    assert name == path.stem
    config = ModelConfig.from_dict(values)
    assert config == preset(name)
    assert config.to_dict() == preset(name).to_dict()


def test_every_python_preset_has_a_yaml_file():
    yaml_names = {_load_yaml(p)["name"] for p in YAML_FILES}
    assert set(PRESETS) <= yaml_names
    assert len(YAML_FILES) == len(yaml_names)


def test_yaml_lists_every_field():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for path in YAML_FILES:
        assert set(_load_yaml(path)) - {"name"} == fields, path.name


def test_from_dict_builds_rope_scaling():
    config = ModelConfig.from_dict(_load_yaml(MODEL_CONFIGS / "llama3.2-1b.yaml"))
    assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    gemma = ModelConfig.from_dict(_load_yaml(MODEL_CONFIGS / "gemma3-4b.yaml"))
    assert gemma.rope_scaling == RopeScaling(8.0, rope_type="linear")
    assert isinstance(gemma.layer_types, tuple) and hash(gemma) == hash(preset("gemma3-4b"))


@pytest.mark.parametrize("name", ["qwen3-0.6b", "gemma3-1b", "gemma3-4b"])
def test_hydra_composes_the_new_presets(name):
    cfg = compose([f"model={name}", "model.dtype=bfloat16"])
    assert model_config(cfg.model) == preset(name, dtype="bfloat16")


def test_gemma3_presets_interleave_five_sliding_layers_per_global_one():
    for name, n_layers, window in [("gemma3-1b", 26, 512), ("gemma3-4b", 34, 1024)]:
        config = preset(name)
        assert config.layer_types == gemma3_layer_types(n_layers)
        globals_ = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
        assert globals_ == list(range(5, n_layers, 6))
        assert config.layer_windows == tuple(
            None if i in globals_ else window for i in range(n_layers)
        )


def test_preset_overrides():
    config = preset("tiny", n_layers=3, dtype="bfloat16")
    assert config.n_layers == 3
    assert config.dtype == "bfloat16"
    assert config.replace(n_layers=2, dtype="float32") == preset("tiny")


def test_config_is_hashable():
    assert hash(preset("tiny")) == hash(preset("tiny"))
    assert preset("tiny") != preset("tiny", n_layers=3)


# ----- parameter counts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("llama3.2-1b", 1.236e9),
        ("llama3.1-8b", 8.030e9),
        ("qwen2.5-0.5b", 0.494e9),
        ("qwen2.5-7b", 7.616e9),
        ("mistral-7b", 7.242e9),
        ("gemma3-1b", 0.99989e9),
    ],
)
def test_param_count_matches_published(name, published):
    assert param_count(preset(name)) == pytest.approx(published, rel=5e-3)


@pytest.mark.parametrize(
    ("name", "total", "non_embedding"),
    [  # the model cards' figures, given to two or three digits
        ("qwen3-0.6b", 0.6e9, 0.44e9),
        ("qwen3-1.7b", 1.7e9, 1.4e9),
        ("qwen3-4b", 4.0e9, 3.6e9),
        ("qwen3-8b", 8.2e9, 6.95e9),
    ],
)
def test_qwen3_param_counts_match_model_cards(name, total, non_embedding):
    config = preset(name)
    embeddings = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    assert param_count(config) == pytest.approx(total, rel=0.03)
    assert param_count(config) - embeddings == pytest.approx(non_embedding, rel=0.01)


def test_small_is_about_100m():
    assert 80e6 <= param_count(preset("small")) <= 130e6


def _n_elements(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _init_shapes(config: ModelConfig):
    """The shapes `init_params` returns, traced without allocating or compiling."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def test_param_count_of_tiny_equals_init_params():
    config = preset("tiny")
    params = init_params(config, jax.random.key(0))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == param_count(config)
    assert _n_elements(_init_shapes(config)) == param_count(config)


TINY_VARIANTS = {
    "tiny": {},
    "qkv_bias": dict(qkv_bias=True),
    "all_biases": dict(qkv_bias=True, out_bias=True, mlp_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "untied": dict(tie_embeddings=False),
    "head_dim": dict(head_dim=24),
    "head_dim_untied_biases": dict(head_dim=8, tie_embeddings=False, qkv_bias=True),
    "unscanned": dict(scan_layers=False, n_layers=3),
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "qk_norm": dict(qk_norm=True, head_dim=24),
    "gemma3": dict(
        qk_norm=True,
        norm_style="gemma",
        post_norms=True,
        mlp_activation="gelu_tanh",
        embed_scale=True,
        layer_types=("sliding_attention", "full_attention"),
        sliding_window=4,
    ),
    "gemma3_unscanned_untied": dict(
        qk_norm=True, post_norms=True, scan_layers=False, tie_embeddings=False, head_dim=8
    ),
}


@pytest.mark.parametrize("overrides", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_param_count_of_variants_equals_init_params(overrides):
    config = preset("tiny", **overrides)
    assert _n_elements(_init_shapes(config)) == param_count(config)


# ----- FLOPs ----------------------------------------------------------------------------


def _expected_flops(config: ModelConfig, seq_len: int) -> float:
    """6 * (every parameter but the input embedding, plus the output projection) + attention."""
    shapes = _init_shapes(config)
    embed = math.prod(shapes["embed"].shape)
    assert embed == config.vocab_size * config.d_model
    untied_head = math.prod(shapes["lm_head"].shape) if "lm_head" in shapes else 0
    assert untied_head == (0 if config.tie_embeddings else embed)
    # A tied output projection reuses the table, so it is added back as a matmul.
    n_matmul = _n_elements(shapes) - embed + (embed if config.tie_embeddings else 0)
    attention = 6 * config.n_layers * seq_len * config.n_heads * config.head_dim
    return 6 * n_matmul + attention


@pytest.mark.parametrize(
    "config",
    [
        preset("tiny"),
        preset("tiny", tie_embeddings=False),
        preset("tiny", head_dim=24, qkv_bias=True, tie_embeddings=False),
        preset("small", n_layers=2),
    ],
    ids=["tied", "untied", "head_dim_bias_untied", "small2"],
)
@pytest.mark.parametrize("seq_len", [1, 128, 2048])
def test_flops_per_token(config, seq_len):
    assert flops_per_token(config, seq_len) == pytest.approx(
        _expected_flops(config, seq_len), rel=1e-12
    )


def test_flops_of_sliding_window_layers():
    """A layer with window w < seq_len attends to w - w^2 / (2 seq_len) keys per query on
    average (seq_len / 2 without a window): Gemma-3's local layers cost far less."""
    base = preset("tiny", n_layers=3)
    windowed = base.replace(
        layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=64
    )
    n, h = base.n_heads, base.head_dim
    for seq_len in (32, 64, 1024):
        keys = 2 * (seq_len / 2 if seq_len <= 64 else 64 - 64**2 / (2 * seq_len)) + seq_len / 2
        expected = flops_per_token(base, seq_len) - 6 * 3 * seq_len * n * h + 12 * keys * n * h
        assert flops_per_token(windowed, seq_len) == pytest.approx(expected, rel=1e-12)
    # Mistral's window covers every layer alike.
    mistral = base.replace(sliding_window=64)
    assert flops_per_token(mistral, 64) == flops_per_token(base, 64)
    assert flops_per_token(mistral, 4096) < flops_per_token(base, 4096)


def test_flops_tied_and_untied_agree():
    # The output projection is a matmul whether or not it shares the embedding table.
    tied, untied = preset("small"), preset("small", tie_embeddings=False)
    assert flops_per_token(tied, 512) == flops_per_token(untied, 512)
    assert param_count(untied) - param_count(tied) == 32_000 * 768


def test_flops_attention_term_grows_with_seq_len():
    config = preset("llama3.2-1b")
    delta = flops_per_token(config, 2048) - flops_per_token(config, 1024)
    assert delta == 6 * 16 * 1024 * 32 * 64


# ----- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (dict(n_kv_heads=3), ["n_kv_heads=3", "n_heads=4"]),
        (dict(n_heads=4, n_kv_heads=8), ["n_kv_heads=8"]),
        (dict(head_dim=15), ["head_dim", "15"]),
        (dict(d_model=60), ["head_dim", "15"]),
        (dict(d_model=66), ["d_model=66", "n_heads=4"]),
        (dict(remat_policy="sometimes"), ["remat_policy", "sometimes"]),
        (dict(attention_impl="flash"), ["attention_impl", "flash"]),
        (dict(model_type="gpt2"), ["model_type", "gpt2"]),
        (dict(dtype="float33"), ["dtype", "float33"]),
        (dict(param_dtype="not_a_dtype"), ["param_dtype", "not_a_dtype"]),
        (dict(vocab_size=0), ["vocab_size", "0"]),
        (dict(n_layers=-1), ["n_layers", "-1"]),
        (dict(sliding_window=0), ["sliding_window"]),
        (dict(layer_types=("full_attention",)), ["layer_types", "1 entries", "n_layers=2"]),
        (dict(layer_types=("local", "full_attention")), ["layer_types", "local"]),
        (dict(layer_types=("sliding_attention",) * 2), ["sliding_window is None"]),
        (dict(norm_style="t5"), ["norm_style", "t5"]),
        (dict(mlp_activation="relu"), ["mlp_activation", "relu"]),
        (dict(rope_local_theta=0.0), ["rope_local_theta"]),
        (dict(query_pre_attn_scalar=-1.0), ["query_pre_attn_scalar"]),
        (dict(logits_chunk=-2), ["logits_chunk", "-2", "auto"]),
        (dict(rope_scaling=dict(factor=8.0, rope_type="linear", low_freq_factor=1.0)), ["linear"]),
        (dict(rope_scaling=dict(factor=8.0)), ["llama3", "low_freq_factor"]),
        (dict(rope_scaling=dict(factor=8.0, rope_type="yarn")), ["rope_type", "yarn"]),
    ],
)
def test_invalid_field_raises(overrides, needles):
    # Built directly (not via `preset(..., **overrides)`) so head_dim is derived afresh.
    values = dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    with pytest.raises(ValueError) as info:
        ModelConfig(**values | overrides)
    for needle in needles:
        assert needle in str(info.value)


def test_from_dict_unknown_field_raises():
    values = preset("tiny").to_dict() | {"n_experts": 8}
    with pytest.raises(ValueError, match="n_experts"):
        ModelConfig.from_dict(values)


def test_from_dict_ignores_name_and_target():
    values = preset("tiny").to_dict() | {"name": "tiny", "_target_": "x.y"}
    assert ModelConfig.from_dict(values) == preset("tiny")


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="llama9"):
        preset("llama9")
