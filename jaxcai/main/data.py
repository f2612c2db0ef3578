"""Dataset preparation entry point: `jaxcai-data kind=... input=... output=...`.

Reads local JSONL or hh-rlhf files and writes a TFDS dataset (array_record) that
`jaxcai-train data.train=<output>` reads; see `configs/prepare_data.yaml`.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from jaxcai.config import CONFIG_PATH
from jaxcai.data import builders
from jaxcai.data.records import DataError


def _inputs(spec):
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [
        str(builders.bundled_path(s.split(":", 1)[1])) if s.startswith("bundled:") else s
        for s in specs
    ]


@hydra.main(config_path=CONFIG_PATH, config_name="prepare_data", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)
    if cfg.input is None or cfg.output is None:
        sys.exit("jaxcai-data: set input=<file or glob> and output=<directory>")
    try:
        ds = builders.prepare(
            cfg.kind,
            _inputs(
                OmegaConf.to_container(cfg.input) if not isinstance(cfg.input, str) else cfg.input
            ),
            cfg.output,
            fmt=cfg.format,
            eval_inputs=_inputs(cfg.eval_input) if cfg.eval_input else None,
            fields=OmegaConf.to_container(cfg.fields),
            skip_invalid=cfg.skip_invalid,
            max_tokens=cfg.max_tokens,
            tokenizer=cfg.tokenizer,
            overwrite=cfg.overwrite,
        )
    except DataError as e:
        sys.exit(f"jaxcai-data: {e}")
    meta = ds.metadata
    summary = {
        "output": str(ds.path),
        "kind": ds.kind,
        "examples": {split: ds.num_examples(split) for split in ds.splits},
        "skipped": meta.get("skipped", {}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
