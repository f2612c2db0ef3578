"""The torch side of `benchmarks.train_step compare_hf=true`: one training step written out.

The weights jaxcai starts from are saved with `jaxcai.hf.save_pretrained` and loaded with
`transformers.AutoModelForCausalLM` (float32, `attn_implementation="sdpa"`,
`use_cache=False`, train mode, no dropout); the reward model is that model's backbone
plus a linear scalar head read at the last token. A step is forward, the objective's
loss in plain torch (below: the same formulas as `jaxcai.losses`), backward,
global-norm clipping, a fused `torch.optim.AdamW` step (the `transformers.Trainer`
default) and `zero_grad`: the computation TRL's `SFTTrainer`, `DPOTrainer` and
`RewardTrainer` run per step, written here in plain torch so that timing a step needs no
TRL dependency. It runs on CPU with `os.cpu_count()` threads. The learning rate of
each step is jaxcai's schedule (`jaxcai.train.make_schedule`), computed beforehand, so
both sides follow the same trajectory.

Batches are the benchmark's unpadded rows (every `segment_ids` is 1); pairs run as one
forward of the chosen rows followed by the rejected ones, as jaxcai's objectives do.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcai import hf
from jaxcai.config import ConfigError
from jaxcai.model_config import ModelConfig
from jaxcai.train import make_schedule

INSTALL_HINT = "pip install -e '.[bench]' (or the '.[test]' extra)"


def require_torch() -> None:
    """Fail early, naming the extras, when torch or transformers is not installed."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"compare_hf=true needs {' and '.join(missing)} (not installed); install the "
            f"`bench` extra: {INSTALL_HINT}"
        )


# ----- weights --------------------------------------------------------------------------


REWARD_HEAD = "reward_head.npz"


def save_weights(path: Path, config: ModelConfig, params: dict, objective: str) -> None:
    """Write `params` as a Hugging Face causal LM. For `rm`, the backbone gets the LM head
    its config needs (zeros when untied; the reward head reads none of it) and the scalar
    head goes to `reward_head.npz` beside it."""
    if objective == "rm":
        Path(path).mkdir(parents=True, exist_ok=True)
        head = {k: np.asarray(params[k]) for k in ("reward_kernel", "reward_bias")}
        np.savez(Path(path) / REWARD_HEAD, **head)
        params = {k: v for k, v in params.items() if not k.startswith("reward_")}
        if not config.tie_embeddings:
            params["lm_head"] = np.zeros((config.d_model, config.vocab_size), config.param_dtype)
    hf.save_pretrained(path, config, params, progress=False)


def load_causal_lm(path: Path) -> Any:
    """The saved checkpoint as a float32, sdpa, cache-free `transformers` model in train mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", use_cache=False
    )
    dropout = getattr(model.config, "attention_dropout", 0.0)
    if dropout:
        raise ValueError(f"{path}: attention_dropout={dropout}; the benchmark needs 0")
    return model.train()


def _reward_model_class() -> type:
    import torch

    class RewardModel(torch.nn.Module):
        """A causal LM's backbone and a linear scalar head read at the last token."""

        def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
            return self.head(hidden[:, -1]).squeeze(-1)

    return RewardModel


def load_reward_model(path: Path, center_coef: float = 0.0) -> Any:
    """The backbone saved at `path` with the scalar head from its `reward_head.npz`.

    As in jaxcai's rm objective, the bias is frozen unless `center_coef` is set (without
    centering the loss does not depend on it)."""
    import torch

    backbone = load_causal_lm(path).model
    width = backbone.config.hidden_size
    saved = np.load(Path(path) / REWARD_HEAD)
    head = torch.nn.Linear(width, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(saved["reward_kernel"]).view(1, width))
        head.bias.copy_(torch.from_numpy(saved["reward_bias"]).view(1))
    head.bias.requires_grad_(bool(center_coef))
    return _reward_model_class()(backbone, head).train()


def load_model(path: Path, oc: Any) -> Any:
    """The torch model of objective `oc` from the checkpoint `save_weights` wrote."""
    if oc.name == "rm":
        return load_reward_model(path, oc.center_coef)
    return load_causal_lm(path)


def frozen_copy(model: Any) -> Any:
    """A reference model: a copy without gradients (DPO's `reference=model`)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref


# ----- batches --------------------------------------------------------------------------

PAIR_KEYS = ("tokens", "targets", "mask", "segment_ids")


def torch_batch(rows: dict) -> dict:
    """The benchmark's numpy rows as torch tensors; a pair's sides concatenated on rows."""
    import torch

    if "chosen" in rows:
        flat = {k: np.concatenate([rows["chosen"][k], rows["rejected"][k]]) for k in PAIR_KEYS}
        flat |= {k: v for k, v in rows.items() if k not in ("chosen", "rejected")}
    else:
        flat = dict(rows)
    if not np.all(flat["segment_ids"] == 1):
        raise ValueError("torch_batch: rows must be unpadded, single-segment sequences")
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in flat.items() if k != "segment_ids"}
    out["tokens"], out["targets"] = out["tokens"].long(), out["targets"].long()
    out["mask"] = out["mask"] != 0
    return out


# ----- losses (the formulas of jaxcai.losses) ------------------------------------------


def _token_nll(logits: Any, targets: Any) -> Any:
    """-log p(target) per token [B, T], in float32."""
    import torch.nn.functional as F

    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return flat.view_as(targets)


def _masked_mean(x: Any, weight: Any) -> Any:
    """Mean of `x` over entries with a non-zero `weight` (0 when there are none)."""
    keep = (weight != 0).to(x.dtype)
    return (x * keep).sum() / keep.sum().clamp(min=1.0)


def _soft_bce(d: Any, p: Any) -> Any:
    """-(p log sigmoid(d) + (1 - p) log sigmoid(-d)) per pair."""
    import torch.nn.functional as F

    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))


def sequence_logps(model: Any, batch: dict) -> Any:
    """Sum of the masked-in token log-probs of each row [rows]."""
    logits = model(input_ids=batch["tokens"], use_cache=False).logits
    nll = _token_nll(logits, batch["targets"])
    return -(nll * batch["mask"]).sum(-1)


def sft_loss(oc: Any, model: Any, batch: dict, ref_model: Any = None) -> Any:
    """Mean token cross-entropy over the masked-in (response) tokens."""
    logits = model(input_ids=batch["tokens"], use_cache=False).logits
    nll = _token_nll(logits, batch["targets"])
    mask = batch["mask"].to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def _label(oc: Any, batch: dict, default: float) -> Any:
    return batch["p_chosen"].float() if oc.soft_labels else default


def dpo_loss(oc: Any, model: Any, batch: dict, ref_model: Any = None) -> Any:
    """Sigmoid DPO on beta * (policy - reference) log-ratio margins; the reference is
    `ref_model` under `no_grad`, else the batch's precomputed log-probs."""
    import torch

    if oc.loss_type != "sigmoid":
        raise ConfigError(f"compare_hf: objective.loss_type={oc.loss_type!r}; only sigmoid")
    logps = sequence_logps(model, batch)
    if ref_model is not None:
        with torch.no_grad():
            ref = sequence_logps(ref_model, batch)
    else:
        ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
    chosen, rejected = (logps - ref).chunk(2)
    d = oc.beta * (chosen - rejected)
    losses = _soft_bce(d, _label(oc, batch, 1.0 - oc.label_smoothing))
    return _masked_mean(losses, batch["weight"])


def rm_loss(oc: Any, model: Any, batch: dict, ref_model: Any = None) -> Any:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), plus optional centering."""
    chosen, rejected = model(batch["tokens"]).float().chunk(2)
    losses = _soft_bce(chosen - rejected - oc.margin, _label(oc, batch, 1.0))
    loss = _masked_mean(losses, batch["weight"])
    if oc.center_coef:
        loss = loss + oc.center_coef * _masked_mean((chosen + rejected) ** 2, batch["weight"])
    return loss


LOSSES: dict[str, Callable[..., Any]] = {"sft": sft_loss, "dpo": dpo_loss, "rm": rm_loss}


def torch_loss(oc: Any, model: Any, batch: dict, ref_model: Any = None) -> Any:
    """The loss of objective `oc` (`oc.name` in sft, dpo, rm) on a `torch_batch`."""
    return LOSSES[oc.name](oc, model, batch, ref_model)


# ----- the step and its timing ---------------------------------------------------------


def make_optimizer(model: Any, opt: Any) -> Any:
    """Fused AdamW with jaxcai's hyperparameters; weight decay on matrices only."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    betas = (opt.b1, opt.b2)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=betas, eps=opt.eps, fused=True)


def learning_rates(opt: Any, total_steps: int) -> list[float]:
    """jaxcai's learning rate at each of `total_steps` steps."""
    schedule = make_schedule(opt, total_steps)
    return [float(schedule(i)) for i in range(total_steps)]


def make_step(
    oc: Any, model: Any, batch: dict, opt: Any, total_steps: int, ref_model: Any = None
) -> Callable[[], float]:
    """A `() -> loss` closure running one full training step on `batch`; the learning
    rate follows jaxcai's schedule over `total_steps` (then stays at its last value)."""
    import torch

    optimizer = make_optimizer(model, opt)
    trained = [p for p in model.parameters() if p.requires_grad]
    lrs = learning_rates(opt, total_steps)
    done = 0

    def step() -> float:
        nonlocal done
        for group in optimizer.param_groups:
            group["lr"] = lrs[min(done, total_steps - 1)]
        done += 1
        loss = torch_loss(oc, model, batch, ref_model)
        loss.backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_steps(step: Callable[[], float], warmup: int, steps: int) -> dict[str, float]:
    """Like the jaxcai side: a first step, `warmup` untimed ones, then the mean of `steps`."""
    start = time.perf_counter()
    first_loss = step()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    loss = first_loss
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return {
        "first_s": first_s,
        "step_s": (time.perf_counter() - start) / steps,
        "first_loss": first_loss,
        "loss": loss,
    }


def run(path: Path, oc: Any, opt: Any, rows: dict, warmup: int, steps: int) -> dict[str, float]:
    """Load the checkpoint at `path` and time the torch train step of `oc` on `rows`
    (optimizer config `opt`, with its schedule over the `1 + warmup + steps` steps)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(path, oc)
    ref_model = frozen_copy(model) if oc.name == "dpo" and oc.reference == "model" else None
    total = 1 + warmup + steps
    step = make_step(oc, model, torch_batch(rows), opt, total, ref_model)
    return time_steps(step, warmup, steps)
