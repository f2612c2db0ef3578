"""PPO's value model: a reward-head model of its own, with its own optimizer and step.

It starts from `objective.value_init` when given, else from the reward model
(`reward_model`, backbone and head), else from the policy's backbone with a fresh scalar
head (`model.to_reward_params`). It is updated right after each policy update, on the same
minibatch, with the clipped value loss (`rl_losses.ppo_value_loss`, times `vf_coef`);
its state is saved in every checkpoint beside the policy's (item `value`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxcai import lora, model, rl_losses
from jaxcai.train import TrainState, init_train_state, make_optimizer, state_shardings

__all__ = ["ValueModel"]


def _values(config, params, batch) -> jax.Array:
    return model.value_forward(
        config, params, batch["tokens"],
        segment_ids_BT=batch["segment_ids"], positions_BT=batch.get("positions"),
    )  # fmt: skip


class ValueModel:
    """The value model's state, its per-token values and its update step."""

    def __init__(self, cfg: Any, policy: tuple[Any, Any], mesh, rules):
        oc = cfg.objective
        source = oc.value_init or cfg.get("reward_model")
        seed = jax.random.fold_in(jax.random.key(cfg.trainer.seed), 7)
        if source:
            from jaxcai.load import load_model

            config, params = load_model(source, mesh=mesh, rules=rules)
            if model.head_of(params) != "reward":
                shardings = model.param_shardings(config, mesh, rules, head="reward")
                params = jax.jit(lambda p: model.to_reward_params(config, p, seed),
                                 out_shardings=shardings)(params)  # fmt: skip
        else:
            config, lm_params = policy
            config, lm_params = lora.merge(config, lm_params)
            shardings = model.param_shardings(config, mesh, rules, head="reward")
            params = jax.jit(lambda p: model.to_reward_params(config, p, seed),
                             out_shardings=shardings)(lm_params)  # fmt: skip
        self.config = config
        opt_cfg = cfg.optimizer.copy()
        if oc.value_lr:
            opt_cfg.lr = oc.value_lr
        self.optimizer = make_optimizer(opt_cfg, cfg.trainer.steps)
        param_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)
        init = lambda p: init_train_state(p, self.optimizer, cfg.trainer.seed)
        self.shardings = state_shardings(jax.eval_shape(init, params), param_sh, mesh)
        self.state: TrainState = jax.jit(init, out_shardings=self.shardings)(params)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.values = jax.jit(lambda p, b: _values(config, p, jax.tree_util.tree_map(
            lambda x: x[0], b)))  # fmt: skip
        self._step = jax.jit(
            self._make_step(oc), in_shardings=(self.shardings, None),
            out_shardings=(self.shardings, replicated), donate_argnums=0,
        )  # fmt: skip

    def _make_step(self, oc: Any):
        config, optimizer = self.config, self.optimizer

        def loss_fn(params, micro):
            values = _values(config, params, micro)
            loss, metrics = rl_losses.ppo_value_loss(
                values, micro["old_values"], micro["returns"], micro["mask"], oc.vf_clip
            )
            metrics["val/value"] = rl_losses.masked_mean(values, micro["mask"])
            return oc.vf_coef * loss, {**metrics, "val/loss": loss}

        def step(state: TrainState, batch):
            micro = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, micro)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            new = state.replace(
                step=state.step + 1,
                params=optax.apply_updates(state.params, updates),
                opt_state=opt_state,
            )
            metrics["val/grad_norm"] = optax.global_norm(grads)
            return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

        return step

    def update(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """One step on a training batch (`[A, B/A, ...]`); its metrics, on device."""
        self.state, metrics = self._step(self.state, batch)
        return metrics
