"""A model's params as a tree of plain arrays: random init (whole, or directly in its
shards), their logical axes, shapes and shardings; which head a tree carries
(`head_of`); a reward model's params from a language model's (`to_reward_params`); and
the per-layer layout decoding runs fastest in (`unrolled`).
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcai.decoder import Decoder, kind_windows
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import DEFAULT_RULES, Rules, tree_shardings

__all__ = [
    "Params",
    "head_of",
    "init_params",
    "init_sharded",
    "param_logical_axes",
    "param_shapes",
    "param_shardings",
    "to_reward_params",
    "unrolled",
]

Array = jax.Array
Params = Any


def _boxed_params(config: ModelConfig, rng: Array, head: str) -> Params:
    """Initial params still wrapped in their logical-axis metadata boxes."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    masks = (jnp.ones((1, 1, 1, 1), bool),) * len(kind_windows(config))
    return Decoder(config, head).init(rng, tokens, tokens, masks)["params"]


@partial(jax.jit, static_argnames=("config", "head"))
def init_params(config: ModelConfig, rng: Array, *, head: str = "lm") -> Params:
    """Randomly initialised params (plain arrays) of the LM (`head="lm"`) or reward model."""
    return nn.unbox(_boxed_params(config, rng, head))


def param_logical_axes(config: ModelConfig, *, head: str = "lm") -> Params:
    """A tree like the params whose leaves are tuples of logical axis names."""
    boxed = jax.eval_shape(lambda: _boxed_params(config, jax.random.key(0), head))
    return jax.tree_util.tree_map(
        lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def param_shapes(config: ModelConfig, *, head: str = "lm") -> Params:
    """A tree of `jax.ShapeDtypeStruct` like the params, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), head=head))


def param_shardings(
    config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES, *, head: str = "lm"
) -> Params:
    """A `NamedSharding` per parameter, from its logical axes and `rules`."""
    return tree_shardings(
        param_logical_axes(config, head=head), param_shapes(config, head=head), mesh, rules
    )


def init_sharded(
    config: ModelConfig,
    rng: Array,
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    head: str = "lm",
) -> Params:
    """`init_params` created directly in its shards (no full copy on one device)."""
    shardings = param_shardings(config, mesh, rules, head=head)
    return jax.jit(lambda r: init_params(config, r, head=head), out_shardings=shardings)(rng)


def head_of(params: Params) -> Literal["lm", "reward"]:
    """Which head a params tree carries: "reward" when it holds a reward model's scalar
    head (`reward_kernel`), else "lm" (a language model)."""
    return "reward" if "reward_kernel" in params else "lm"


def to_reward_params(config: ModelConfig, lm_params: Params, rng: Array) -> Params:
    """A reward model's params from a language model's: same backbone, fresh scalar head."""
    types = None if config.layer_types is None else config.layer_types[:1]
    fresh = init_params(config.replace(n_layers=1, layer_types=types), rng, head="reward")
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    params["reward_kernel"] = fresh["reward_kernel"]
    params["reward_bias"] = fresh["reward_bias"]
    return params


def unrolled(
    config: ModelConfig,
    params: Params,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> tuple[ModelConfig, Params]:
    """The same model with one params subtree per layer (`scan_layers=False`): the layout
    decoding runs fastest in, since a scanned decoder slices (copies) every layer's
    weights out of the stacked arrays at every step. Placed on `mesh` when given."""
    if not config.scan_layers:
        return config, params
    new = config.replace(scan_layers=False)
    head = head_of(params)
    return new, _unroll_fn(new, mesh, tuple(rules), head)(params)


@functools.lru_cache(maxsize=16)
def _unroll_fn(new: ModelConfig, mesh, rules: Rules, head: str):
    """A jitted stacked -> per-layer conversion (cached: built and compiled once)."""

    def convert(p):
        out = {k: v for k, v in p.items() if k != "layers"}
        for i in range(new.n_layers):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], p["layers"])
        return out

    shardings = None if mesh is None else param_shardings(new, mesh, rules, head=head)
    return jax.jit(convert, out_shardings=shardings)
