"""Train state, optimizer, objectives and the one pure train step they all share.

A batch is a dict of arrays with a leading gradient-accumulation axis, `[A, B/A, ...]`
(`A = trainer.grad_accum`), sharded over the mesh's batch axes on its second axis. An
objective maps `(params, micro_batch, ref_params)` to `(loss, weight, metrics)`, where
`weight` (tokens or pairs) makes the accumulated loss exactly the loss of the whole
batch: gradients of `loss * weight` are summed over micro-batches and divided by the
total weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxcai import lora
from jaxcai.config import ObjectiveConfig, OptimizerConfig
from jaxcai.losses import (
    chunked_token_logps,
    dpo_loss,
    reward_loss,
    sequence_logps_from_logps,
    sft_loss_from_logps,
    token_logps,
)
from jaxcai.model import Params, forward, forward_hidden, lm_head, reward_forward
from jaxcai.model_config import ModelConfig

__all__ = [
    "OBJECTIVES",
    "TrainState",
    "init_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "reference_logps",
    "state_shardings",
]

Batch = dict[str, Any]
Objective = Callable[
    [ModelConfig, ObjectiveConfig, Params, Batch, Params | None],
    tuple[jax.Array, jax.Array, dict[str, jax.Array]],
]
COUNT_METRICS = ("tokens", "pairs")  # summed over micro-batches, not averaged


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


# ----- objectives -----------------------------------------------------------------------


def _pair(batch: Batch, key: str) -> jax.Array | None:
    """Chosen rows then rejected rows: one forward pass serves both."""
    if key not in batch["chosen"]:
        return None
    return jnp.concatenate([batch["chosen"][key], batch["rejected"][key]], axis=0)


def _inputs(batch: Batch, pair: bool = False) -> dict[str, jax.Array | None]:
    """Model inputs of a batch: tokens, segment ids, and positions when the pipeline
    packed examples (positions restart per segment either way)."""
    get = (lambda k: _pair(batch, k)) if pair else batch.get
    return {
        "tokens_BT": get("tokens"),
        "segment_ids_BT": get("segment_ids"),
        "positions_BT": get("positions"),
    }


def _soft_label(oc: ObjectiveConfig, batch: Batch) -> jax.Array | None:
    return batch["p_chosen"] if oc.soft_labels else None


def _token_logps(
    mc: ModelConfig, params: Params, inputs: dict, targets_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Token log-probs of `targets_BT` and argmax hits [B, T]: from the full logits, or
    `mc.logits_chunk` positions at a time (`losses.chunked_token_logps`)."""
    if mc.logits_chunk:
        hidden = forward_hidden(mc, params, **inputs)
        return chunked_token_logps(hidden, lm_head(mc, params), targets_BT, mc.logits_chunk)
    logits = forward(mc, params, **inputs)
    return token_logps(logits, targets_BT), jnp.argmax(logits, axis=-1) == targets_BT


def lm_objective(
    mc: ModelConfig,
    oc: ObjectiveConfig,
    params: Params,
    batch: Batch,
    ref_params: Params | None = None,
):
    """Next-token cross entropy over `mask` (every token for `lm`, the response for `sft`)."""
    logps, correct = _token_logps(mc, params, _inputs(batch), batch["targets"])
    loss, metrics = sft_loss_from_logps(logps, correct, batch["mask"])
    return loss, metrics["tokens"], metrics


def rm_objective(
    mc: ModelConfig,
    oc: ObjectiveConfig,
    params: Params,
    batch: Batch,
    ref_params: Params | None = None,
):
    if not oc.center_coef:
        # Without centering the loss is blind to a shift of all rewards: the bias has an
        # exactly zero gradient, and Adam would otherwise amplify rounding noise into steps.
        params = {**params, "reward_bias": jax.lax.stop_gradient(params["reward_bias"])}
    rewards = reward_forward(mc, params, **_inputs(batch, pair=True))
    chosen, rejected = jnp.split(rewards, 2)
    loss, metrics = reward_loss(
        chosen,
        rejected,
        margin=oc.margin or None,
        soft_label=_soft_label(oc, batch),
        center_coef=oc.center_coef,
        mask_B=batch["weight"],
    )
    return loss, metrics["pairs"], metrics


def _pair_logps(mc: ModelConfig, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    logps, _ = _token_logps(mc, params, _inputs(batch, pair=True), _pair(batch, "targets"))
    return sequence_logps_from_logps(logps, _pair(batch, "mask"))


def dpo_objective(
    mc: ModelConfig,
    oc: ObjectiveConfig,
    params: Params,
    batch: Batch,
    ref_params: Params | None = None,
):
    logps, counts = _pair_logps(mc, params, batch)
    if ref_params is not None:
        ref_chosen, ref_rejected = jnp.split(_pair_logps(mc, ref_params, batch)[0], 2)
    else:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    chosen, rejected = jnp.split(logps, 2)
    chosen_n, rejected_n = jnp.split(counts, 2)
    loss, metrics = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=oc.beta,
        loss_type=oc.loss_type,
        label_smoothing=oc.label_smoothing,
        soft_label=_soft_label(oc, batch),
        chosen_counts_B=chosen_n,
        rejected_counts_B=rejected_n,
        mask_B=batch["weight"],
    )
    return loss, metrics["pairs"], metrics


OBJECTIVES: dict[str, Objective] = {
    "lm": lm_objective,
    "sft": lm_objective,
    "rm": rm_objective,
    "dpo": dpo_objective,
}


def reference_logps(mc: ModelConfig, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """Sequence log-probs of chosen and rejected under `params` (DPO's reference)."""
    chosen, rejected = jnp.split(_pair_logps(mc, params, batch)[0], 2)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


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

    def weighted(p, micro):
        p = lora.combine(p, frozen) if frozen else p
        loss, weight, metrics = objective(mc, oc, p, micro, ref_params)
        return loss * weight, (weight, metrics)

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def body(carry, micro):
        if with_grads:
            (lw, (w, m)), g = grad_fn(params, micro)
            grads = jax.tree_util.tree_map(jnp.add, carry[3], g)
        else:
            lw, (w, m) = weighted(params, micro)
            grads = carry[3]
        m = {k: v if k in COUNT_METRICS else v * w for k, v in m.items()}
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
    metrics = {k: v if k in COUNT_METRICS else v / denom for k, v in metric_sums.items()}
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
    objective = OBJECTIVES[oc.name]

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
    objective = OBJECTIVES[oc.name]

    def eval_step(params: Params, batch: Batch, ref_params: Params | None = None):
        return _accumulate(objective, mc, oc, params, batch, ref_params, False)[0]

    return eval_step
