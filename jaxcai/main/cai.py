"""Constitutional AI pipeline entry point: `jaxcai-cai [hydra overrides]` (`configs/cai.yaml`)."""

from __future__ import annotations

import json
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jaxcai.cai.constitution import ConstitutionError
from jaxcai.cai.run import run_cai
from jaxcai.cai.stages import PipelineError
from jaxcai.config import CONFIG_PATH, ConfigError, register
from jaxcai.data.records import DataError

register()


@hydra.main(config_path=CONFIG_PATH, config_name="cai", version_base=None)
def main(cfg: DictConfig) -> float | None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU probe noise
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        records = run_cai(cfg, run_dir)
    except (ConfigError, ConstitutionError, DataError, PipelineError) as e:
        sys.exit(f"jaxcai-cai: {e}")
    print(f"jaxcai-cai: report at {run_dir}/report.md")
    harm = (records.get("eval", {}).get("stats") or {}).get("harm") or {}
    final = list(harm)[-1] if harm else None
    summary = {stage: r.get("seconds") for stage, r in records.items()}
    print(json.dumps({"run_dir": run_dir, "seconds": summary}))
    if final:  # what a sweeper would minimise: the final policy's harmful share
        shares = [v["harmful"] for v in harm[final].values()]
        return sum(shares) / len(shares)
    return None


if __name__ == "__main__":
    main()
