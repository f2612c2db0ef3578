"""The training loop: set up a run, then `for step: batch -> step -> hooks`.

`run(cfg, run_dir)` is everything `jaxcai-train` does after Hydra composed the config.
The state and compiled steps come from `jaxcai.trainer.build`; evaluation, metrics,
checkpoints, preemption, generation eval and export are hooks (`jaxcai.hooks`). Side
effects live here and in the hooks; the step itself (`jaxcai.train`) is pure.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from jaxcai import objectives, sharding
from jaxcai.chat import ChatError, ChatFormat
from jaxcai.checkpoint import Checkpointer, NoCheckpointError
from jaxcai.config import ConfigError, validate
from jaxcai.data.batches import Feed, data_shard, local_row_slices
from jaxcai.data.training import training_data
from jaxcai.hooks import RunContext, TrainingError, default_hooks
from jaxcai.load import chat_format
from jaxcai.metrics import MetricsWriter
from jaxcai.reference import precompute_reference
from jaxcai.trainer import adopt_init_model, build

log = logging.getLogger(__name__)

__all__ = ["TrainingError", "adopt_init_model", "initialize_distributed", "run", "run_chat_format"]


def initialize_distributed(cfg: DictConfig) -> None:
    """`jax.distributed.initialize` for multi-process runs (config values or environment)."""
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    kwargs = {
        k: cfg[k]
        for k in ("coordinator_address", "num_processes", "process_id", "local_device_ids")
        if cfg[k] is not None
    }
    if "local_device_ids" in kwargs:
        kwargs["local_device_ids"] = list(kwargs["local_device_ids"])
    jax.distributed.initialize(**kwargs)


def run_chat_format(cfg: DictConfig) -> ChatFormat:
    """The run's tokenizer and chat format: `data.tokenizer`, else `trainer.init_from`'s
    own, else the bundled one; `data.chat` picks the format. The chosen kind is written
    into `cfg.data.chat`, so the run's `config.yaml` records it."""
    try:
        fmt = chat_format(
            cfg.trainer.init_from,
            tokenizer=cfg.data.tokenizer,
            kind=cfg.data.chat,
            template_kwargs=OmegaConf.to_container(cfg.data.chat_kwargs) or None,
        )
    except (ChatError, OSError, ValueError) as e:
        raise ConfigError(f"config data.tokenizer / data.chat: {e}") from e
    cfg.data.chat = fmt.kind
    return fmt


def _prepare(cfg: DictConfig, run_dir: Path) -> ChatFormat:
    """Checks and the run directory's own files, before any model is built."""
    initialize_distributed(cfg.distributed)
    try:
        objectives.import_plugins(cfg.get("plugins") or ())
    except objectives.ObjectiveError as e:
        raise ConfigError(str(e)) from e
    adopt_init_model(cfg)
    validate(cfg, jax.device_count())
    fmt = run_chat_format(cfg)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        fmt.tokenizer.save(run_dir / "tokenizer")  # the run is a complete model
    return fmt


def _context(cfg: DictConfig, run_dir: Path, trainer, fmt: ChatFormat) -> RunContext:
    """Data, reference log-probs, the feed, checkpoints and metrics of a built trainer."""
    t, tok = cfg.trainer, fmt.tokenizer
    if tok.vocab_size > trainer.model.vocab_size:
        raise ConfigError(
            f"config data.tokenizer: {tok.source} has {tok.vocab_size} tokens, more "
            f"than the model's {trainer.model.vocab_size} embeddings"
        )
    if trainer.objective.feed is not None:  # the objective makes its own batches
        return _sampling_context(cfg, run_dir, trainer, fmt)
    data = training_data(cfg.data, cfg.objective.name, fmt, t.seed)
    ref = {"train": None, "eval": None}
    if trainer.objective.reference_mode(cfg.objective) == "precompute":
        batch_size = t.batch_size // t.grad_accum
        ref = precompute_reference(trainer, data, run_dir, batch_size, t.progress)
    shard_index, shard_count = data_shard(t.batch_size, t.grad_accum, trainer.mesh, trainer.rules)
    iterator = data.iterator(
        rows_per_batch=t.batch_size // shard_count, seed=t.seed, shard_index=shard_index,
        shard_count=shard_count, shuffle=cfg.data.shuffle, workers=cfg.data.workers,
        read_threads=cfg.data.read_threads, ref=ref["train"], groups=t.grad_accum,
        row_multiple=local_row_slices(t.batch_size, t.grad_accum, trainer.mesh, trainer.rules),
    )  # fmt: skip
    feed = Feed(
        iterator, batch_size=t.batch_size, grad_accum=t.grad_accum, mesh=trainer.mesh,
        rules=trainer.rules, shard_count=shard_count, pad_id=tok.pad_id,
        fixed_width=data.layout.fixed_width,
        check=lambda rows: _check_rows(trainer, cfg, rows),
    )  # fmt: skip
    ckpt, writer, state = _outputs(cfg, run_dir, trainer)
    return RunContext(cfg, run_dir, trainer, data, data.eval_rows(ref["eval"]), feed, ckpt,
                      writer, state, tokenizer=tok)  # fmt: skip


def _outputs(cfg: DictConfig, run_dir: Path, trainer) -> tuple:
    """The run's checkpointer, metrics writer, and the initial state (taken from the
    trainer: it is donated to the first step, and the context holds the live state)."""
    t = cfg.trainer
    ckpt = Checkpointer(
        run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoints
    )
    writer = MetricsWriter(run_dir, tensorboard=t.tensorboard)
    state, trainer.state = trainer.state, None
    return ckpt, writer, state


def _sampling_context(cfg: DictConfig, run_dir: Path, trainer, fmt: ChatFormat) -> RunContext:
    """The context of an objective with its own feed (online RL): no data pipeline and
    no eval split; the feed sees the context (the live params) it samples from."""
    ckpt, writer, state = _outputs(cfg, run_dir, trainer)
    ctx = RunContext(cfg, run_dir, trainer, None, None, None, ckpt, writer, state,
                     tokenizer=fmt.tokenizer)  # fmt: skip
    try:
        ctx.feed = trainer.objective.feed(ctx, fmt)
    except Exception:
        ckpt.close()
        writer.close()
        raise
    return ctx


def _check_rows(trainer, cfg: DictConfig, rows: dict[str, Any]) -> None:
    """The data pipeline's rows must be the objective's batch layout."""
    try:
        objectives.check_batch(
            trainer.objective, cfg.objective, rows, f"data.train={cfg.data.train}"
        )
    except objectives.ObjectiveError as e:
        raise TrainingError(str(e)) from e


def _resume(ctx: RunContext) -> None:
    """Continue from the run directory's latest checkpoint (state and data position)."""
    if not (ctx.cfg.trainer.resume and ctx.checkpointer.steps()):
        return
    ctx.step, ctx.state, meta = ctx.checkpointer.restore(ctx.state)
    log.info("resumed from checkpoint %d (%s)", ctx.step, json.dumps(meta))
    ctx.writer.truncate_after(ctx.step)
    try:
        ctx.checkpointer.restore_data(ctx.step, ctx.feed.iterator)
        if hasattr(ctx.feed, "restore"):
            ctx.feed.restore(ctx.checkpointer, ctx.step)
    except NoCheckpointError as e:
        raise TrainingError(
            f"{e}; the data position cannot be recovered exactly (resume with the "
            "same number of processes, or start a new run directory)"
        ) from e


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train as `cfg` says, writing metrics and checkpoints under `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = _prepare(cfg, run_dir)
    t = cfg.trainer
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rules = tuple(tuple(r) for r in cfg.rules) if cfg.rules else sharding.DEFAULT_RULES
    with sharding.use_mesh(mesh, rules), contextlib.ExitStack() as stack:
        trainer = build(cfg, mesh, rules)
        ctx = _context(cfg, run_dir, trainer, fmt)
        for closing in (ctx.writer, ctx.checkpointer, ctx.feed):
            stack.callback(closing.close)
        _resume(ctx)
        bar = tqdm(total=t.steps, initial=ctx.step, desc=cfg.objective.name, unit="step",
                   disable=not t.progress or jax.process_index() != 0)  # fmt: skip
        stack.callback(bar.close)
        ctx.hooks = default_hooks(ctx, bar)
        for hook in ctx.hooks:
            stack.callback(hook.close)
        for step in range(ctx.step, t.steps):
            batch, ctx.step_tokens = ctx.feed.next()
            ctx.state, ctx.step_metrics = trainer.step(ctx.state, batch, trainer.ref_params)
            ctx.step = step + 1
            bar.update()
            for hook in ctx.hooks:
                if hook.due(ctx):
                    hook.run(ctx)
        for hook in ctx.hooks:
            hook.end(ctx)
        ctx.writer.write(t.steps, ctx.final)
    return {"step": t.steps, **{f"train/{k}": v for k, v in ctx.last.items()}, **ctx.final}
