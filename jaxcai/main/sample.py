"""Greedy sampling entry point: `python -m jaxcai.main.sample [overrides]`.

With no overrides it runs the CPU smoke defaults of `configs/sample.yaml`: the bundled
tokenizer and a randomly initialised `tiny` model, placed on a mesh of all local devices.
"""

from __future__ import annotations

import logging

import hydra
import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import hf, model, sharding
from jaxcai.config import CONFIG_DIR
from jaxcai.model_config import ModelConfig
from jaxcai.sample import greedy_generate
from jaxcai.tokenizer import Tokenizer, format_conversation


@hydra.main(config_path=CONFIG_DIR, config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU probe noise
    tokenizer = Tokenizer.load(cfg.tokenizer)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    with sharding.use_mesh(mesh):
        if cfg.checkpoint:
            config, params = hf.load_pretrained(cfg.checkpoint, mesh=mesh)
        else:
            config = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
            params = model.init_sharded(config, jax.random.key(cfg.seed), mesh)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but the model "
                f"only {config.vocab_size} embeddings"
            )
        prompt = format_conversation([("Human", cfg.prompt)], open_assistant=True)
        ids = tokenizer.encode(prompt, add_bos=True)
        (out,) = greedy_generate(
            config,
            params,
            [ids],
            max_new_tokens=cfg.max_new_tokens,
            pad_id=tokenizer.pad_id,
            eos_id=tokenizer.eos_id,
        )
    print(f"model: {model.param_count(config) / 1e6:.2f}M params on mesh {dict(mesh.shape)}")
    print(prompt + tokenizer.decode(out))


if __name__ == "__main__":
    main()
