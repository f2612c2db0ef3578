"""Hugging Face `config.json` <-> `ModelConfig` (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text).

Both `config.json` layouts are read: the older one (`torch_dtype`, top-level `rope_theta`
and `rope_scaling`, Gemma-3's `rope_local_base_freq` and `sliding_window_pattern`) and the
transformers-5 one (`dtype`, `rope_parameters`, per layer type for Gemma-3, and
`layer_types`). A multimodal Gemma-3 checkpoint (`model_type: gemma3`) reads as its text
tower; writing always gives a text-only `*ForCausalLM`, and refuses a config that
architecture would compute differently. `CheckpointError`, what every unreadable
checkpoint raises (`jaxcai.hf` too), is defined here.
"""

from __future__ import annotations

from typing import Any

from jaxcai.model_config import LAYER_TYPES, ModelConfig, RopeScaling, gemma3_layer_types

__all__ = ["ARCHITECTURES", "MULTIMODAL", "CheckpointError", "config_from_hf", "config_to_hf"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
MULTIMODAL = {"gemma3": "gemma3_text"}  # config.json types whose text tower is read
# Gemma3TextConfig's defaults, for the fields a config.json leaves out (the multimodal
# Gemma-3 checkpoints' `text_config` names only the fields that differ from them).
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> ours
_HF_ACTIVATIONS = {ours: name for name, ours in _ACTIVATIONS.items()}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as the model it claims to be."""


def config_from_hf(
    hf: dict[str, Any], *, source: str = "config.json", **overrides: Any
) -> ModelConfig:
    """Translate a Hugging Face `config.json` dict; `overrides` set ModelConfig fields.
    Without a `logits_chunk` override (or with -1) the training losses chunk the logits
    of a vocabulary over 32k (`model_config.auto_logits_chunk`: a Qwen3 checkpoint gets
    256 positions at a time)."""
    hf, model_type, source = _text_tower(hf, source)
    gemma = model_type == "gemma3_text"

    def need(key: str) -> Any:
        if key not in hf:
            raise CheckpointError(f"{source}: missing field {key!r}")
        return hf[key]

    act_key = "hidden_activation" if gemma else "hidden_act"
    act = hf.get(act_key) or hf.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: {act_key} {act!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
        )
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if hf.get(key):
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor is not supported")
    n_layers = need("num_hidden_layers")
    rope_theta, scaling, local_theta = _rope(hf, source, gemma)
    layer_types = _layer_types(hf, source, model_type, n_layers)
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise CheckpointError(
            f"{source}: {model_type} sliding-window layers (use_sliding_window) are not supported"
        )
    elif layer_types is not None and "sliding_attention" in layer_types:
        sliding = need("sliding_window")
    n_heads = need("num_attention_heads")
    attention_bias = bool(hf.get("attention_bias", False))
    softcap = hf.get("final_logit_softcapping")
    values = dict(
        vocab_size=need("vocab_size"),
        d_model=need("hidden_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=need("intermediate_size"),
        head_dim=hf.get("head_dim") or need("hidden_size") // n_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding,
        layer_types=layer_types,
        rope_local_theta=None if local_theta is None else float(local_theta),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_style="gemma" if gemma else "llama",
        post_norms=gemma,
        mlp_activation=_ACTIVATIONS[act],
        embed_scale=gemma,
        query_pre_attn_scalar=float(need("query_pre_attn_scalar")) if gemma else None,
        final_logit_softcap=None if softcap is None else float(softcap),
        model_type=model_type,
    )
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _text_tower(hf: dict[str, Any], source: str) -> tuple[dict[str, Any], str, str]:
    """(fields, model_type, source) of the decoder a `config.json` dict describes: a
    multimodal checkpoint's text tower, with Gemma-3's and Qwen3's defaults filled in; an
    unsupported model_type is a CheckpointError."""
    model_type = hf.get("model_type")
    if model_type in MULTIMODAL:  # read the text tower's config
        outer = hf
        hf = dict(hf.get("text_config") or {})
        hf.setdefault("model_type", MULTIMODAL[model_type])
        if "tie_word_embeddings" in outer:
            hf.setdefault("tie_word_embeddings", outer["tie_word_embeddings"])
        model_type = hf["model_type"]
        source = f"{source} (text_config)"
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {sorted([*ARCHITECTURES, *MULTIMODAL])}"
        )
    if model_type == "gemma3_text":
        hf = {**_GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if model_type == "qwen3" and hf.get("head_dim") is None:
        hf = {**hf, "head_dim": 128}  # Qwen3Config's default, not hidden_size / heads
    return hf, model_type, source


def _rope_scaling(rope: dict[str, Any], source: str) -> RopeScaling | None:
    """A Hugging Face rope-parameters dict's scaling (None for plain RoPE)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor is not supported")
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        return RopeScaling(
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    if rope_type == "linear":
        return RopeScaling(float(rope["factor"]), rope_type="linear")
    raise CheckpointError(
        f"{source}: rope type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def _rope(
    hf: dict[str, Any], source: str, gemma: bool
) -> tuple[float, RopeScaling | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_theta) from either layout: top-level
    `rope_theta` / `rope_scaling` (/ Gemma-3's `rope_local_base_freq`), or transformers-5
    `rope_parameters` (Gemma-3: one dict per layer type)."""
    params = hf.get("rope_parameters") or {}
    if not gemma:
        rope = dict(params or hf.get("rope_scaling") or {})
        return (
            hf.get("rope_theta", rope.get("rope_theta", 10_000.0)),
            _rope_scaling(rope, source),
            None,
        )
    if set(params) & set(LAYER_TYPES):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:  # older layout: rope_scaling applies to the global layers
        full, local = dict(params or hf.get("rope_scaling") or {}), {}
    if _rope_scaling(local, source) is not None:
        raise CheckpointError(
            f"{source}: RoPE scaling of sliding_attention layers is not supported"
        )
    theta = full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    return theta, _rope_scaling(full, source), local_theta


def _layer_types(
    hf: dict[str, Any], source: str, model_type: str, n_layers: int
) -> tuple[str, ...] | None:
    """Gemma-3's per-layer attention kinds (`layer_types`, or derived from the older
    `sliding_window_pattern`); other families must have none but global layers."""
    types = hf.get("layer_types")
    if model_type == "gemma3_text" and types is None:
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = gemma3_layer_types(n_layers, int(pattern))
    if types is None:
        return None
    types = tuple(types)
    if len(types) != n_layers or set(types) - set(LAYER_TYPES):
        raise CheckpointError(
            f"{source}: layer_types must list {n_layers} entries from {LAYER_TYPES}, got {types}"
        )
    if model_type == "gemma3_text":
        return types
    if set(types) != {"full_attention"}:
        raise CheckpointError(
            f"{source}: per-layer sliding windows (layer_types) are not supported for {model_type}"
        )
    return None


# What each family's modules are; saving a config that differs would change the model.
_FAMILY = {
    "llama": dict(qk_norm=False, norm_style="llama", post_norms=False, embed_scale=False),
    "qwen3": dict(qk_norm=True, norm_style="llama", post_norms=False, embed_scale=False),
    "gemma3_text": dict(qk_norm=True, norm_style="gemma", post_norms=True, embed_scale=True),
}


def _check_savable(config: ModelConfig) -> None:
    """Raise unless the *ForCausalLM of `config.model_type` computes what `config` does."""
    kind = config.model_type
    family = _FAMILY.get(kind, _FAMILY["llama"])
    wrong = sorted(k for k, v in family.items() if getattr(config, k) != v)
    if kind != "gemma3_text":
        if config.layer_types is not None:
            wrong.append("layer_types")
        if config.query_pre_attn_scalar not in (None, config.head_dim):
            wrong.append("query_pre_attn_scalar")
        if config.final_logit_softcap is not None:
            wrong.append("final_logit_softcap")
    if wrong:
        raise CheckpointError(
            f"model_type={kind} cannot express this config's {', '.join(wrong)}; "
            f"{ARCHITECTURES[kind]} has {family}"
        )
    if kind == "mistral" and (config.qkv_bias or config.out_bias or config.mlp_bias):
        raise CheckpointError("Mistral checkpoints have no biases; save as model_type=llama")
    if kind == "qwen2" and (not config.qkv_bias or config.out_bias or config.mlp_bias):
        raise CheckpointError("Qwen2 has exactly q/k/v biases; save as model_type=llama")
    if kind in ("llama", "qwen3", "gemma3_text") and config.qkv_bias != config.out_bias:
        raise CheckpointError(
            f"{ARCHITECTURES[kind]} biases cover q, k, v and o together; save q/k/v-only "
            "biases as model_type=qwen2"
        )
    if kind in ("qwen3", "gemma3_text") and config.mlp_bias:
        raise CheckpointError(f"{ARCHITECTURES[kind]} has no MLP biases")
    if kind not in ("mistral", "gemma3_text") and config.sliding_window is not None:
        raise CheckpointError(
            f"sliding_window is only saved for model_type=mistral or gemma3_text, not {kind}"
        )
    if kind != "gemma3_text" and config.rope_local_theta not in (None, config.rope_theta):
        raise CheckpointError(f"rope_local_theta is only saved for gemma3_text, not {kind}")


def _rope_scaling_to_hf(s: RopeScaling) -> dict[str, Any]:
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {
        "rope_type": "llama3",
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
    }


def config_to_hf(config: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """A `config.json` dict that `transformers` loads as the matching *ForCausalLM.

    Written in the older layout (top-level `rope_theta` and `rope_scaling`, `torch_dtype`),
    which transformers 4.x and 5 both read; Gemma-3 adds `rope_local_base_freq` and
    `layer_types`."""
    _check_savable(config)
    kind = config.model_type
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": _HF_ACTIVATIONS[config.mlp_activation],
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = _rope_scaling_to_hf(config.rope_scaling)
    if kind in ("llama", "qwen3", "gemma3_text"):
        hf["attention_bias"] = config.qkv_bias
    if kind == "llama":
        hf["mlp_bias"] = config.mlp_bias
    if kind == "mistral":
        hf["sliding_window"] = config.sliding_window
    if kind in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if kind == "gemma3_text":
        hf["hidden_activation"] = hf.pop("hidden_act")
        hf.update(_gemma3_layers(config))
        hf.update(
            query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar or config.head_dim),
            final_logit_softcapping=config.final_logit_softcap,
            attn_logit_softcapping=None,
        )
    return hf


def _int_if_whole(x: float) -> int | float:
    """Gemma3TextConfig types `query_pre_attn_scalar` as an int."""
    return int(x) if float(x).is_integer() else x


def _gemma3_layers(config: ModelConfig) -> dict[str, Any]:
    """Gemma-3's `layer_types`, `sliding_window` and `rope_local_base_freq`. Without
    `layer_types` every layer is alike: all global, or all sliding (transformers then
    rotates them by the local base, so that must be `rope_theta`, unscaled)."""
    types, local_theta = config.layer_types, config.rope_local_theta or config.rope_theta
    if types is None:
        sliding = config.sliding_window is not None
        if sliding and config.rope_scaling is not None:
            raise CheckpointError(
                "gemma3_text with a sliding window on every layer cannot scale RoPE; "
                "set layer_types"
            )
        types = ("sliding_attention" if sliding else "full_attention",) * config.n_layers
        local_theta = config.rope_theta
    return {
        "layer_types": list(types),
        "sliding_window": config.sliding_window,
        "rope_local_base_freq": local_theta,
    }
