"""Sampling entry point: `jaxcai-sample [overrides]` (see `configs/sample.yaml`).

Loads a model (Hugging Face directory, jaxcai run, or a random `model` for smoke tests)
and its tokenizer and chat format (`jaxcai.main.chat_for`: the checkpoint's own unless
`tokenizer=` / `chat=` say otherwise), opens each prompt's conversation for the
assistant's answer in that format, samples with `jaxcai.sample.generate` until the
format's stop ids or stop strings, and writes one JSON line per sample.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jaxcai import sharding
from jaxcai.chat import ChatError, ChatFormat, HumanAssistantFormat, messages_from_transcript
from jaxcai.config import CONFIG_PATH
from jaxcai.data.builders import load as load_dataset
from jaxcai.data.records import DataError
from jaxcai.data.training import open_dataset
from jaxcai.main import chat_for, language_model
from jaxcai.model_config import param_count
from jaxcai.sample import HUMAN_TURN, SAMPLING_RULES, generate


def _prompts(cfg: DictConfig) -> list[str]:
    """Prompt transcripts (ending on a Human turn) from the config."""
    if cfg.prompts is None:
        return [f"{HUMAN_TURN} {cfg.prompt.strip()}"]
    spec = str(cfg.prompts)
    path = Path(spec).expanduser()
    ds = open_dataset(spec, "prompts") if path.is_file() else load_dataset(spec)
    if ds.kind not in ("prompts", "sft", "preference"):
        raise DataError(f"prompts={spec!r}: a {ds.kind!r} dataset has no prompts")
    prompts = [r["prompt"] for r in ds.records("train")]
    return prompts[: cfg.limit] if cfg.limit else prompts


def _shown(fmt: ChatFormat, messages: list[dict], prompt: str, response: str) -> str:
    """One sample as printed: the Human/Assistant transcript answered, or a template's
    rendering of the opened conversation followed by the response."""
    if isinstance(fmt, HumanAssistantFormat):
        return f"{prompt}\n\nAssistant: {response}\n"
    return f"{fmt.render(messages, add_generation_prompt=True)}{response}\n"


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU probe noise
    logging.getLogger("absl").setLevel(logging.WARNING)
    fmt = chat_for(cfg.tokenizer, cfg.chat, cfg.checkpoint, "jaxcai-sample", cfg.chat_kwargs)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    try:
        texts = _prompts(cfg)
        conversations = [messages_from_transcript(t) for t in texts]
        ids = [fmt.prompt_ids(m) for m in conversations]
    except (DataError, ChatError) as e:
        sys.exit(f"jaxcai-sample: {e}")
    if cfg.stop_strings is None:
        stop_strings = fmt.stop_strings  # the format's (HUMAN_TURN for the transcript)
    elif isinstance(cfg.stop_strings, str):
        stop_strings = (cfg.stop_strings,)
    else:
        stop_strings = tuple(OmegaConf.to_container(cfg.stop_strings))
    with sharding.use_mesh(mesh, SAMPLING_RULES):
        config, params = language_model(cfg, mesh, fmt, "jaxcai-sample", "generate")
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
            stop_ids=fmt.stop_ids,
            stop_strings=stop_strings,
            tokenizer=fmt.tokenizer,
            pad_id=fmt.tokenizer.pad_id,
            batch_size=cfg.batch_size,
            mesh=mesh,
            rules=SAMPLING_RULES,
            progress=cfg.progress,
        )
    print(
        f"model: {param_count(config) / 1e6:.1f}M params, {len(out.tokens)} samples; "
        f"tokenizer {fmt.tokenizer.source}, chat format {fmt.describe()}",
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
            messages = conversations[line["index"]]
            print(_shown(fmt, messages, line["prompt"], line["response"]))


if __name__ == "__main__":
    main()
