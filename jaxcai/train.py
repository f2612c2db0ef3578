"""Train state, optimizer and the one pure train step every objective shares.

A batch is a dict of arrays with a leading gradient-accumulation axis, `[A, B/A, ...]`
(`A = trainer.grad_accum`), sharded over the mesh's batch axes on its second axis. An
objective's loss (`jaxcai.objectives`) maps `(params, micro_batch, ref_params)` to
`(loss, metrics)`; `metrics[objective.weight]` (tokens or pairs) makes the accumulated
loss exactly the loss of the whole batch: gradients of `loss * weight` are summed over
micro-batches and divided by the total weight.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxcai import lora, objectives
from jaxcai.config import ObjectiveConfig, OptimizerConfig
from jaxcai.model import Params
from jaxcai.model_config import ModelConfig
from jaxcai.objectives import Objective, reference_logps

__all__ = [
    "TrainState",
    "init_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "reference_logps",
    "state_shardings",
]

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: updates applied so far
    params: Params
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw key data (checkpoint friendly)


# ----- optimizer ------------------------------------------------------------------------


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `cosine`/`linear` decay to `min_lr_ratio * lr`."""
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    end = cfg.lr * cfg.min_lr_ratio
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps, cfg.min_lr_ratio),
        "linear": lambda: optax.linear_schedule(cfg.lr, end, decay_steps),
        "constant": lambda: optax.constant_schedule(cfg.lr),
    }[cfg.schedule]()
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay on matrices only (not norms/biases)."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(
        make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def init_train_state(
    params: Params, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """Step 0. The optimizer tracks the trainable params only (the LoRA adapters when
    `params` hold any, `lora.split`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(lora.split(params)[0]),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def state_shardings(abstract: TrainState, param_shardings: Any, mesh) -> Any:
    """Shardings for the whole state: optimizer moments follow the parameter they track
    (matched on the trailing dict keys of their path), everything else is replicated.
    `abstract` is the state (or its `jax.eval_shape`)."""
    by_path = {
        tuple(k.key for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, entry.key)
        sharding = by_path.get(tuple(keys))
        return sharding if sharding is not None and len(keys) else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


# ----- steps ----------------------------------------------------------------------------


def _accumulate(
    objective: Objective,
    mc: ModelConfig,
    oc: ObjectiveConfig,
    params: Params,
    batch: Batch,
    ref_params: Params | None,
    with_grads: bool,
    frozen: Params | None = None,
):
    """Sum `loss * weight`, weighted metrics (and gradients of `params`) over the
    accumulation axis; `frozen` params (LoRA's base weights) join them without gradients."""
    counts = objective.counts

    def weighted(p, micro):
        p = lora.combine(p, frozen) if frozen else p
        loss, metrics = objective.loss(mc, oc, p, micro, ref_params)
        weight = metrics[objective.weight]
        return loss * weight, (weight, metrics)

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def body(carry, micro):
        if with_grads:
            (lw, (w, m)), g = grad_fn(params, micro)
            grads = jax.tree_util.tree_map(jnp.add, carry[3], g)
        else:
            lw, (w, m) = weighted(params, micro)
            grads = carry[3]
        m = {k: v if k in counts else v * w for k, v in m.items()}
        return (
            carry[0] + lw,
            carry[1] + w,
            jax.tree_util.tree_map(jnp.add, carry[2], m),
            grads,
        ), None

    first = jax.tree_util.tree_map(lambda x: x[0], batch)
    _, (_, metric_shapes) = jax.eval_shape(weighted, params, first)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        zeros(metric_shapes),
        zeros(params) if with_grads else None,
    )
    (loss_sum, weight, metric_sums, grads), _ = jax.lax.scan(body, init, batch)
    denom = jnp.maximum(weight, 1e-12)  # a batch with no tokens gives zero loss and grads
    metrics = {k: v if k in counts else v / denom for k, v in metric_sums.items()}
    metrics["loss"] = loss_sum / denom
    if with_grads:
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    return metrics, grads


def make_train_step(
    mc: ModelConfig,
    oc: ObjectiveConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
):
    """The pure `(state, batch, ref_params) -> (state, metrics)` step of any objective.

    A non-finite loss or gradient leaves the state unchanged (so no checkpoint is ever
    poisoned) and reports `nonfinite = 1`; the loop decides to stop or go on.
    """
    objective = objectives.get(oc.name)

    def step(state: TrainState, batch: Batch, ref_params: Params | None = None):
        trainable, frozen = lora.split(state.params)
        metrics, grads = _accumulate(objective, mc, oc, trainable, batch, ref_params, True, frozen)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        rng = jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        )
        # What a step changes, kept as it was when the step is not finite. Frozen params
        # (LoRA's base weights) are outside the select, so they are never copied.
        changed = (state.step + 1, optax.apply_updates(trainable, updates), opt_state, rng)
        before = (state.step, trainable, state.opt_state, state.rng)
        step_, trainable, opt_state, rng = jax.tree_util.tree_map(
            lambda a, b: jnp.where(finite, a, b), changed, before
        )
        new = TrainState(
            step=step_, params=lora.combine(trainable, frozen), opt_state=opt_state, rng=rng
        )
        metrics["grad_norm"] = grad_norm
        metrics["nonfinite"] = (~finite).astype(jnp.int32)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new, metrics

    return step


def make_eval_step(mc: ModelConfig, oc: ObjectiveConfig):
    """`(params, batch, ref_params) -> metrics` with `loss` and the objective's metrics."""
    objective = objectives.get(oc.name)

    def eval_step(params: Params, batch: Batch, ref_params: Params | None = None):
        return _accumulate(objective, mc, oc, params, batch, ref_params, False)[0]

    return eval_step
