"""Hugging Face checkpoints (Llama, Mistral, Qwen2) <-> `(ModelConfig, params)`.

Reads `config.json` and `*.safetensors` (single file or sharded with an index) without
torch, one tensor at a time: each parameter is assembled on the host (all layers of it
when layers are scanned), placed on its devices and dropped before the next, so peak host
memory stays near one copy of the weights. Pickled `*.bin` checkpoints are refused.
"""

from __future__ import annotations

import contextlib
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
from jaxcai.model_config import ModelConfig, RopeScaling
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
}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as the model it claims to be."""


# ----- config ---------------------------------------------------------------------------


def config_from_hf(
    hf: dict[str, Any], *, source: str = "config.json", **overrides: Any
) -> ModelConfig:
    """Translate a Hugging Face `config.json` dict; `overrides` set ModelConfig fields."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in hf:
            raise CheckpointError(f"{source}: missing field {key!r}")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported (supported: default, llama3)"
        )
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: Qwen2 per-layer sliding windows are not supported")
    n_heads = need("num_attention_heads")
    attention_bias = bool(hf.get("attention_bias", False))
    values = dict(
        vocab_size=need("vocab_size"),
        d_model=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
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
        model_type=model_type,
    )
    values.update(overrides)
    return ModelConfig(**values)


def config_to_hf(config: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """A `config.json` dict that `transformers` loads as the matching *ForCausalLM."""
    if config.model_type == "mistral" and (config.qkv_bias or config.out_bias or config.mlp_bias):
        raise CheckpointError("Mistral checkpoints have no biases; save as model_type=llama")
    if config.model_type == "qwen2" and (not config.qkv_bias or config.out_bias or config.mlp_bias):
        raise CheckpointError("Qwen2 has exactly q/k/v biases; save as model_type=llama")
    if config.model_type == "llama" and config.qkv_bias != config.out_bias:
        raise CheckpointError(
            "Llama biases cover q, k, v and o together; save q/k/v-only biases as model_type=qwen2"
        )
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    if config.model_type == "llama":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = config.mlp_bias
    if config.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    elif config.sliding_window is not None:
        raise CheckpointError(
            f"sliding_window is only saved for model_type=mistral, not {config.model_type}"
        )
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
    return hf


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
    ("embed",): ("model.embed_tokens.weight", "plain"),
    ("final_norm", "scale"): ("model.norm.weight", "plain"),
    ("lm_head",): ("lm_head.weight", "in_proj"),
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
    ("attn_norm", "scale"): ("input_layernorm.weight", "plain"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "plain"),
}


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "in_proj":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "out_proj":
        return (shape[-1], int(np.prod(shape[:-1])))
    if kind == "flat":
        return (int(np.prod(shape)),)
    return tuple(shape)


def _entries(config: ModelConfig) -> Iterator[tuple[tuple[str, ...], Any, list[str], str]]:
    """(our path, our shape-dtype, HF tensor names (one per layer if stacked), kind)."""
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for keypath, sd in flat:
        path = tuple(k.key for k in keypath)
        if path in _TOP:
            name, kind = _TOP[path]
            yield path, sd, [name], kind
        elif path[0] == "layers":
            name, kind = _LAYER[path[1:]]
            yield path, sd, [f"model.layers.{i}.{name}" for i in range(config.n_layers)], kind
        else:  # layers_{i}, unscanned
            i = int(path[0].removeprefix("layers_"))
            name, kind = _LAYER[path[1:]]
            yield path, sd, [f"model.layers.{i}.{name}"], kind


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
    entries = list(_entries(config))
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
) -> None:
    """Write params as a Hugging Face checkpoint that `transformers` loads.

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
