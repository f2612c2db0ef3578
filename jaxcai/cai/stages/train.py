"""The training stages `sft`, `rm` and `dpo`: one `TrainStage(objective)` each, an
ordinary `jaxcai-train` run on another stage's dataset from another stage's model."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import objectives
from jaxcai.cai import io
from jaxcai.cai.context import RunContext
from jaxcai.cai.provenance import dataset_provenance, model_card, plain
from jaxcai.cai.stages.base import Stage, get, register
from jaxcai.config import ConfigError, compose

__all__ = ["TrainStage", "train_config", "train_stage"]

# the `data` config group a training stage composes, by its objective's data kind
DATA_GROUP = {"text": "pretrain", "sft": "sft", "preference": "preferences"}
# objective -> (the stage whose dataset it trains on, the stage whose model it starts from)
WIRING = {"sft": ("critique", "initial"), "rm": ("feedback", "sft"), "dpo": ("feedback", "sft")}


def train_config(
    context: RunContext,
    stage: str,
    data: str,
    init_from: str,
    *,
    objective: str | None = None,
    section: Any = None,
) -> DictConfig:
    """The `jaxcai-train` config of a training stage: the objective's defaults, then
    `train` (shared), then the stage's own section, then the pipeline's wiring.
    `objective` and `section` default to the stage's objective and `cfg[stage]`."""
    objective = objective or get_objective(stage)
    record = objectives.get(objective)
    cfg_in = context.cfg
    groups = [f"objective={objective}"]
    if record.data_kind in DATA_GROUP:  # a prompts objective reads only data.train
        groups.append(f"data={DATA_GROUP[record.data_kind]}")
    cfg = compose(groups, "train")
    cfg = OmegaConf.merge(cfg, {"mesh": cfg_in.mesh, "model": cfg_in.model})
    sections = (("train", cfg_in.train), (stage, cfg_in[stage] if section is None else section))
    for key, values in sections:
        try:
            cfg = OmegaConf.merge(cfg, values or {})
        except Exception as e:  # an unknown or mistyped key
            raise ConfigError(f"config {key}: {e}") from e
    cfg.data.train = data
    cfg.data.tokenizer = cfg_in.tokenizer
    cfg.data.chat = context.chat.kind  # every policy keeps the initial policy's format
    cfg.data.chat_kwargs = getattr(context.chat, "template_kwargs", {})
    cfg.trainer.init_from = init_from
    cfg.trainer.progress = context.progress
    if record.pairs:  # trained on the AI-feedback labels
        cfg.objective.soft_labels = cfg_in.feedback.labels == "soft"
    return cfg


def get_objective(stage: str) -> str:
    """The training objective of a training stage (its `TrainStage.objective`)."""
    found = get(stage)
    if not isinstance(found, TrainStage):
        raise ConfigError(f"stage {stage} is not a training stage")
    return found.objective


@dataclasses.dataclass
class TrainStage(Stage):
    """Train `objective` on the dataset of `needs[0]` from the model of `needs[1]`."""

    objective: str = "sft"

    @classmethod
    def of(cls, objective: str, data_from: str, init_from: str) -> TrainStage:
        """The stage named after its objective, wired to its data and starting model."""
        return cls(objective, needs=(data_from, init_from), produces="model", objective=objective)

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        data, init_from = (inputs[n] for n in self.needs)
        cfg = train_config(context, self.name, data, init_from)
        return train_stage(context, self.name, cfg, data, init_from)


def train_stage(
    context: RunContext, stage: str, cfg: DictConfig, data: str, init_from: str
) -> tuple[str, dict[str, Any]]:
    """Run `jaxcai-train` with `cfg` in `stage`'s directory; write its provenance and
    model card; return the run's directory and summary."""
    from jaxcai.loop import run as train

    out = context.stage_dir(stage)
    summary = train(cfg, out)
    provenance = context.provenance(
        stage,
        data=data,
        data_provenance=dataset_provenance(data),
        init_from=init_from,
        objective=plain(cfg.objective),
        trainer=plain(cfg.trainer),
        optimizer=plain(cfg.optimizer),
    )
    if jax.process_index() == 0:
        io.write_json(out / "provenance.json", provenance)
        (out / "MODEL_CARD.md").write_text(model_card(stage, provenance, summary))
    return str(out), summary


SFT = register(TrainStage.of("sft", *WIRING["sft"]))
RM = register(TrainStage.of("rm", *WIRING["rm"]))
DPO = register(TrainStage.of("dpo", *WIRING["dpo"]))
