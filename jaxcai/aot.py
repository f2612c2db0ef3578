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
import numpy as np
from omegaconf import DictConfig

from jaxcai import sharding
from jaxcai.trainer import abstract_batch, build, run_model_config

__all__ = ["abstract_batch", "compile_train_step", "memory_report", "run_model_config"]

MB = 1024**2


def compile_train_step(cfg: DictConfig, mesh, rules=sharding.DEFAULT_RULES):
    """(compiled step, abstract state, model config) of `cfg`'s run on `mesh`."""
    with sharding.use_mesh(mesh, rules):
        trainer = build(cfg, mesh, rules, abstract=True)
        compiled = trainer.compile(abstract_batch(cfg, mesh, rules))
    return compiled, trainer.state, trainer.model


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
