"""The pipeline's settings: plugins, validation of its own keys, the train/eval split of
the prompt sets, the policy's and feedback model's chat formats, and the mesh the
sampling stages load models on."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import sharding, streams
from jaxcai.chat import ChatError, ChatFormat
from jaxcai.config import CHAT_KINDS, ConfigError, model_config
from jaxcai.data.training import open_dataset
from jaxcai.load import chat_format, model_config_of

log = logging.getLogger(__name__)

__all__ = [
    "PLACEMENTS",
    "chat_formats",
    "load_plugins",
    "sampling_mesh",
    "split_prompts",
    "validate_cai",
]

# How the sampling stages place a model in a multi-process launch (`sampling.placement`).
PLACEMENTS = ("replicated", "sharded")


def load_plugins(cfg: DictConfig) -> list[str]:
    """Import the modules `plugins` names (each registers its stages as it is imported);
    a module that fails to import is a `ConfigError` naming `plugins`."""
    names = list(cfg.get("plugins") or [])
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config plugins={names!r}: each entry is a module name")
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or the module's own error at import
            raise ConfigError(f"config plugins: cannot import {name!r}: {e}") from e
    return names


def validate_cai(cfg: DictConfig) -> None:
    """Check the pipeline's own keys; raise `ConfigError` naming the key."""
    from jaxcai.cai import stages

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"config {key}={value!r}: {why}")

    names = stages.runnable()
    bad = [s for s in cfg.stages if s not in names]
    check(not bad, "stages", list(cfg.stages), f"unknown {bad}; stages are {names}")
    unknown = [k for k in (cfg.inputs or {}) if k not in names]
    handed = tuple(n for n in names if stages.get(n).produces != "results")
    check(not unknown, "inputs", unknown, f"inputs name stages: {handed}")
    check(cfg.cai.revision_rounds >= 0, "cai.revision_rounds", cfg.cai.revision_rounds, ">= 0")
    rounds = cfg.cai.sft_rounds
    check(
        rounds in ("all", "final") or (isinstance(rounds, int) and rounds >= 1),
        "cai.sft_rounds",
        rounds,
        "all, final or a round count >= 1",
    )
    check(cfg.cai.helpful_ratio >= 0, "cai.helpful_ratio", cfg.cai.helpful_ratio, "must be >= 0")
    check(
        cfg.feedback.labels in ("soft", "hard"),
        "feedback.labels",
        cfg.feedback.labels,
        "soft or hard",
    )
    check(cfg.feedback.principles >= 1, "feedback.principles", cfg.feedback.principles, ">= 1")
    sets = [s for s in cfg.feedback.prompt_sets if s not in ("red_team", "helpful")]
    check(not sets, "feedback.prompt_sets", sets, "choose from red_team, helpful")
    check(cfg.chunk_size >= 1, "chunk_size", cfg.chunk_size, "must be >= 1")
    for key in ("chat", "feedback_chat"):
        value = cfg.get(key, "auto")
        check(value in CHAT_KINDS, key, value, f"choose one of {CHAT_KINDS}")
    check(
        0 <= cfg.prompts.eval_fraction < 1,
        "prompts.eval_fraction",
        cfg.prompts.eval_fraction,
        "must be in [0, 1)",
    )
    check(
        cfg.sampling.max_new_tokens >= 1,
        "sampling.max_new_tokens",
        cfg.sampling.max_new_tokens,
        ">= 1",
    )
    check(cfg.sampling.batch_size >= 1, "sampling.batch_size", cfg.sampling.batch_size, ">= 1")
    placement = cfg.sampling.get("placement", "replicated")
    check(placement in PLACEMENTS, "sampling.placement", placement, f"one of {PLACEMENTS}")


def sampling_mesh(cfg: DictConfig) -> jax.sharding.Mesh:
    """The mesh the sampling stages load models on. One process: `mesh` over its devices.
    Several, `sampling.placement=replicated`: this process's devices alone, `mesh.tensor`
    ways tensor parallel and the rest data parallel (each process samples its share of
    the prompts with no collectives). `sharded`: `mesh` over every process's devices
    (all processes run each batch together, its rows spread over all devices)."""
    mesh_cfg = sharding.MeshConfig(**cfg.mesh)
    placement = cfg.sampling.get("placement", "replicated")
    if jax.process_count() == 1 or placement == "sharded":
        return sharding.make_mesh(mesh_cfg)
    local = sharding.MeshConfig(data=-1, fsdp=1, tensor=mesh_cfg.tensor)
    try:
        return sharding.make_mesh(local, devices=jax.local_devices())
    except ValueError as e:
        raise ConfigError(
            f"config sampling.placement=replicated: mesh.tensor={mesh_cfg.tensor} must divide "
            f"this process's {jax.local_device_count()} devices ({e})"
        ) from e


def split_prompts(cfg: DictConfig) -> tuple[dict[str, dict[str, list[str]]], dict[str, Any]]:
    """Each prompt set's train and held-out eval prompts (a seeded split unless the
    dataset has an `eval` split), and where they came from."""
    out, sources = {}, {}
    for name in ("red_team", "helpful"):
        spec = cfg.prompts[name]
        if not spec:
            out[name], sources[name] = {"train": [], "eval": []}, None
            continue
        ds = open_dataset(str(spec), "prompts", key=f"prompts.{name}")
        train = [r["prompt"] for r in ds.records("train")]
        if "eval" in ds.splits:
            held = [r["prompt"] for r in ds.records("eval")]
        else:
            base = streams.seed("prompts", cfg.seed)
            order = streams.rng("prompts.split", base).permutation(len(train))
            k = int(round(cfg.prompts.eval_fraction * len(train)))
            held = [train[i] for i in sorted(order[:k])]
            train = [train[i] for i in sorted(order[k:])]
        if cfg.prompts.limit:
            train = train[: cfg.prompts.limit]
        out[name] = {"train": train, "eval": held}
        sources[name] = {
            "spec": str(spec),
            "inputs": ds.metadata.get("inputs"),
            "train": len(train),
            "eval": len(held),
        }
    return out, sources


def _model_vocab(cfg: DictConfig, model_key: str) -> int:
    """The embedding rows of `cfg[model_key]` (a random initial policy's when unset);
    a path that is no model is a `ConfigError` now, not after hours of sampling."""
    vocab = model_config(cfg.model).vocab_size
    if cfg[model_key]:
        try:
            vocab = model_config_of(cfg[model_key]).vocab_size
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config {model_key}={cfg[model_key]!r}: {e}") from e
    return vocab


def chat_formats(cfg: DictConfig) -> tuple[ChatFormat, ChatFormat]:
    """The policy's and the feedback model's tokenizer and chat format: `tokenizer` /
    `feedback_tokenizer` when set, else each model's own files, else the bundled
    tokenizer; `chat` / `feedback_chat` pick the format. Text passes between the two as
    text, so they may differ. Each tokenizer must fit its model's embeddings."""
    pairs = [
        ("policy", "tokenizer", "chat"),
        ("feedback_model", "feedback_tokenizer", "feedback_chat"),
    ]
    formats = []
    for model_key, tok_key, chat_key in pairs:
        if model_key == "feedback_model" and not cfg.feedback_model:
            if cfg.get(tok_key) or cfg.get(chat_key, "auto") != "auto":
                raise ConfigError(f"config {tok_key}/{chat_key}: set feedback_model too")
            formats.append(formats[0])
            continue
        vocab = _model_vocab(cfg, model_key)
        try:
            kwargs = cfg.get(f"{chat_key}_kwargs")
            fmt = chat_format(
                cfg[model_key],
                tokenizer=cfg.get(tok_key),
                kind=cfg.get(chat_key, "auto"),
                template_kwargs=OmegaConf.to_container(kwargs) if kwargs else None,
            )
        except (ChatError, OSError, ValueError) as e:
            raise ConfigError(f"config {model_key}/{tok_key}/{chat_key}: {e}") from e
        if fmt.tokenizer.vocab_size > vocab:
            raise ConfigError(
                f"config {tok_key}: {fmt.tokenizer.source} has {fmt.tokenizer.vocab_size} "
                f"tokens, more than the {model_key}'s {vocab} embeddings"
            )
        formats.append(fmt)
    log.info("chat formats: policy %s, feedback %s", formats[0].describe(), formats[1].describe())
    return formats[0], formats[1]
