"""A training run's model, sharded state and compiled steps, built once from its config.

`build(cfg, mesh, rules)` is the one place that turns a composed training config into
what the loop, `jaxcai-aot`, the benchmarks and the tests run: the objective's record,
the model config, the optimizer and schedule, the initial `TrainState` with its
shardings, a DPO-style in-step reference (a frozen copy of the initial params or, under
LoRA, the state's own base weights with the adapters switched off: one copy of the base
in memory), and the jitted (donating) train step and eval step. With `abstract=True`
nothing is allocated: the state is shapes carrying their shardings, so a pod-sized step
compiles on a laptop (`Trainer.compile`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from omegaconf import DictConfig, OmegaConf

from jaxcai import lora, model, objectives, sharding
from jaxcai.config import ConfigError, compose, model_config
from jaxcai.data.batches import batch_sharding
from jaxcai.load import load_model, model_config_of
from jaxcai.model_config import ModelConfig
from jaxcai.objectives import Objective
from jaxcai.train import (
    TrainState,
    init_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    state_shardings,
)

__all__ = [
    "LORA_FIELDS",
    "NUMERIC_FIELDS",
    "Trainer",
    "abstract_batch",
    "adopt_init_model",
    "build",
    "initial_params",
    "run_model_config",
    "step_config",
]

NUMERIC_FIELDS = (
    "param_dtype",
    "dtype",
    "scan_layers",
    "remat_policy",
    "logits_chunk",
    "attention_impl",
)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")  # adapters on loaded weights


def _numerics(cfg: DictConfig) -> dict[str, Any]:
    return {k: cfg.model[k] for k in NUMERIC_FIELDS}


def _lora_fields(cfg: DictConfig) -> dict[str, Any]:
    return {k: cfg.model[k] for k in LORA_FIELDS}


def adopt_init_model(cfg: DictConfig) -> None:
    """With `trainer.init_from`, make `cfg.model` the checkpoint's architecture (keeping
    the numerics chosen in `cfg.model`), so validation and the run's `config.yaml` describe
    the model actually trained."""
    if not cfg.trainer.init_from:
        return
    try:
        mc = model_config_of(cfg.trainer.init_from, **_numerics(cfg))
    except FileNotFoundError as e:
        raise ConfigError(f"config trainer.init_from={cfg.trainer.init_from!r}: {e}") from e
    name = cfg.model.get("name", "custom")
    cfg.model = {**mc.replace(**_lora_fields(cfg)).to_dict(), "name": name}


def run_model_config(cfg: DictConfig) -> ModelConfig:
    """The model a run of `cfg` trains: `trainer.init_from`'s architecture when it names
    an existing model (with `cfg.model`'s numerics and LoRA, as `jaxcai-train` adopts it),
    else `cfg.model`. A preset's mandatory `init_from: ???` is not needed to compile."""
    if OmegaConf.is_missing(cfg.trainer, "init_from") or not cfg.trainer.init_from:
        return model_config(cfg.model)
    cfg = cfg.copy()  # adopting rewrites `model`; the caller's config stays as it was
    adopt_init_model(cfg)
    return model_config(cfg.model)


def initial_params(cfg: DictConfig, mesh, rules, head: str = "lm") -> tuple[ModelConfig, Any]:
    """Random init from `cfg.model`, or the weights of `trainer.init_from` (a Hugging Face
    directory, a jaxcai run or one of its `checkpoints/N`), with the params of `head`."""
    seed = jax.random.key(cfg.trainer.seed)
    if not cfg.trainer.init_from:
        mc = model_config(cfg.model)
        return mc, model.init_sharded(mc, seed, mesh, rules, head=head)
    mc, params = load_model(
        cfg.trainer.init_from, mesh=mesh, rules=rules, progress=cfg.trainer.progress,
        **_numerics(cfg),
    )  # fmt: skip
    loaded = model.head_of(params)
    if head == "reward" and loaded == "lm":
        shardings = model.param_shardings(mc, mesh, rules, head="reward")
        params = jax.jit(lambda p, r: model.to_reward_params(mc, p, r), out_shardings=shardings)(
            params, seed
        )
    elif head == "lm" and loaded == "reward":
        raise ConfigError(
            f"config trainer.init_from={cfg.trainer.init_from!r} is a reward model; "
            f"objective {cfg.objective.name} needs a language model"
        )
    mc = mc.replace(**_lora_fields(cfg))
    shardings = model.param_shardings(mc, mesh, rules, head=head)
    return mc, lora.add_adapters(mc, params, jax.random.fold_in(seed, 1), shardings)


def abstract_batch(cfg: DictConfig, mesh, rules=sharding.DEFAULT_RULES) -> dict[str, Any]:
    """Shapes (with shardings) of one global `[A, B/A, ...]` batch of `cfg`'s objective."""
    t = cfg.trainer
    A, R = t.grad_accum, t.batch_size // t.grad_accum
    layout = objectives.batch_layout(
        objectives.get(cfg.objective.name), cfg.objective, R, cfg.data.max_len
    )

    def leaf(s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        shape = (A, *s.shape)
        return jax.ShapeDtypeStruct(shape, s.dtype, sharding=batch_sharding(shape, mesh, rules))

    return jax.tree_util.tree_map(leaf, layout)


@dataclasses.dataclass
class Trainer:
    """Everything a run steps with. `state` is the initial state (donated to the first
    step: take it once); `ref_params` the in-step reference policy, or None (also under
    LoRA, where the steps' reference is the base inside the params they get,
    `lora.adapters_off`, unless one is passed)."""

    objective: Objective
    objective_config: Any
    model: ModelConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    state_shardings: Any
    param_shardings: Any
    ref_params: Any
    step: Any  # jitted (state, batch, ref_params) -> (state, metrics), state donated
    eval_step: Any  # jitted (params, batch, ref_params) -> metrics
    mesh: Any
    rules: Any

    def compile(self, batch: Any):
        """The train step compiled for `batch`'s shapes (and the current state's)."""
        return self.step.lower(self.state, batch, self.ref_params).compile()

    def evaluate(self, params: Any, batches: Any) -> dict[str, float]:
        """`objective.weight`-weighted means of the eval step's metrics over `batches`;
        counts (`tokens`, `pairs`, the weight) are summed."""
        counts = self.objective.counts
        sums: dict[str, float] = {}
        total = 0.0
        for batch in batches:
            m = jax.device_get(self.eval_step(params, batch, self.ref_params))
            weight = float(m[self.objective.weight])
            total += weight
            for k, v in m.items():
                value = float(v) if k in counts else float(v) * weight
                sums[k] = sums.get(k, 0.0) + value
        return {k: v if k in counts else v / max(total, 1e-12) for k, v in sums.items()}


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings
    )


def _base_reference(step: Any) -> Any:
    """`step(state_or_params, batch, ref_params)` whose reference defaults to the LoRA
    params' own base, adapters switched off (`lora.adapters_off`): no second copy."""

    def with_base(first: Any, batch: Any, ref_params: Any = None):
        params = first.params if isinstance(first, TrainState) else first
        return step(first, batch, lora.adapters_off(params) if ref_params is None else ref_params)

    return with_base


def build(
    cfg: DictConfig,
    mesh,
    rules=sharding.DEFAULT_RULES,
    *,
    params: tuple[ModelConfig, Any] | None = None,
    abstract: bool = False,
) -> Trainer:
    """The `Trainer` of `cfg` on `mesh`: params from `cfg` (random or `trainer.init_from`),
    or the `(model_config, params)` handed in, or (`abstract=True`) shapes only."""
    objective = objectives.get(cfg.objective.name)
    t, head = cfg.trainer, objective.head
    if abstract:
        mc = run_model_config(cfg)
        param_sh = model.param_shardings(mc, mesh, rules, head=head)
        values = _abstract(model.param_shapes(mc, head=head), param_sh)
    else:
        mc, values = params if params is not None else initial_params(cfg, mesh, rules, head)
        param_sh = model.param_shardings(mc, mesh, rules, head=head)
    optimizer = make_optimizer(cfg.optimizer, t.steps)
    schedule = make_schedule(cfg.optimizer, t.steps)
    init = lambda p: init_train_state(p, optimizer, t.seed)
    state_shapes = jax.eval_shape(init, values)
    state_sh = state_shardings(state_shapes, param_sh, mesh)
    ref = None
    in_step = objective.reference_mode(cfg.objective) == "model"
    base_ref = in_step and lora.has_adapters(values)  # the reference is the frozen base
    if in_step and not base_ref:
        ref = values if abstract else jax.tree_util.tree_map(jnp.copy, values)
    if abstract:
        state = _abstract(state_shapes, state_sh)
    else:
        state = jax.jit(init, out_shardings=state_sh, donate_argnums=0)(values)
    replicated = NamedSharding(mesh, PartitionSpec())
    ref_sh = None if ref is None else jax.tree_util.tree_map(lambda x: x.sharding, ref)
    train_fn = make_train_step(mc, cfg.objective, optimizer, schedule)
    eval_fn = make_eval_step(mc, cfg.objective)
    if base_ref:
        train_fn, eval_fn = _base_reference(train_fn), _base_reference(eval_fn)
    step = jax.jit(
        train_fn,
        in_shardings=(state_sh, None, ref_sh),  # batches arrive already sharded
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(eval_fn, out_shardings=replicated)
    return Trainer(
        objective, cfg.objective, mc, optimizer, schedule, state, state_sh, param_sh, ref,
        step, eval_step, mesh, rules,
    )  # fmt: skip


def step_config(
    model: DictConfig,
    objective: DictConfig | None = None,
    *,
    steps: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    mesh: DictConfig | None = None,
) -> DictConfig:
    """A `jaxcai-train` config for `build` without a dataset (benchmarks, tests): the
    typed defaults, then `model`, the `objective` settings and the step's sizes."""

    name = objective.name if objective is not None else "sft"
    cfg = compose([f"objective={name}"])
    cfg.model = model
    for key, value in (objective or {}).items():
        cfg.objective[key] = value
    cfg.trainer.steps, cfg.trainer.seed, cfg.trainer.batch_size = steps, seed, batch_size
    cfg.data.max_len = seq_len
    for key, value in (mesh or {}).items():
        cfg.mesh[key] = value
    return cfg
