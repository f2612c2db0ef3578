"""Training entry point: `jaxcai-train [hydra overrides]` (see `configs/train.yaml`)."""

from __future__ import annotations

import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jaxcai.config import CONFIG_PATH, register
from jaxcai.loop import run

register()


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU probe noise
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    summary = run(cfg, HydraConfig.get().runtime.output_dir)
    print(json.dumps(summary))
    return summary.get("eval/loss")  # what a sweeper would optimise


if __name__ == "__main__":
    main()
