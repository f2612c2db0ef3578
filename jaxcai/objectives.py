"""What an objective is, in one record per objective, and the registry that names them.

An `Objective` says everything the rest of the library asks about an objective: the data
kind it reads (`text`, `sft`, `preference`), the model head it trains (`lm` or
`reward`), whether its batches are (chosen, rejected) pairs, whether it needs a frozen
reference policy, the metric its loss is weighted by when micro-batches are accumulated,
the pure loss function, and the layout of one batch (`batch_layout`: the abstract batch
the data pipeline's checks, ahead-of-time compilation and the benchmarks all use).

The built-in objectives are `lm`, `sft`, `rm` and `dpo`. A new one is one record:

    from jaxcai import objectives
    objectives.register(objectives.Objective(name="my_sft", data_kind="sft", loss=my_loss))

and `jaxcai-train plugins=[my_module] objective.name=my_sft` trains it (`plugins` are
modules imported at start-up, so their records are registered before the config is
checked). A loss maps `(model_config, objective_config, params, micro_batch, ref_params)`
to `(loss, metrics)`, where `metrics[objective.weight]` is the number of tokens or pairs
the loss averages over.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcai.logprobs import token_logps_of
from jaxcai.losses import (
    dpo_loss,
    reward_loss,
    sequence_logps_from_logps,
    sft_loss_from_logps,
)
from jaxcai.model import Params, reward_forward, value_forward
from jaxcai.model_config import ModelConfig

__all__ = [
    "COUNT_METRICS",
    "PACKED_EXTRA",
    "ROW_KEYS",
    "Objective",
    "ObjectiveError",
    "batch_layout",
    "check_batch",
    "get",
    "import_plugins",
    "names",
    "register",
]

Batch = dict[str, Any]
Loss = Callable[[ModelConfig, Any, Params, Batch, Params | None], tuple[jax.Array, dict]]
ROW_KEYS = ("tokens", "targets", "mask", "segment_ids", "positions")  # one [rows, T] each
PACKED_EXTRA = ("branch", "pair")  # packed preference rows (jaxcai.data.pairs)
COUNT_METRICS = ("tokens", "pairs")  # counts: summed over micro-batches, not averaged
DATA_KINDS = ("text", "sft", "preference", "prompts")  # prompts: online RL samples its rows


class ObjectiveError(ValueError):
    """An unknown objective, a record that cannot work, or a batch of the wrong layout."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective, as every part of the library sees it."""

    name: str
    data_kind: str  # text | sft | preference: what `jaxcai.data.training` opens
    loss: Loss
    head: str = "lm"  # lm | reward: the params the model is initialised / loaded with
    pairs: bool = False  # batches hold `chosen` and `rejected` rows (and `p_chosen`)
    weight: str = "tokens"  # the count metric the loss is an average over (tokens, pairs, ...)
    reference: bool = False  # needs a frozen reference policy (`objective.reference`)
    hooks: Callable[[Any], list] | None = None  # context -> extra hooks (jaxcai.hooks)
    # (cfg, trainer, data, chat format) -> the run's batch source, instead of the data
    # pipeline's `Feed` (online RL: batches sampled from the policy); see jaxcai.loop
    feed: Callable[..., Any] | None = None
    # (oc, rows, length) -> extra keys of a batch (per-token or per-row arrays)
    extra_layout: Callable[[Any, int, int], dict] | None = None
    validate: Callable[[Any], None] | None = None  # whole-config checks (ConfigError)
    doc: str = ""

    def __post_init__(self):
        if self.data_kind not in DATA_KINDS:
            raise ObjectiveError(f"objective {self.name}: data_kind must be one of {DATA_KINDS}")
        if self.head not in ("lm", "reward"):
            raise ObjectiveError(f"objective {self.name}: head must be lm or reward")
        if not self.weight:
            raise ObjectiveError(f"objective {self.name}: weight must name a count metric")
        if self.data_kind == "preference" and not self.pairs:
            raise ObjectiveError(f"objective {self.name}: preference data gives pairs")
        if self.pairs and self.data_kind not in ("preference", "prompts"):
            raise ObjectiveError(f"objective {self.name}: pairs come from preference data")
        if (self.data_kind == "prompts") != (self.feed is not None):
            raise ObjectiveError(f"objective {self.name}: a prompts objective makes its feed")

    @property
    def counts(self) -> frozenset[str]:
        """Metrics that are counts (summed over micro-batches and eval batches); every
        other metric is a `weight`-weighted mean."""
        return frozenset((*COUNT_METRICS, self.weight))

    def reference_mode(self, oc: Any) -> str | None:
        """`precompute` or `model` for an objective with a reference, else None."""
        return str(oc.reference) if self.reference else None


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective, *, replace: bool = False) -> Objective:
    """Add `objective` to the registry (an existing name needs `replace=True`)."""
    if objective.name in _REGISTRY and not replace and _REGISTRY[objective.name] != objective:
        raise ObjectiveError(f"objective {objective.name!r} is already registered")
    _REGISTRY[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    """The registered objective called `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ObjectiveError(
            f"unknown objective {name!r}: choose one of {names()} (or register one; "
            "see jaxcai.objectives)"
        ) from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def import_plugins(modules: Iterable[str], key: str = "plugins") -> None:
    """Import each named module (which registers its objectives or stages)."""
    for module in modules or ():
        try:
            importlib.import_module(str(module))
        except ImportError as e:
            raise ObjectiveError(f"config {key}: cannot import {module!r}: {e}") from e


# ----- batch layout ---------------------------------------------------------------------


def batch_layout(
    objective: Objective, oc: Any, rows: int, length: int, packed_rows: int | None = None
) -> Batch:
    """Shapes and dtypes (`jax.ShapeDtypeStruct`s) of one micro-batch of `rows` rows
    (pairs for pair objectives) of `length` tokens: the one statement of a batch's keys.
    With `packed_rows`, the pairs are packed (`jaxcai.data.pairs`) into that many rows
    of `length` tokens."""
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    per_row = jax.ShapeDtypeStruct((rows,), jnp.float32)
    extra = objective.extra_layout(oc, rows, length) if objective.extra_layout else {}
    if not objective.pairs:
        return {**{k: ids for k in ROW_KEYS}, "weight": per_row, **extra}
    if packed_rows is not None:
        packed_ids = jax.ShapeDtypeStruct((packed_rows, length), jnp.int32)
        batch = {"packed": {k: packed_ids for k in (*ROW_KEYS, *PACKED_EXTRA)}}
    else:
        batch = {"chosen": {k: ids for k in ROW_KEYS}, "rejected": {k: ids for k in ROW_KEYS}}
    batch["p_chosen"] = per_row
    if objective.reference_mode(oc) == "precompute":
        batch["ref_chosen_logps"] = per_row
        batch["ref_rejected_logps"] = per_row
    batch["weight"] = per_row
    return {**batch, **extra}


def check_batch(objective: Objective, oc: Any, batch: Batch, where: str = "batch") -> None:
    """Raise `ObjectiveError` when `batch` lacks a key of the objective's layout or holds
    one it does not have (`positions` may be absent: the model then counts positions).
    Pair batches may be packed (`jaxcai.data.pairs`)."""
    packed = objective.pairs and "packed" in batch
    want = batch_layout(objective, oc, 1, 1, packed_rows=1 if packed else None)

    def keys(tree: Batch, prefix: str = "") -> set[str]:
        out = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    expected, got = keys(want), keys(batch)
    missing = {k for k in expected - got if not k.endswith("positions")}
    if missing or got - expected:
        raise ObjectiveError(
            f"{where}: objective {objective.name} expects keys {sorted(expected)}; "
            f"missing {sorted(missing)}, unexpected {sorted(got - expected)}"
        )


# ----- the built-in losses --------------------------------------------------------------


def _pair(batch: Batch, key: str) -> jax.Array | None:
    """Chosen rows then rejected rows: one forward pass serves both."""
    if key not in batch["chosen"]:
        return None
    return jnp.concatenate([batch["chosen"][key], batch["rejected"][key]], axis=0)


def model_inputs(batch: Batch, pair: bool = False) -> dict[str, jax.Array | None]:
    """Model inputs of a batch: tokens, segment ids, and positions when the pipeline
    packed examples (positions restart per segment either way)."""
    get_ = (lambda k: _pair(batch, k)) if pair else batch.get
    return {
        "tokens_BT": get_("tokens"),
        "segment_ids_BT": get_("segment_ids"),
        "positions_BT": get_("positions"),
    }


def _packed_inputs(rows: Batch) -> dict[str, jax.Array]:
    """Model inputs of packed pair rows: the branches shape the attention mask."""
    return {
        "tokens_BT": rows["tokens"],
        "segment_ids_BT": rows["segment_ids"],
        "positions_BT": rows["positions"],
        "branch_BT": rows["branch"],
    }


def _per_pair(values_BT: jax.Array, where_BT: jax.Array, pair_BT: jax.Array, n: int):
    """Sum of `values_BT` over each pair's tokens where `where_BT` [n]."""
    values = jnp.where(where_BT, values_BT, 0).reshape(-1)
    return jax.ops.segment_sum(values, pair_BT.reshape(-1), num_segments=n)


def pair_logps(mc: ModelConfig, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs and response token counts of chosen then rejected [2 * pairs],
    from unpacked rows or packed ones (one forward pass either way)."""
    if "packed" in batch:
        rows, n = batch["packed"], batch["weight"].shape[0]
        inputs = _packed_inputs(rows)
        logps, _ = token_logps_of(mc, params, inputs, rows["targets"], rows["mask"])
        sides = [(rows["mask"] != 0) & (rows["branch"] == b) for b in (1, 2)]
        sums = [_per_pair(logps, side, rows["pair"], n) for side in sides]
        counts = [_per_pair(jnp.ones_like(logps), side, rows["pair"], n) for side in sides]
        return jnp.concatenate(sums), jnp.concatenate(counts)
    inputs, mask = model_inputs(batch, pair=True), _pair(batch, "mask")
    logps, _ = token_logps_of(mc, params, inputs, _pair(batch, "targets"), mask)
    return sequence_logps_from_logps(logps, mask)


def pair_rewards(mc: ModelConfig, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The reward head's scalar for chosen and for rejected [pairs] each, read at each
    side's last token (unpacked rows or packed ones)."""
    if "packed" not in batch:
        return jnp.split(reward_forward(mc, params, **model_inputs(batch, pair=True)), 2)
    rows, n = batch["packed"], batch["weight"].shape[0]
    scores_BT = value_forward(mc, params, **_packed_inputs(rows))
    slots_BT = jnp.arange(scores_BT.size, dtype=jnp.int32).reshape(scores_BT.shape)
    real_BT = rows["segment_ids"] > 0
    out = []
    for b in (1, 2):
        where = jnp.where(real_BT & (rows["branch"] == b), slots_BT, -1).reshape(-1)
        last = jax.ops.segment_max(where, rows["pair"].reshape(-1), num_segments=n)
        out.append(scores_BT.reshape(-1)[jnp.maximum(last, 0)])
    return out[0], out[1]


def _soft_label(oc: Any, batch: Batch) -> jax.Array | None:
    return batch["p_chosen"] if oc.soft_labels else None


def lm_loss(mc: ModelConfig, oc: Any, params: Params, batch: Batch, ref_params=None):
    """Next-token cross entropy over `mask` (every token for `lm`, the response for `sft`)."""
    inputs = model_inputs(batch)
    logps, correct = token_logps_of(mc, params, inputs, batch["targets"], batch["mask"])
    return sft_loss_from_logps(logps, correct, batch["mask"])


def rm_loss(mc: ModelConfig, oc: Any, params: Params, batch: Batch, ref_params=None):
    """Bradley-Terry loss of the reward head on (chosen, rejected) pairs."""
    if not oc.center_coef:
        # Without centering the loss is blind to a shift of all rewards: the bias has an
        # exactly zero gradient, and Adam would otherwise amplify rounding noise into steps.
        params = {**params, "reward_bias": jax.lax.stop_gradient(params["reward_bias"])}
    chosen, rejected = pair_rewards(mc, params, batch)
    return reward_loss(
        chosen,
        rejected,
        margin=oc.margin or None,
        soft_label=_soft_label(oc, batch),
        center_coef=oc.center_coef,
        mask_B=batch["weight"],
    )


def dpo_objective_loss(mc: ModelConfig, oc: Any, params: Params, batch: Batch, ref_params=None):
    """DPO-family loss against an in-step reference model or precomputed log-probs."""
    logps, counts = pair_logps(mc, params, batch)
    if ref_params is not None:
        ref_chosen, ref_rejected = jnp.split(pair_logps(mc, ref_params, batch)[0], 2)
    else:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    chosen, rejected = jnp.split(logps, 2)
    chosen_n, rejected_n = jnp.split(counts, 2)
    return dpo_loss(
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


def reference_logps(mc: ModelConfig, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """Sequence log-probs of chosen and rejected under `params` (DPO's reference)."""
    chosen, rejected = jnp.split(pair_logps(mc, params, batch)[0], 2)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


LM = register(Objective("lm", "text", lm_loss, doc="next-token loss on every token of packed text"))
SFT = register(Objective("sft", "sft", lm_loss, doc="next-token loss on the response only"))
RM = register(
    Objective(
        "rm",
        "preference",
        rm_loss,
        head="reward",
        pairs=True,
        weight="pairs",
        doc="Bradley-Terry reward model on preference pairs",
    )
)
DPO = register(
    Objective(
        "dpo",
        "preference",
        dpo_objective_loss,
        pairs=True,
        weight="pairs",
        reference=True,
        doc="direct preference optimisation against a frozen reference",
    )
)


from jaxcai.rl import objectives as _rl_objectives  # noqa: E402, F401  (ppo, rloo, grpo, online_dpo)
