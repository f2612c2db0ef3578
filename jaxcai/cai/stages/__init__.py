"""The CAI pipeline's stages, one module each, and the registry they declare themselves in.

    initial   the helpful model to start from (`policy`), or a random one for smoke runs
    critique  SL-CAI data: critique -> revision rounds on red-team prompts, mixed with
              sampled answers to helpfulness prompts          -> critique/dataset (sft)
    sft       supervised fine-tuning on it                      -> sft/ (a training run)
    feedback  RL-CAI data: pairs from the SL-CAI policy, labelled by the feedback model
                                                                -> feedback/dataset (pref.)
    rm        a reward model on the AI-feedback labels          -> rm/
    dpo       DPO of the SL-CAI policy on them                  -> dpo/
    rl        online RL of the SL-CAI policy (`rl.algorithm`: ppo, rloo, grpo,
              online_dpo) against the reward model or the judge -> rl/
    eval      held-out prompts: the policies compared           -> eval/results.json

Each stage declares what it needs and produces (`base.Stage`); `jaxcai.cai.run` orders
them from those declarations. A new stage is a module that subclasses `Stage` and calls
`register` at import; listing that module in the config's `plugins` imports it before the
run starts, so no other file changes.
"""

# The built-in stages register themselves as they are imported (registration order only
# breaks ties between stages the graph leaves unordered, such as rm and dpo).
from jaxcai.cai.stages import critique, evaluate, feedback, initial, rl, train
from jaxcai.cai.stages.base import (
    PRODUCTS,
    PipelineError,
    Stage,
    get,
    order,
    register,
    registered,
    runnable,
)
from jaxcai.cai.stages.train import TrainStage, train_config

# The built-in stage names a config may list (the initial policy always runs).
STAGES: tuple[str, ...] = runnable()

__all__ = [
    "PRODUCTS",
    "STAGES",
    "PipelineError",
    "Stage",
    "TrainStage",
    "critique",
    "evaluate",
    "feedback",
    "get",
    "initial",
    "order",
    "register",
    "registered",
    "rl",
    "runnable",
    "train",
    "train_config",
]
