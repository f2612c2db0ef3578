"""Online RL's batch source: rollouts sampled from the live policy, scored, then served
as update batches, and the hook that reports them (and steps PPO's value model).

The loop asks `RolloutFeed.next()` for each step's batch as it would ask the data
pipeline. When the current rollout's updates are used up, the feed samples the next one:
`rollout.prompts` prompts from the prompt stream, `rollout.samples` responses each, with
the params the train step is updating (on the training mesh, no copy), then the policy's
and the reference's log-probs of the sampled tokens, the value model's values (PPO) and
the reward source's scores, and the algorithm's advantages (`jaxcai.rl.algorithms`).
Each epoch serves the rollout's rows in a fresh seeded order, `trainer.batch_size` rows
(pairs for online DPO) per update. The reference policy is a frozen copy of the initial
params or, under LoRA, the base weights themselves with the adapters left out.

Everything a resumed run needs is in the checkpoint: the prompt position, the rollout
count and the current rollout's rows (`RolloutState`, saved as the data position) and
PPO's value model (an extra item); sampling seeds derive from the rollout count.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcai import lora, objectives
from jaxcai.data.batches import (
    agree_rows,
    data_shard,
    from_local_rows,
    local_row_slices,
    local_tokens,
)
from jaxcai.data.pairs import pack_pairs, unpad_pairs
from jaxcai.hooks import Hook, RunContext, TrainingError
from jaxcai.logprobs import token_logps_of
from jaxcai.rl.algorithms import Scored, rollout_metrics, targets
from jaxcai.rl.prompts import RolloutState, open_prompts
from jaxcai.rl.rewards import JudgeReward, pair_probabilities, reward_source, shape
from jaxcai.rl.rollout import Samples, device_map, rows, sample
from jaxcai.rl.value import ValueModel

log = logging.getLogger(__name__)

__all__ = ["RolloutFeed", "RolloutHook", "make_feed"]


def _token_logps(config, params, batch) -> jax.Array:
    micro = jax.tree_util.tree_map(lambda x: x[0], batch)
    inputs = objectives.model_inputs(micro)
    return token_logps_of(config, params, inputs, micro["targets"], micro["mask"])[0]


class RolloutFeed:
    """Update batches from rollouts of the live policy (see the module docstring)."""

    def __init__(self, ctx: RunContext, fmt: Any):
        cfg, tr = ctx.cfg, ctx.trainer
        self.ctx, self.fmt, self.cfg = ctx, fmt, cfg
        self.objective = tr.objective
        self.mesh, self.rules, self.model = tr.mesh, tr.rules, tr.model
        self.prompts = open_prompts(cfg.data.train, fmt=cfg.data.format)
        self.iterator = RolloutState(len(self.prompts), cfg.trainer.seed, cfg.data.shuffle)
        self.reward = reward_source(cfg, mesh=tr.mesh, rules=tr.rules)
        params = ctx.state.params
        self.lora = lora.has_adapters(params)
        ref_config = lora.base_config(self.model) if self.lora else self.model
        # Under LoRA the reference is the state's own base weights (read at each rollout,
        # never copied); otherwise a frozen copy of the initial params.
        self.ref_params = None if self.lora else jax.tree_util.tree_map(jnp.copy, params)
        self.value = ValueModel(cfg, (tr.model, params), tr.mesh, tr.rules) if (
            tr.objective.name == "ppo") else None  # fmt: skip
        self._logps = jax.jit(lambda p, b: _token_logps(self.model, p, b))
        self._ref_logps = jax.jit(lambda p, b: _token_logps(ref_config, p, b))
        t = cfg.trainer
        self.batch_size, self.grad_accum = t.batch_size, t.grad_accum
        self.shard = data_shard(t.batch_size, t.grad_accum, tr.mesh, tr.rules)
        self.chunk = t.batch_size // t.grad_accum * (2 if self.objective.pairs else 1)
        self.metrics: dict[str, Any] = {}  # the last rollout's, until the hook reports them
        self.last_batch: Any = None
        self.checked = False
        self.cycle: dict[str, float] = {}

    # ----- rollouts ---------------------------------------------------------------------

    def _sample(self, st: RolloutState) -> Samples:
        rc = self.cfg.rollout
        first = st.position
        chosen = st.take(rc.prompts)
        return sample(
            self.model, self.ctx.state.params, self.fmt, [self.prompts[i] for i in chosen],
            list(range(first, first + len(chosen))), st.sample_seeds(len(chosen)), rc,
            max_len=self.cfg.data.max_len, mesh=self.mesh,
        )  # fmt: skip

    def _score(self, samples: Samples) -> tuple[np.ndarray, np.ndarray | None]:
        """(per-response scores, P(first better) per prompt for pairs, else None)."""
        prompts, texts = samples.sequence_prompts(), samples.texts
        k = samples.samples
        indices = [i for i in samples.indices for _ in range(k)]  # each response's prompt
        if self.objective.pairs and isinstance(self.reward, JudgeReward):
            pairs = [(texts[2 * i], texts[2 * i + 1]) for i in range(len(samples.prompts))]
            p_first = self.reward.prefer(samples.prompts, pairs, samples.indices)
            return np.stack([p_first, 1 - p_first], axis=1).reshape(-1), p_first
        scores = np.asarray(self.reward(prompts, texts, indices=indices, group=k), np.float32)
        if not np.all(np.isfinite(scores)):
            bad = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise TrainingError(f"the reward of a response to prompt {indices[bad]} is not finite")
        return scores, pair_probabilities(scores.reshape(-1, 2)) if self.objective.pairs else None

    def _rollout(self) -> None:
        st, rc, started = self.iterator, self.cfg.rollout, time.perf_counter()
        samples = self._sample(st)
        sampled = time.perf_counter()
        arrays = rows(samples, self.cfg.data.max_len, self.fmt.tokenizer.pad_id)
        params = self.ctx.state.params
        run = lambda fn, p: device_map(lambda b: fn(p, b), arrays, self.chunk, self.mesh,
                                       self.rules)  # fmt: skip
        old = run(self._logps, params)
        ref = run(self._ref_logps, lora.split(params)[1] if self.lora else self.ref_params)
        values = None if self.value is None else run(self.value.values, self.value.state.params)
        scores, p_first = self._score(samples)
        rewards = shape(scores, samples.lengths(), self.cfg.reward)
        scored = Scored(arrays, old, ref, rewards, scores, samples.samples, values)
        if self.objective.pairs:
            st.buffer, skipped = _pairs(scored, p_first, samples.texts)
        else:
            st.buffer, skipped = targets(self.objective.name, scored, self.cfg.objective), 0
        n = len(st.buffer["weight"])
        st.plan(n, self.batch_size, rc.epochs)
        st.rollout += 1
        scored_at = time.perf_counter()
        self.metrics = {
            **rollout_metrics(scored, self.cfg.objective),
            **self._timing(started, sampled, scored_at, samples.new_tokens),
        }
        self.metrics["rollout/skipped_pairs"] = skipped
        self.metrics["rollout/index"] = st.rollout

    def _timing(self, started, sampled, scored, new_tokens) -> dict[str, float]:
        out = {
            "rollout/sample_seconds": sampled - started,
            "rollout/score_seconds": scored - sampled,
            "rollout/tokens_per_s": new_tokens / max(sampled - started, 1e-9),
        }
        if self.cycle:  # the previous rollout's whole cycle: sampling, scoring, updates
            total = started - self.cycle["started"]
            update = max(total - self.cycle["rollout_seconds"], 1e-9)
            out["rollout/sampling_share"] = self.cycle["rollout_seconds"] / max(total, 1e-9)
            out["rollout/update_tokens_per_s"] = self.cycle["update_tokens"] / update
        self.cycle = {"started": started, "rollout_seconds": scored - started,
                      "update_tokens": 0}  # fmt: skip
        return out

    # ----- the Feed interface -----------------------------------------------------------

    def next(self) -> tuple[dict[str, Any], int]:
        st = self.iterator
        if st.exhausted:
            self._rollout()
        take = np.asarray(st.order[st.cursor])
        st.cursor += 1
        rows_ = jax.tree_util.tree_map(lambda x: x[take], st.buffer)
        if not self.checked:
            objectives.check_batch(self.objective, self.cfg.objective, rows_, "rollout batch")
            self.checked = True
        index, count = self.shard
        local = jax.tree_util.tree_map(lambda x: _local_rows(x, self.grad_accum, index, count),
                                       rows_)  # fmt: skip
        if self.objective.pairs and self.cfg.data.get("pack_pairs", False):
            local = self._packed(local, index)
        tokens = local_tokens(local) * count
        if self.cycle:
            self.cycle["update_tokens"] += tokens
        batch = from_local_rows(local, self.batch_size, self.grad_accum, self.mesh, self.rules)
        self.last_batch = batch
        return batch, tokens

    def _packed(self, local: dict[str, Any], index: int) -> dict[str, Any]:
        """This process's pairs packed with their shared prompts (`jaxcai.data.pairs`),
        the same number of rows on every process."""
        length = local["chosen"]["tokens"].shape[1]
        lengths = tuple(2**k for k in range(6, 21) if 2**k < 2 * length) + (2 * length,)
        per = len(local["weight"]) // self.grad_accum
        packed = pack_pairs(
            unpad_pairs(local), lengths=lengths, pad_id=self.fmt.tokenizer.pad_id,
            groups=self.grad_accum, pair_offset=index * per,
            row_multiple=local_row_slices(self.batch_size, self.grad_accum, self.mesh, self.rules),
        )  # fmt: skip
        return agree_rows(packed, self.fmt.tokenizer.pad_id, self.grad_accum)

    def checkpoint_items(self) -> dict[str, Any]:
        """Extra state saved with each checkpoint (PPO's value model)."""
        return {} if self.value is None else {"value": self.value.state}

    def restore(self, checkpointer: Any, step: int) -> None:
        if self.value is not None:
            self.value.state = checkpointer.restore_item(step, "value", self.value.state)

    def close(self) -> None:
        self.iterator.close()


def _local_rows(x: np.ndarray, grad_accum: int, index: int, count: int) -> np.ndarray:
    """This process's rows of a `[B, ...]` batch: its slice of every micro-batch."""
    micro = x.reshape(grad_accum, -1, *x.shape[1:])
    per = micro.shape[1] // count
    return micro[:, index * per : (index + 1) * per].reshape(-1, *x.shape[1:])


def _pairs(s: Scored, p_first: np.ndarray, texts: list[str]) -> tuple[dict[str, Any], int]:
    """Online DPO's (chosen, rejected) rows from each prompt's two samples; a pair of
    identical or empty responses gets weight 0 (counted)."""
    first = np.arange(0, len(texts), 2)
    a_wins = p_first >= 0.5
    chosen = np.where(a_wins, first, first + 1)
    rejected = np.where(a_wins, first + 1, first)
    ref_seq = (s.ref_logps * s.mask).sum(axis=1).astype(np.float32)
    usable = np.asarray(
        [bool(texts[i].strip()) and bool(texts[i + 1].strip()) and texts[i] != texts[i + 1]
         for i in first], np.float32,
    )  # fmt: skip
    keys = ("tokens", "targets", "mask", "segment_ids", "positions")
    buffer = {
        "chosen": {k: s.rows[k][chosen] for k in keys},
        "rejected": {k: s.rows[k][rejected] for k in keys},
        "p_chosen": np.maximum(p_first, 1 - p_first).astype(np.float32),
        "weight": usable,
        "ref_chosen_logps": ref_seq[chosen],
        "ref_rejected_logps": ref_seq[rejected],
    }
    return buffer, int((usable == 0).sum())


class RolloutHook(Hook):
    """After each update: PPO's value step on the same batch, and the latest rollout's
    metrics added to the step's (so `metrics.jsonl` has them on the step they fed)."""

    every = 1

    def run(self, ctx: RunContext) -> None:
        feed = ctx.feed
        extra: dict[str, Any] = {}
        if feed.value is not None:
            extra.update(feed.value.update(feed.last_batch))
        if feed.metrics:
            extra.update(feed.metrics)
            feed.metrics = {}
        ctx.step_metrics.update(extra)


def make_feed(ctx: RunContext, fmt: Any) -> RolloutFeed:
    return RolloutFeed(ctx, fmt)
