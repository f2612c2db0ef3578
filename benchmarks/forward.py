"""Forward-pass throughput: `python benchmarks/forward.py [hydra overrides]`.

Times the jitted `jaxcai.model.forward` on random tokens over a mesh of all local devices
and reports tokens/s and model TFLOP/s, counting a forward pass as one third of
`flops_per_token` (which counts forward plus backward).
"""

from __future__ import annotations

import json
import logging
import time

import hydra
import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import model, sharding
from jaxcai.model_config import ModelConfig, flops_per_token, param_count


@hydra.main(config_path="pkg://jaxcai.configs", config_name="bench_forward", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    config = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    with sharding.use_mesh(mesh):
        params = model.init_sharded(config, jax.random.key(cfg.seed), mesh)
        batch = sharding.named_sharding(("batch", "length"), mesh)
        tokens = jax.device_put(
            jax.random.randint(
                jax.random.key(1), (cfg.batch_size, cfg.seq_len), 0, config.vocab_size
            ),
            batch,
        )
        fwd = jax.jit(model.forward, static_argnums=0)
        for _ in range(cfg.warmup):
            fwd(config, params, tokens).block_until_ready()
        start = time.perf_counter()
        for _ in range(cfg.steps):
            out = fwd(config, params, tokens)
        out.block_until_ready()
        seconds = (time.perf_counter() - start) / cfg.steps
    tokens_per_s = cfg.batch_size * cfg.seq_len / seconds
    tflops = tokens_per_s * flops_per_token(config, cfg.seq_len) / 3 / 1e12
    print(
        json.dumps(
            {
                "model": cfg.model.get("name", "custom"),
                "params": param_count(config),
                "devices": jax.device_count(),
                "platform": jax.devices()[0].platform,
                "dtype": config.dtype,
                "batch_size": cfg.batch_size,
                "seq_len": cfg.seq_len,
                "step_ms": round(seconds * 1e3, 3),
                "tokens_per_s": round(tokens_per_s, 1),
                "tflops_per_s": round(tflops, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
