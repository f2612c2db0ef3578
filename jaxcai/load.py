"""Load a model from wherever it lives: a Hugging Face directory or a jaxcai run.

    config, params = load_model("runs/sft")             # newest orbax checkpoint of a run
    config, params = load_model("runs/sft/checkpoints/40")
    config, params = load_model("hf/llama-3.2-1b", mesh=mesh)   # safetensors

A run directory holds the `config.yaml` the trainer wrote, `checkpoints/` and the
tokenizer it trained with (`tokenizer/`); only the params are read (not the optimizer
state), straight into their shards on `mesh`.

    fmt = chat_format("runs/sft")   # the tokenizer and chat format a model was made with
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import chat, hf, lora, model
from jaxcai import tokenizer as tokenizers
from jaxcai.checkpoint import Checkpointer
from jaxcai.config import model_config
from jaxcai.model_config import ModelConfig
from jaxcai.sharding import DEFAULT_RULES, Rules

__all__ = ["chat_format", "load_model", "model_config_of", "model_home"]


def _run_dir(path: Path) -> tuple[Path, int | None]:
    """(run directory, checkpoint step or None) of a run, `checkpoints/` or step path."""
    if (path / "config.yaml").is_file():
        return path, None
    if path.name == "checkpoints" and (path.parent / "config.yaml").is_file():
        return path.parent, None
    if path.name.isdigit() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face directory (config.json) nor a jaxcai run "
        "(config.yaml and checkpoints/)"
    )


def model_home(path: str | os.PathLike) -> Path:
    """The directory that holds a model's files: a Hugging Face directory itself, or a
    jaxcai run's directory for the run, its `checkpoints/` or `checkpoints/N`."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    return _run_dir(path)[0]


def chat_format(
    model_path: str | os.PathLike | None,
    *,
    tokenizer: str | os.PathLike | None = None,
    kind: str = "auto",
    template_kwargs: dict[str, Any] | None = None,
) -> chat.ChatFormat:
    """The tokenizer and chat format to use with a model.

    `tokenizer` (a directory, `tokenizer.json` or `.model`) wins; else the model's own
    (a Hugging Face directory's files, which must be there, or a run's `tokenizer/`);
    with no model, the bundled tokenizer. `kind="auto"` takes the chat template beside
    the tokenizer when there is one; for a jaxcai run it is the format the run trained
    with (`data.chat` in its `config.yaml`, and so are its template keywords unless
    given)."""
    home = model_home(model_path) if model_path is not None else None
    run_data = {}
    if home is not None and (home / "config.yaml").is_file():
        run_data = OmegaConf.load(home / "config.yaml").get("data", {}) or {}
    if tokenizer is None and home is not None:
        if tokenizers.find_tokenizer(home) is not None:
            tokenizer = home
        elif run_data:  # a run from before runs kept their tokenizer: its data.tokenizer
            tokenizer = run_data.get("tokenizer")
        else:
            raise tokenizers.TokenizerError(
                f"{home}: the model directory has no tokenizer (looked for "
                f"{', '.join(tokenizers.LOOKED_FOR)}); name one with tokenizer=PATH"
            )
    tok = tokenizers.load(tokenizer)
    if kind == "auto":
        kind = str(run_data.get("chat") or "auto")
    if template_kwargs is None and run_data.get("chat_kwargs"):
        template_kwargs = OmegaConf.to_container(run_data.chat_kwargs)
    source = None if tokenizer is None else Path(tokenizer).expanduser()
    if source is not None and source.is_file():
        source = source.parent
    return chat.load(source, kind, tokenizer=tok, template_kwargs=template_kwargs)


def model_config_of(path: str | os.PathLike, **numerics: Any) -> ModelConfig:
    """The `ModelConfig` of a loadable model (HF directory or jaxcai run), without weights."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        try:
            values = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise hf.CheckpointError(f"{path / 'config.json'}: invalid JSON ({e})") from e
        return hf.config_from_hf(values, source=str(path / "config.json"), **numerics)
    run_dir, _ = _run_dir(path)
    config = model_config(OmegaConf.load(run_dir / "config.yaml").model)
    return lora.merge(config.replace(**numerics), {})[0]  # load_model merges adapters


def _run_head(cfg: DictConfig, run_dir: Path) -> str:
    """The head a run trained: its objective's (importing the run's `plugins` for an
    objective registered by one)."""
    from jaxcai import objectives

    name = cfg.objective.name
    if name not in objectives.names():
        try:
            objectives.import_plugins(cfg.get("plugins") or ())
        except objectives.ObjectiveError as e:
            raise hf.CheckpointError(f"{run_dir / 'config.yaml'}: {e}") from e
    try:
        return objectives.get(name).head
    except objectives.ObjectiveError as e:
        raise hf.CheckpointError(f"{run_dir / 'config.yaml'}: {e}") from e


def load_model(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    step: int | None = None,
    progress: bool = False,
    **numerics: Any,
) -> tuple[ModelConfig, Any]:
    """`(ModelConfig, params)` from a Hugging Face directory or a jaxcai run.

    `numerics` override config fields that do not change the weights (`dtype`,
    `param_dtype`, `attention_impl`, ...). A reward model's run gives reward params; a
    LoRA run's adapters come merged into the base weights (`lora.merge`)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return hf.load_pretrained(path, mesh=mesh, rules=rules, progress=progress, **numerics)
    run_dir, path_step = _run_dir(path)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    config = model_config(cfg.model)
    if numerics:
        config = config.replace(**numerics)
    head = _run_head(cfg, run_dir)
    shapes = model.param_shapes(config, head=head)
    if mesh is not None:
        shardings = model.param_shardings(config, mesh, rules, head=head)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        _, params = ckpt.restore_params(abstract, step if step is not None else path_step)
    finally:
        ckpt.close()
    return lora.merge(config, params)
