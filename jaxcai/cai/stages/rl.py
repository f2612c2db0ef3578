"""Stage `rl`: RL-CAI online, the paper's second phase. The SL-CAI policy (`sft`) is
trained with `rl.algorithm` (ppo, rloo, grpo or online_dpo) on the training prompts of
the feedback stage's prompt sets, against the pipeline's preference model (`rm`) or with
the feedback model as the judge in the loop; the reference policy is the SL-CAI policy.

`rl.reward: auto` scores with the reward model for ppo, rloo and grpo and with the judge
for online_dpo; `rm` or `judge` choose. The judge asks the pipeline's constitution with
its feedback settings (few-shot, both orders). Every other key of the `rl` section is a
`jaxcai-train` setting over `train` (e.g. `rl.trainer.steps`, `rl.rollout.samples`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai.cai import io
from jaxcai.cai.context import RunContext
from jaxcai.cai.stages.base import PipelineError, Stage, register
from jaxcai.cai.stages.train import train_config, train_stage
from jaxcai.rl.objectives import RL_OBJECTIVES

__all__ = ["RLStage", "rl_config"]

STAGE_KEYS = ("algorithm", "reward")  # the rest of `rl` is jaxcai-train settings
REWARDS = ("auto", "rm", "judge")


def _reward(context: RunContext, algorithm: str, inputs: dict[str, str]) -> dict[str, Any]:
    """The reward source's settings for the RL run."""
    choice = str(context.cfg.rl.get("reward", "auto"))
    if choice not in REWARDS:
        raise PipelineError(f"config rl.reward={choice!r}: choose one of {REWARDS}")
    if choice == "auto":
        choice = "judge" if algorithm == "online_dpo" else "rm"
    if choice == "rm":
        if "rm" not in inputs:
            raise PipelineError(
                f"stage rl (rl.algorithm={algorithm}) scores with the reward model: add rm to "
                "stages, hand one in with inputs.rm=PATH, or set rl.reward=judge"
            )
        return {"reward_model": inputs["rm"]}
    cfg = context.cfg
    return {
        "reward": {
            "judge": cfg.feedback_model or inputs["initial"],
            "constitution": str(cfg.cai.constitution),
            "few_shot": bool(cfg.feedback.few_shot),
            "debias": bool(cfg.feedback.debias),
        }
    }


def rl_config(context: RunContext, data: str, inputs: dict[str, str]) -> DictConfig:
    """The `jaxcai-train` config of the `rl` stage."""
    rl = context.cfg.rl
    algorithm = str(rl.algorithm)
    if algorithm not in RL_OBJECTIVES:
        raise PipelineError(f"config rl.algorithm={algorithm!r}: choose one of {RL_OBJECTIVES}")
    section = {k: v for k, v in OmegaConf.to_container(rl).items() if k not in STAGE_KEYS}
    cfg = train_config(context, "rl", data, inputs["sft"], objective=algorithm, section=section)
    return OmegaConf.merge(cfg, _reward(context, algorithm, inputs))


@dataclasses.dataclass
class RLStage(Stage):
    """Online RL of the SL-CAI policy (see the module docstring)."""

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        cfg = context.cfg
        prompts = [p for s in cfg.feedback.prompt_sets for p in context.prompts[s]["train"]]
        if not prompts:
            raise PipelineError(f"stage rl: the prompt sets {list(cfg.feedback.prompt_sets)} "
                                "have no training prompts")  # fmt: skip
        out = context.stage_dir(self.name)
        data = out / "prompts.jsonl"
        if jax.process_index() == 0:
            io.write_jsonl(data, [{"prompt": p} for p in prompts])
        _barrier()
        cfg = rl_config(context, str(data), inputs)
        return train_stage(context, self.name, cfg, str(data), inputs["sft"])


def _barrier() -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rl prompts written")


RL = register(RLStage("rl", needs=("initial", "sft"), uses=("rm",), produces="model"))
