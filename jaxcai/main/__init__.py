"""Hydra entry points, and what they share."""

from __future__ import annotations

import sys
from typing import Any

import jax
from omegaconf import DictConfig

from jaxcai import model
from jaxcai.config import model_config
from jaxcai.load import load_model
from jaxcai.model_config import ModelConfig
from jaxcai.sample import SAMPLING_RULES
from jaxcai.tokenizer import Tokenizer


def language_model(
    cfg: DictConfig, mesh, tok: Tokenizer, program: str, use: str
) -> tuple[ModelConfig, Any]:
    """`cfg.checkpoint` loaded (or a random `cfg.model` when it is null) in the sampling
    layout on `mesh`; exits naming `program` if `tok` does not fit it or it is a reward
    model (which cannot `use`, e.g. "generate"). Call inside `sharding.use_mesh`."""
    if cfg.checkpoint:
        config, params = load_model(
            cfg.checkpoint, mesh=mesh, rules=SAMPLING_RULES, progress=cfg.progress
        )
    else:
        config = model_config(cfg.model)
        params = model.init_sharded(config, jax.random.key(cfg.seed), mesh, SAMPLING_RULES)
    if tok.vocab_size > config.vocab_size:
        sys.exit(
            f"{program}: tokenizer {tok.source} has {tok.vocab_size} pieces but the model "
            f"only {config.vocab_size} embeddings"
        )
    if "reward_kernel" in params:
        sys.exit(f"{program}: {cfg.checkpoint} is a reward model; it cannot {use}")
    return config, params
