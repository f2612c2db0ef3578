"""Hydra entry points, and what they share."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import model
from jaxcai.chat import ChatError, ChatFormat, as_format
from jaxcai.config import model_config
from jaxcai.load import chat_format, load_model, model_config_of
from jaxcai.model_config import ModelConfig
from jaxcai.sample import SAMPLING_RULES
from jaxcai.tokenizer import Tokenizer

__all__ = ["chat_for", "language_model"]


def chat_for(
    cfg_tokenizer: str | os.PathLike | None,
    cfg_chat: str,
    checkpoint: str | os.PathLike | None,
    program: str = "jaxcai",
    chat_kwargs: Mapping[str, Any] | None = None,
) -> ChatFormat:
    """The tokenizer and chat format an entry point uses for `checkpoint` (a Hugging Face
    directory, a jaxcai run, `<run>/checkpoints` or `<run>/checkpoints/N`; None: a random
    model) given its `tokenizer=`, `chat=` and `chat_kwargs=` config values, as
    `jaxcai.load.chat_format` resolves them: `cfg_tokenizer` when set, else the
    checkpoint's own (a Hugging Face directory's files, a run's `tokenizer/` or the
    `data.tokenizer` it trained with), else (no checkpoint) the bundled tokenizer;
    `cfg_chat="auto"` takes the chat template beside the tokenizer when there is one (a
    run: the format it trained with), else the Human/Assistant transcript. Exits naming
    `program` and the path when either cannot be loaded."""
    kwargs = (
        OmegaConf.to_container(chat_kwargs) if OmegaConf.is_config(chat_kwargs) else chat_kwargs
    )
    where = cfg_tokenizer or checkpoint
    where = f" for {where}" if where else " (the bundled tokenizer)"
    try:
        return chat_format(
            checkpoint, tokenizer=cfg_tokenizer, kind=cfg_chat, template_kwargs=kwargs or None
        )
    except (ChatError, OSError, ValueError) as e:  # TokenizerError is an OSError
        sys.exit(f"{program}: cannot load the tokenizer / chat format{where}: {e}")


def language_model(
    cfg: DictConfig, mesh, tok: Tokenizer | ChatFormat, program: str, use: str
) -> tuple[ModelConfig, Any]:
    """`cfg.checkpoint` loaded (or a random `cfg.model` when it is null) in the sampling
    layout on `mesh`; exits naming `program` if the tokenizer (`tok`, or a chat format's)
    does not fit it or it is a reward model (which cannot `use`, e.g. "generate"). Call
    inside `sharding.use_mesh`."""
    tokenizer = as_format(tok).tokenizer
    # The embedding size before any weights are read (a mismatch fails fast).
    config = model_config_of(cfg.checkpoint) if cfg.checkpoint else model_config(cfg.model)
    if tokenizer.vocab_size > config.vocab_size:
        where = f" {cfg.checkpoint}" if cfg.checkpoint else ""
        sys.exit(
            f"{program}: tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but "
            f"the model{where} only {config.vocab_size} embeddings (pass the model's own "
            "tokenizer with tokenizer=PATH)"
        )
    if cfg.checkpoint:
        config, params = load_model(
            cfg.checkpoint, mesh=mesh, rules=SAMPLING_RULES, progress=cfg.progress
        )
    else:
        params = model.init_sharded(config, jax.random.key(cfg.seed), mesh, SAMPLING_RULES)
    if model.head_of(params) == "reward":
        sys.exit(f"{program}: {cfg.checkpoint} is a reward model; it cannot {use}")
    return config, params
