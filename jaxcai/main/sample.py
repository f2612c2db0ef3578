"""Sampling entry point: `jaxcai-sample [overrides]` (see `configs/sample.yaml`).

Loads a model (Hugging Face directory, jaxcai run, or a random `model` for smoke tests),
formats each prompt as a Human turn with an open Assistant turn, samples with
`jaxcai.sample.generate` and writes one JSON line per sample.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jaxcai import sharding
from jaxcai.config import CONFIG_PATH
from jaxcai.data.builders import load as load_dataset
from jaxcai.data.records import DataError
from jaxcai.data.training import open_dataset
from jaxcai.main import language_model
from jaxcai.model_config import param_count
from jaxcai.sample import SAMPLING_RULES, generate
from jaxcai.tokenizer import Tokenizer


def _prompts(cfg: DictConfig) -> list[str]:
    """Prompt transcripts (ending on a Human turn) from the config."""
    if cfg.prompts is None:
        return [f"\n\nHuman: {cfg.prompt.strip()}"]
    spec = str(cfg.prompts)
    path = Path(spec).expanduser()
    ds = open_dataset(spec, "prompts") if path.is_file() else load_dataset(spec)
    if ds.kind not in ("prompts", "sft", "preference"):
        raise DataError(f"prompts={spec!r}: a {ds.kind!r} dataset has no prompts")
    prompts = [r["prompt"] for r in ds.records("train")]
    return prompts[: cfg.limit] if cfg.limit else prompts


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU probe noise
    logging.getLogger("absl").setLevel(logging.WARNING)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    try:
        texts = _prompts(cfg)
    except DataError as e:
        sys.exit(f"jaxcai-sample: {e}")
    with sharding.use_mesh(mesh, SAMPLING_RULES):
        config, params = language_model(cfg, mesh, tokenizer, "jaxcai-sample", "generate")
        ids = [tokenizer.encode(t + "\n\nAssistant:", add_bos=True) for t in texts]
        out = generate(
            config,
            params,
            ids,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed,
            num_samples=cfg.num_samples,
            stop_ids=(tokenizer.eos_id,),
            stop_strings=tuple(OmegaConf.to_container(cfg.stop_strings) or ()),
            tokenizer=tokenizer,
            pad_id=tokenizer.pad_id,
            batch_size=cfg.batch_size,
            mesh=mesh,
            rules=SAMPLING_RULES,
            progress=cfg.progress,
        )
    print(
        f"model: {param_count(config) / 1e6:.1f}M params, {len(out.tokens)} samples",
        file=sys.stderr,
    )
    lines = []
    for i, prompt in enumerate(texts):
        for j, n in enumerate(out.samples(i)):
            lines.append(
                {
                    "index": i,
                    "sample": j,
                    "prompt": prompt,
                    "response": out.texts[n].strip(),
                    "stop_reason": out.stop_reasons[n],
                    "logprob": float(sum(out.logprobs[n])),
                    "tokens": out.tokens[n],
                }
            )
    if cfg.output:
        path = Path(cfg.output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        print(f"wrote {len(lines)} samples to {path}", file=sys.stderr)
    else:
        for line in lines:
            print(f"{line['prompt']}\n\nAssistant: {line['response']}\n")


if __name__ == "__main__":
    main()
