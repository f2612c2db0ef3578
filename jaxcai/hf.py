"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text) <->
`(ModelConfig, params)`.

Both `config.json` layouts are read: the older one (`torch_dtype`, top-level `rope_theta`
and `rope_scaling`, Gemma-3's `rope_local_base_freq` and `sliding_window_pattern`) and the
transformers-5 one (`dtype`, `rope_parameters`, per layer type for Gemma-3, and
`layer_types`). A multimodal Gemma-3 checkpoint (`model_type: gemma3`) loads as its text
tower; saving always writes a text-only `*ForCausalLM`.

Reads `config.json` and `*.safetensors` (single file or sharded with an index) without
torch, one tensor at a time: each parameter is assembled on the host (all layers of it
when layers are scanned), placed on its devices and dropped before the next, so peak host
memory stays near one copy of the weights. Pickled `*.bin` checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxcai.model import param_shapes, param_shardings
from jaxcai.model_config import LAYER_TYPES, ModelConfig, RopeScaling, gemma3_layer_types
from jaxcai.sharding import DEFAULT_RULES, Rules

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_pretrained",
    "save_pretrained",
]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
MULTIMODAL = {"gemma3": "gemma3_text"}  # config.json types whose text tower is read
INDEX_FILE = "model.safetensors.index.json"
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


# ----- config ---------------------------------------------------------------------------


def config_from_hf(
    hf: dict[str, Any], *, source: str = "config.json", **overrides: Any
) -> ModelConfig:
    """Translate a Hugging Face `config.json` dict; `overrides` set ModelConfig fields."""
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
    gemma = model_type == "gemma3_text"
    if gemma:
        hf = {**_GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if model_type == "qwen3" and hf.get("head_dim") is None:
        hf = {**hf, "head_dim": 128}  # Qwen3Config's default, not hidden_size / heads

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


# ----- tensor name mapping --------------------------------------------------------------
# Each parameter maps to one Hugging Face tensor; torch Linear weights are [out, in].


def _to_ours(kind: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind in ("in_proj", "out_proj"):  # [out, in] -> [in, out...]
        return a.T.reshape(shape)
    return a.reshape(shape)


def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "in_proj":  # [D, N, H] or [D, F] -> [N*H or F, D]
        return a.reshape(a.shape[0], -1).T
    if kind == "out_proj":  # [N, H, D] or [F, D] -> [D, N*H or F]
        return a.reshape(-1, a.shape[-1]).T
    if kind == "flat":  # [N, H] bias -> [N*H]
        return a.reshape(-1)
    return a


_TOP = {
    ("embed",): ("embed_tokens.weight", "plain"),
    ("final_norm", "scale"): ("norm.weight", "plain"),
}
_LAYER = {
    ("attn", "q_kernel"): ("self_attn.q_proj.weight", "in_proj"),
    ("attn", "k_kernel"): ("self_attn.k_proj.weight", "in_proj"),
    ("attn", "v_kernel"): ("self_attn.v_proj.weight", "in_proj"),
    ("attn", "o_kernel"): ("self_attn.o_proj.weight", "out_proj"),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "flat"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "flat"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "flat"),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", "plain"),
    ("mlp", "gate_kernel"): ("mlp.gate_proj.weight", "in_proj"),
    ("mlp", "up_kernel"): ("mlp.up_proj.weight", "in_proj"),
    ("mlp", "down_kernel"): ("mlp.down_proj.weight", "out_proj"),
    ("mlp", "gate_bias"): ("mlp.gate_proj.bias", "plain"),
    ("mlp", "up_bias"): ("mlp.up_proj.bias", "plain"),
    ("mlp", "down_bias"): ("mlp.down_proj.bias", "plain"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "plain"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "plain"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "plain"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "plain"),
}
# Gemma-3 norms both sides of attention and MLP; its `post_attention_layernorm` is the
# attention output's norm, and the MLP's input norm is `pre_feedforward_layernorm`.
_POST_NORM_LAYER = {
    **_LAYER,
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "plain"),
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", "plain"),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", "plain"),
}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a checkpoint keeps the decoder's tensors: `{prefix}layers.{i}....` and the
    untied output projection `head`."""

    prefix: str = "model."
    head: str = "lm_head.weight"


CAUSAL_LM = _Layout()
# Multimodal Gemma-3: the text tower as transformers >= 4.52 holds it in memory, and as
# the hub checkpoints (and transformers' own save) name it.
_LAYOUTS = (
    CAUSAL_LM,
    _Layout("model.language_model.", "lm_head.weight"),
    _Layout("language_model.model.", "language_model.lm_head.weight"),
)


def _layout(weight_map: dict[str, Any]) -> _Layout:
    """The layout whose embedding table the checkpoint holds (else the plain one, so a
    missing tensor is reported by its usual name)."""
    for layout in _LAYOUTS:
        if f"{layout.prefix}embed_tokens.weight" in weight_map:
            return layout
    return CAUSAL_LM


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "in_proj":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "out_proj":
        return (shape[-1], int(np.prod(shape[:-1])))
    if kind == "flat":
        return (int(np.prod(shape)),)
    return tuple(shape)


def _entries(
    config: ModelConfig, layout: _Layout = CAUSAL_LM
) -> Iterator[tuple[tuple[str, ...], Any, list[str], str]]:
    """(our path, our shape-dtype, HF tensor names (one per layer if stacked), kind)."""
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    layer_names = _POST_NORM_LAYER if config.post_norms else _LAYER
    p = layout.prefix
    for keypath, sd in flat:
        path = tuple(k.key for k in keypath)
        if path == ("lm_head",):
            yield path, sd, [layout.head], "in_proj"
        elif path in _TOP:
            name, kind = _TOP[path]
            yield path, sd, [f"{p}{name}"], kind
        elif path[0] == "layers":
            name, kind = layer_names[path[1:]]
            yield path, sd, [f"{p}layers.{i}.{name}" for i in range(config.n_layers)], kind
        else:  # layers_{i}, unscanned
            i = int(path[0].removeprefix("layers_"))
            name, kind = layer_names[path[1:]]
            yield path, sd, [f"{p}layers.{i}.{name}"], kind


# ----- loading --------------------------------------------------------------------------


def _weight_map(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" (found {pickled}: pickled weights are never loaded; convert to safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    out = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                out.update(dict.fromkeys(f.keys(), file))  # noqa: SIM118 (no dict)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from e
    return out


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    progress: bool = True,
    **overrides: Any,
) -> tuple[ModelConfig, dict]:
    """Load a local Hugging Face checkpoint directory into `(ModelConfig, params)`.

    `overrides` set ModelConfig fields (e.g. `param_dtype="bfloat16"`, `scan_layers=False`).
    With `mesh`, each parameter is placed directly in its shards following `rules`.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint?)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON ({e})") from e
    config = config_from_hf(hf, source=str(config_file), **overrides)
    weight_map = _weight_map(path)
    shardings = param_shardings(config, mesh, rules) if mesh is not None else None
    flat_shardings = dict(_flat_paths(shardings)) if shardings is not None else {}

    used: set[str] = set()
    leaves: dict[tuple[str, ...], jax.Array] = {}
    entries = list(_entries(config, _layout(weight_map)))
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> tuple[np.ndarray, Path]:
            if name not in weight_map:
                raise CheckpointError(f"{path}: missing tensor {name!r}")
            file = weight_map[name]
            if file not in handles:
                if not file.exists():
                    raise CheckpointError(f"{file}: listed in the index but missing")
                handles[file] = stack.enter_context(safe_open(file, framework="np"))
            try:
                return handles[file].get_tensor(name), file
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e

        for our_path, sd, names, kind in tqdm(
            entries, desc=f"loading {path.name}", disable=not progress, unit="param"
        ):
            stacked = our_path[0] == "layers"
            per_layer = tuple(sd.shape[1:]) if stacked else tuple(sd.shape)
            expected = _hf_shape(kind, per_layer)
            host = np.empty(sd.shape, dtype=sd.dtype) if stacked else None
            for i, name in enumerate(names):
                tensor, file = read(name)
                if tuple(tensor.shape) != expected:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                        f"{expected} for {config.model_type} with this config.json"
                    )
                value = _to_ours(kind, tensor, per_layer).astype(sd.dtype, copy=False)
                if stacked:
                    host[i] = value
                else:
                    host = value  # one tensor: no second host copy
                used.add(name)
            leaves[our_path] = _place(host, flat_shardings.get(our_path))
            del host
    unused = sorted(set(weight_map) - used)
    if unused:
        log.warning(
            "%s: %d tensors not used by the model: %s",
            path,
            len(unused),
            ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""),
        )
    return config, _unflatten(leaves)


def _flat_paths(tree: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield tuple(k.key for k in keypath), leaf


def _unflatten(leaves: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, leaf in leaves.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


# ----- saving ---------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    path: str | os.PathLike,
    config: ModelConfig,
    params: dict,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
    tokenizer: Any = None,
) -> None:
    """Write params as a Hugging Face checkpoint that `transformers` loads.

    With `tokenizer` (a `jaxcai.tokenizer.Tokenizer`, or a `jaxcai.chat.ChatFormat`), its
    files and chat template go beside the weights, so the directory is a complete model
    that `AutoTokenizer` and `AutoModelForCausalLM` load.

    Tensors are converted one at a time and written in shards of at most
    `max_shard_bytes` (with `model.safetensors.index.json` when there is more than one).
    `dtype` (default: `config.param_dtype`) is the stored dtype. In a multi-host run every
    process must call this; only process 0 writes. LoRA adapters are merged into the
    kernels they adapt (`lora.merge`), so the directory holds a plain model.
    """
    from jaxcai import lora

    path = Path(path)
    config, params = lora.merge(config, params)  # LoRA adapters fold into their kernels
    dtype = np.dtype(jax.numpy.dtype(dtype or config.param_dtype))
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        dtype.name
    )
    if torch_dtype is None:
        raise ValueError(f"save_pretrained: unsupported dtype {dtype.name}")
    flat = dict(_flat_paths(params))
    expected = {p for p, *_ in _entries(config)}
    if set(flat) != expected:
        raise ValueError(
            "save_pretrained: params do not match the config; missing "
            f"{sorted(expected - set(flat))[:5]}, unexpected {sorted(set(flat) - expected)[:5]}"
        )

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for our_path, _, names, kind in _entries(config):
            host = _to_host(flat[our_path])  # every process joins the gather
            stacked = our_path[0] == "layers"
            for i, name in enumerate(names):
                value = host[i] if stacked else host
                yield name, np.ascontiguousarray(_to_hf(kind, value).astype(dtype))

    plan: list[list[str]] = [[]]  # tensor names per shard, from the shapes alone
    size = 0
    for _, sd, names, _ in _entries(config):
        nbytes = int(np.prod(sd.shape)) * dtype.itemsize // len(names)
        for name in names:
            if plan[-1] and size + nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nbytes
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    n = len(plan)
    weight_map = {}
    stream = tensors()
    bar = tqdm(
        total=sum(len(s) for s in plan),
        desc=f"saving {path.name}",
        disable=not progress or not writer,
        unit="tensor",
    )
    for k, shard in enumerate(plan, start=1):
        file = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        arrays = {}
        for name in shard:
            streamed, arrays[name] = next(stream)
            assert streamed == name, (streamed, name)
            weight_map[name] = file
            bar.update()
        if writer:
            save_file(arrays, str(path / file), metadata={"format": "pt"})
        del arrays
    bar.close()
    if not writer:
        return
    if n > 1:
        total = sum((path / f).stat().st_size for f in set(weight_map.values()))
        (path / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(config_to_hf(config, torch_dtype), indent=2))
    if tokenizer is not None:
        getattr(tokenizer, "tokenizer", tokenizer).save(path)
