"""LoRA adapters (Hu et al. 2021): which params train, fresh adapters, and folding them in.

A model config with `lora_rank > 0` gives every projection named in `lora_targets` two
extra params beside its kernel, `{name}_lora_a` `[in..., r]` and `{name}_lora_b`
`[r, out...]`, and the projection computes `x @ W + (alpha / r) * (x @ A) @ B`
(`jaxcai.layers.project`). B starts at zero, so a fresh adapter leaves the model
unchanged. When a params tree holds adapters, training updates only them (`split`): the
optimizer state covers the adapters alone and no gradient of a base weight is formed.

    config = config.replace(lora_rank=16, lora_alpha=32, lora_targets=("q", "v"))
    params = add_adapters(config, base_params, jax.random.key(0))
    ...train...
    config, params = merge(config, params)    # plain weights, for export or sampling

`adapters_off(params)` is the base model under the same LoRA config, without a copy of
the base: DPO's in-step reference under LoRA (`jaxcai.trainer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxcai.model_config import ModelConfig

__all__ = [
    "adapters_off",
    "add_adapters",
    "base_config",
    "combine",
    "has_adapters",
    "merge",
    "split",
]

Params = Any
MARK = "_lora_"
_INPUT_DIMS = {"o": 2}  # kernel dims contracted with the input (o: heads x head_dim)


_NO_LORA = {
    f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name.startswith("lora_")
}


def _is_adapter(path: tuple[str, ...]) -> bool:
    return MARK in path[-1]


def base_config(config: ModelConfig) -> ModelConfig:
    """`config` without adapters: the model the frozen base weights alone make up."""
    return config.replace(**_NO_LORA)


def has_adapters(params: Params) -> bool:
    """Whether `params` hold LoRA adapters."""
    return any(_is_adapter(p) for p in traverse_util.flatten_dict(params))


def split(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): the adapters and everything else when `params` hold adapters,
    else all params and `{}`. Both are nested dicts; `combine` undoes the split."""
    flat = traverse_util.flatten_dict(params)
    if not any(_is_adapter(p) for p in flat):
        return params, {}
    train = {p: v for p, v in flat.items() if _is_adapter(p)}
    frozen = {p: v for p, v in flat.items() if not _is_adapter(p)}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable: Params, frozen: Params) -> Params:
    """The params tree `split` came from."""
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def adapters_off(params: Params) -> Params:
    """`params` with every adapter's B at zero: under the same config, exactly the base
    model (each projection adds `(x @ A) @ 0`). The base weights are the very arrays of
    `params`, so inside a jitted step this costs the B zeros, not a copy of the model."""
    flat = traverse_util.flatten_dict(params)
    off = lambda p, v: jnp.zeros_like(v) if p[-1].endswith(f"{MARK}b") else v
    return traverse_util.unflatten_dict({p: off(p, v) for p, v in flat.items()})


def add_adapters(config: ModelConfig, params: Params, rng: jax.Array, shardings: Any = None):
    """`params` (a base model without adapters) plus fresh adapters for `config`.

    Only the adapters are initialised (the jitted init keeps nothing else, so the base
    weights are never created twice); `shardings`, from `model.param_shardings(config, ...)`,
    places them like the rest of a sharded model."""
    from jaxcai.model import head_of, init_params

    if not config.lora_rank:
        return params
    head = head_of(params)
    adapter_shardings = None if shardings is None else split(shardings)[0]
    fresh = jax.jit(
        lambda r: split(init_params(config, r, head=head))[0], out_shardings=adapter_shardings
    )(rng)
    return combine(fresh, params)


def _delta(name: str, a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """A @ B reshaped like the kernel, with or without a leading stacked-layers axis."""
    n_in = _INPUT_DIMS.get(name, 1)
    stacked = a.ndim == n_in + 2
    L = a.shape[0] if stacked else 1
    r = a.shape[-1]
    a_LIR = a.reshape(L, -1, r).astype(jnp.float32)
    b_LRO = b.reshape(L, r, -1).astype(jnp.float32)
    return jnp.einsum("lir,lro->lio", a_LIR, b_LRO).reshape(kernel_shape)


def merge(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Fold every adapter into its kernel, W + (alpha / r) * A @ B (in float32, stored in
    the kernel's dtype), and drop the adapters: the same function as a plain model.
    Returns the config without LoRA too. Params without adapters come back unchanged."""
    plain = base_config(config)
    if not has_adapters(params):
        return plain, params
    scale = config.lora_alpha / config.lora_rank

    @jax.jit
    def fold(params: Params) -> Params:
        flat = traverse_util.flatten_dict(params)
        out = {p: v for p, v in flat.items() if not _is_adapter(p)}
        for path, a in flat.items():
            if not path[-1].endswith(f"{MARK}a"):
                continue
            name = path[-1][: -len(f"{MARK}a")]
            b = flat[(*path[:-1], f"{name}{MARK}b")]
            kernel_path = (*path[:-1], f"{name}_kernel")
            kernel = out[kernel_path]
            delta = _delta(name, a, b, kernel.shape)
            out[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        return traverse_util.unflatten_dict(out)

    return plain, fold(params)
