"""Ahead-of-time memory report: `jaxcai-aot [jaxcai-train overrides] aot.devices=N`
(see `configs/aot.yaml` and `jaxcai.aot`)."""

from __future__ import annotations

import json
import logging
import time

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jaxcai import sharding
from jaxcai.config import CONFIG_PATH, ConfigError, register

register()
log = logging.getLogger(__name__)


def report(cfg: DictConfig) -> dict:
    """Compile `cfg`'s train step on its mesh and return the per-device memory figures."""
    from jaxcai import objectives
    from jaxcai.aot import compile_train_step, memory_report

    if cfg.aot.devices is not None:
        if cfg.aot.devices < 1:
            raise ConfigError(
                f"config aot.devices={cfg.aot.devices}: must be a positive device count"
            )
        # Before anything asks JAX for devices: N host devices stand in for the target mesh.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cfg.aot.devices))
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rules = tuple(tuple(r) for r in cfg.rules) if cfg.rules else sharding.DEFAULT_RULES
    start = time.perf_counter()
    compiled, state, mc = compile_train_step(cfg, mesh, rules)
    figures = memory_report(compiled, state)
    peak_gb = figures["peak_mb"] / 1024
    reference = objectives.get(cfg.objective.name).reference_mode(cfg.objective)
    if reference == "model" and mc.lora_rank:
        reference = "lora_base"  # the state's own base weights, adapters off: no copy
    return {
        "model": cfg.model.get("name", "custom"),
        "objective": cfg.objective.name,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "batch_size": cfg.trainer.batch_size,
        "grad_accum": cfg.trainer.grad_accum,
        "seq_len": cfg.data.max_len,
        "dtype": mc.dtype,
        "param_dtype": mc.param_dtype,
        "remat_policy": mc.remat_policy,
        "logits_chunk": mc.logits_chunk,
        "lora_rank": mc.lora_rank,
        "reference": reference,
        "compile_s": round(time.perf_counter() - start, 1),
        **{k: round(v, 3) for k, v in figures.items()},
        "peak_gb": round(peak_gb, 2),
        "device_memory_gb": cfg.aot.device_memory_gb,
        "fits": peak_gb <= cfg.aot.device_memory_gb,
    }


def _table(r: dict) -> str:
    keys = ("params_mb", "opt_state_mb", "arguments_mb", "temp_mb", "outputs_mb", "aliased_mb")
    head = "| " + " | ".join(("devices", *keys, "peak GB", "fits")) + " |"
    row = [str(r["devices"]), *(f"{r[k]:,.0f}" for k in keys), f"{r['peak_gb']:.2f}"]
    row.append(f"{r['fits']} (<= {r['device_memory_gb']} GB)")
    return "\n".join([head, "|" + "---|" * (len(keys) + 3), "| " + " | ".join(row) + " |"])


@hydra.main(config_path=CONFIG_PATH, config_name="aot", version_base=None)
def main(cfg: DictConfig) -> dict:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    result = report(cfg)
    log.info(
        "%s %s, mesh %s, batch %d x %d, per device:\n%s",
        result["model"],
        result["objective"],
        result["mesh"],
        result["batch_size"],
        result["seq_len"],
        _table(result),
    )
    out = HydraConfig.get().runtime.output_dir
    with open(f"{out}/aot.json", "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
