"""Stage `initial`: the helpful model to start from (`policy`), or a randomly initialised
`model` for smoke runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxcai import hf, model, streams
from jaxcai.cai.context import RunContext
from jaxcai.cai.stages.base import Stage, register
from jaxcai.config import model_config


@dataclasses.dataclass
class InitialStage(Stage):
    """`policy` as it is, or random weights of `model` saved as a Hugging Face model."""

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        cfg = context.cfg
        if cfg.policy:
            return str(cfg.policy), {"random_init": False}
        config = model_config(cfg.model)
        key = jax.random.key(streams.seed("initial.params", cfg.seed))
        params = model.init_params(config, key)
        path = context.stage_dir(self.name) / "hf"
        hf.save_pretrained(path, config, params, progress=False, tokenizer=context.chat.tokenizer)
        return str(path), {"random_init": True}


INITIAL = register(InitialStage("initial", produces="model", always=True))
