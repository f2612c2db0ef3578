"""Evaluation entry point: `jaxcai-eval [overrides]` (see `configs/eval.yaml`).

Loads a model (Hugging Face directory, jaxcai run, or a random `model` for smoke tests)
with its tokenizer and chat format (`jaxcai.main.chat_for`: the checkpoint's own unless
`tokenizer=` / `chat=` say otherwise) and runs one task: `choice` scores
multiple-choice items (`jaxcai.evals.choice`), `generation` answers SFT prompts and
compares with the references (`jaxcai.evals.generation`). Prints a markdown table and
writes the JSON report.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jaxcai import sharding
from jaxcai.config import CONFIG_PATH, ConfigError
from jaxcai.data.records import DataError, describe_counts
from jaxcai.data.training import open_dataset
from jaxcai.evals import choice, generation
from jaxcai.main import chat_for, language_model
from jaxcai.sample import SAMPLING_RULES

DEFAULT_DATASET = {"choice": "bundled:choice_smoke.jsonl", "generation": "bundled:sft.jsonl"}


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming the first bad key."""
    count = lambda key, low: type(cfg[key]) is int and cfg[key] >= low
    checks = [
        ("task", cfg.task in DEFAULT_DATASET, f"choose one of {tuple(DEFAULT_DATASET)}"),
        ("normalize", cfg.normalize in choice.NORMALIZE, f"choose one of {choice.NORMALIZE}"),
        ("limit", count("limit", 0), "must be an integer >= 0"),
        ("batch_size", count("batch_size", 1), "must be an integer >= 1"),
        ("max_new_tokens", count("max_new_tokens", 1), "must be an integer >= 1"),
        ("temperature", isinstance(cfg.temperature, int | float) and cfg.temperature >= 0, ">= 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config {key}={cfg[key]!r}: {why}")


def _dataset_spec(cfg: DictConfig) -> str | list[str]:
    spec = cfg.dataset if cfg.dataset is not None else DEFAULT_DATASET[cfg.task]
    return [str(s) for s in spec] if OmegaConf.is_list(spec) else str(spec)


def _choice_items(cfg: DictConfig) -> list[choice.ChoiceItem]:
    skipped: collections.Counter | None = collections.Counter() if cfg.skip_invalid else None
    files = choice.choice_files(_dataset_spec(cfg))
    items = [it for path in files for it in choice.read_choice_file(path, skipped)]
    if skipped:
        n = sum(skipped.values())
        logging.warning("skipped %d invalid items (%s)", n, describe_counts(skipped))
    return items[: cfg.limit] if cfg.limit else items


def _sft_records(cfg: DictConfig) -> list[dict[str, Any]]:
    spec = _dataset_spec(cfg)
    if not isinstance(spec, str):
        raise ConfigError(f"config dataset={spec!r}: task=generation reads one dataset")
    ds = open_dataset(spec, "sft", skip_invalid=cfg.skip_invalid, key="dataset")
    records = ds.records("eval" if "eval" in ds.splits else "train")
    return list(itertools.islice(records, cfg.limit or None))


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base=None)
def main(cfg: DictConfig) -> float:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        check_config(cfg)
        fmt = chat_for(cfg.tokenizer, cfg.chat, cfg.checkpoint, "jaxcai-eval", cfg.chat_kwargs)
        data = _choice_items(cfg) if cfg.task == "choice" else _sft_records(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.exit(f"jaxcai-eval: {e}")
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    with sharding.use_mesh(mesh, SAMPLING_RULES):
        config, params = language_model(cfg, mesh, fmt, "jaxcai-eval", "score text")
        common = dict(batch_size=cfg.batch_size, mesh=mesh, progress=cfg.progress)
        if cfg.task == "choice":
            report = choice.evaluate_choices(
                config, params, fmt, data, normalize=cfg.normalize, **common
            )
            result, table, headline = report.to_dict(), report.markdown(), report.accuracy
        else:
            result = generation.evaluate_generation(
                config,
                params,
                fmt,
                data,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                seed=cfg.seed,
                **common,
            )
            table = generation.metrics_markdown(result["metrics"], result["n"])
            headline = result["metrics"]["rougeL"]
    print(table)
    if cfg.output:
        path = Path(cfg.output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "task": cfg.task,
            "checkpoint": cfg.checkpoint,
            "dataset": _dataset_spec(cfg),
            "tokenizer": fmt.tokenizer.source,
            "chat": fmt.describe(),
        } | result
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    return float(headline)


if __name__ == "__main__":
    main()
