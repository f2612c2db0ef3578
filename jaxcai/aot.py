"""Ahead-of-time compilation of a training run's step, from shapes alone.

`compile_train_step(cfg, mesh)` builds the exact jitted step `jaxcai-train` would run for
the composed config `cfg` (model, objective, optimizer, batch, accumulation, mesh,
sharding rules), lowers it against abstract `jax.ShapeDtypeStruct`s carrying their
shardings and compiles it: no weight is loaded or allocated, so an 8B model compiles on a
laptop. `memory_report` then reads the per-device sizes XLA planned (arguments, outputs,
temporaries) and adds the exact per-device bytes of the sharded params and optimizer
state, worked out from the shardings independently of XLA.

The figures are those of the backend that compiles. On a CPU host standing in for a pod
(`jaxcai-aot aot.devices=N` makes N CPU devices), the parameter, optimizer and batch bytes
are exact, while temporaries follow the CPU compiler's fusion and attention choices
(it materialises attention scores where a GPU would use a fused kernel), so the
activation figure is an upper-side estimate, not a promise.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from omegaconf import DictConfig, OmegaConf

from jaxcai import model, sharding
from jaxcai.config import model_config
from jaxcai.data.batches import batch_sharding
from jaxcai.model_config import ModelConfig
from jaxcai.train import (
    init_train_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    state_shardings,
)

__all__ = ["abstract_batch", "compile_train_step", "memory_report", "run_model_config"]

MB = 1024**2


def run_model_config(cfg: DictConfig) -> ModelConfig:
    """The model a run of `cfg` trains: `trainer.init_from`'s architecture when it names
    an existing model (with `cfg.model`'s numerics and LoRA, as `jaxcai-train` adopts it),
    else `cfg.model`. A preset's mandatory `init_from: ???` is not needed to compile."""
    from jaxcai.loop import adopt_init_model

    if OmegaConf.is_missing(cfg.trainer, "init_from") or not cfg.trainer.init_from:
        return model_config(cfg.model)
    cfg = cfg.copy()  # adopting rewrites `model`; the caller's config stays as it was
    adopt_init_model(cfg)
    return model_config(cfg.model)


def abstract_batch(cfg: DictConfig, mesh, rules) -> dict[str, Any]:
    """Shapes (with shardings) of one global `[A, B/A, ...]` batch of `cfg`'s objective."""
    t, name = cfg.trainer, cfg.objective.name
    A, R, T = t.grad_accum, t.batch_size // t.grad_accum, cfg.data.max_len

    def leaf(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(shape, mesh, rules))

    def rows() -> dict[str, Any]:
        keys = ("tokens", "targets", "mask", "segment_ids", "positions")
        return {k: leaf((A, R, T), jnp.int32) for k in keys}

    if name in ("lm", "sft"):
        batch = rows()
    else:
        batch = {"chosen": rows(), "rejected": rows(), "p_chosen": leaf((A, R), jnp.float32)}
        if name == "dpo" and cfg.objective.reference == "precompute":
            for k in ("ref_chosen_logps", "ref_rejected_logps"):
                batch[k] = leaf((A, R), jnp.float32)
    batch["weight"] = leaf((A, R), jnp.float32)
    return batch


def compile_train_step(cfg: DictConfig, mesh, rules=sharding.DEFAULT_RULES):
    """(compiled step, abstract state, model config) of `cfg`'s run on `mesh`."""
    mc = run_model_config(cfg)
    head = "reward" if cfg.objective.name == "rm" else "lm"
    optimizer = make_optimizer(cfg.optimizer, cfg.trainer.steps)
    schedule = make_schedule(cfg.optimizer, cfg.trainer.steps)
    with sharding.use_mesh(mesh, rules):
        param_sh = model.param_shardings(mc, mesh, rules, head=head)
        params = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            model.param_shapes(mc, head=head),
            param_sh,
        )
        abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), params)
        state_sh = state_shardings(abstract, param_sh, mesh)
        state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh
        )
        ref = None
        if cfg.objective.name == "dpo" and cfg.objective.reference == "model":
            ref = params
        step = jax.jit(
            make_train_step(mc, cfg.objective, optimizer, schedule),
            in_shardings=(state_sh, None, None if ref is None else param_sh),
            out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0,
        )
        compiled = step.lower(state, abstract_batch(cfg, mesh, rules), ref).compile()
    return compiled, state, mc


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded shapes (the largest shard per leaf)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def memory_report(compiled, state: Any) -> dict[str, float]:
    """Per-device memory of a compiled step, in MiB: XLA's planned argument, output,
    temporary and aliased (donated) bytes, `peak_mb` = arguments + outputs - aliased +
    temporaries, and the exact `params_mb` / `opt_state_mb` of one device's shards."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend does not report compiled memory (memory_analysis)")
    arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {
        "params_mb": _per_device_bytes(state.params) / MB,
        "opt_state_mb": _per_device_bytes(state.opt_state) / MB,
        "arguments_mb": arg / MB,
        "outputs_mb": out / MB,
        "aliased_mb": alias / MB,
        "temp_mb": temp / MB,
        "peak_mb": (arg + out - alias + temp) / MB,
    }
