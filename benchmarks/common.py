"""What every benchmark's result says about the run: model and device."""

from __future__ import annotations

from typing import Any

import jax
from omegaconf import DictConfig

from jaxcai.model_config import ModelConfig, param_count


def run_fields(cfg: DictConfig, config: ModelConfig) -> dict[str, Any]:
    """The model preset, its size and compute dtype, and the devices it ran on."""
    device = jax.devices()[0]
    return {
        "model": cfg.model.get("name", "custom"),
        "params": param_count(config),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "dtype": config.dtype,
    }
