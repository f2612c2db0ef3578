"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text) <->
`(ModelConfig, params)`: `load_pretrained` and `save_pretrained`.

`config.json` is translated by `jaxcai.hf_config` (`config_from_hf`, `config_to_hf`,
re-exported here); tensor names and layouts are `jaxcai.hf_tensors`.

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

from jaxcai.hf_config import (
    ARCHITECTURES,
    MULTIMODAL,
    CheckpointError,
    config_from_hf,
    config_to_hf,
)
from jaxcai.hf_tensors import (
    CAUSAL_LM,
    flat_paths,
    hf_shape,
    layout_of,
    param_entries,
    to_hf,
    to_ours,
    unflatten,
)
from jaxcai.model import param_shardings
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import DEFAULT_RULES, Rules

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_pretrained",
    "save_pretrained",
    # constants, re-exported from the modules that hold them
    "ARCHITECTURES",
    "CAUSAL_LM",
    "INDEX_FILE",
    "MULTIMODAL",
]

INDEX_FILE = "model.safetensors.index.json"


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
    flat_shardings = dict(flat_paths(shardings)) if shardings is not None else {}

    used: set[str] = set()
    leaves: dict[tuple[str, ...], jax.Array] = {}
    entries = list(param_entries(config, layout_of(weight_map)))
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
            expected = hf_shape(kind, per_layer)
            host = np.empty(sd.shape, dtype=sd.dtype) if stacked else None
            for i, name in enumerate(names):
                tensor, file = read(name)
                if tuple(tensor.shape) != expected:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                        f"{expected} for {config.model_type} with this config.json"
                    )
                value = to_ours(kind, tensor, per_layer).astype(sd.dtype, copy=False)
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
    return config, unflatten(leaves)


# ----- saving ---------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors(
    config: ModelConfig, flat: dict[tuple[str, ...], Any], dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in `dtype`) of every tensor, in `param_entries` order."""
    for our_path, _, names, kind in param_entries(config):
        host = _to_host(flat[our_path])  # every process joins the gather
        stacked = our_path[0] == "layers"
        for i, name in enumerate(names):
            value = host[i] if stacked else host
            yield name, np.ascontiguousarray(to_hf(kind, value).astype(dtype))


def _shard_plan(config: ModelConfig, dtype: np.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard file, from the shapes alone."""
    plan: list[list[str]] = [[]]
    size = 0
    for _, sd, names, _ in param_entries(config):
        nbytes = int(np.prod(sd.shape)) * dtype.itemsize // len(names)
        for name in names:
            if plan[-1] and size + nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nbytes
    return plan


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
    flat = dict(flat_paths(params))
    expected = {p for p, *_ in param_entries(config)}
    if set(flat) != expected:
        raise ValueError(
            "save_pretrained: params do not match the config; missing "
            f"{sorted(expected - set(flat))[:5]}, unexpected {sorted(set(flat) - expected)[:5]}"
        )

    plan = _shard_plan(config, dtype, max_shard_bytes)
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    n = len(plan)
    weight_map = {}
    stream = _hf_tensors(config, flat, dtype)
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
