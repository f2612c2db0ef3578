"""The training loop: data, sharded state, steps, evaluation, metrics and checkpoints.

`run(cfg, run_dir)` is everything `jaxcai-train` does after Hydra composed the config.
Side effects live here; the step itself (`jaxcai.train`) is pure.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from jaxcai import hf, lora, model, sharding
from jaxcai.chat import ChatError, ChatFormat
from jaxcai.checkpoint import Checkpointer, NoCheckpointError
from jaxcai.config import ConfigError, model_config, validate
from jaxcai.data.batches import data_shard, eval_index_batches, from_local_rows, global_batch
from jaxcai.data.builders import decode_record
from jaxcai.data.pipeline import ArrayRows, repad
from jaxcai.data.training import TrainData, training_data
from jaxcai.load import chat_format, load_model, model_config_of
from jaxcai.metrics import MetricsWriter, peak_flops_per_device
from jaxcai.model_config import ModelConfig, flops_per_token
from jaxcai.train import (
    COUNT_METRICS,
    init_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    reference_logps,
    state_shardings,
)

log = logging.getLogger(__name__)

__all__ = ["TrainingError", "adopt_init_model", "run"]

NUMERIC_FIELDS = (
    "param_dtype",
    "dtype",
    "scan_layers",
    "remat_policy",
    "logits_chunk",
    "attention_impl",
)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")  # adapters on loaded weights


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss with `trainer.nonfinite=stop`, ...)."""


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


def _model_and_params(cfg: DictConfig, mesh, rules) -> tuple[ModelConfig, Any]:
    """Random init from `cfg.model`, or the weights of `trainer.init_from` (a Hugging Face
    directory, a jaxcai run or one of its `checkpoints/N`)."""
    head = "reward" if cfg.objective.name == "rm" else "lm"
    seed = jax.random.key(cfg.trainer.seed)
    if cfg.trainer.init_from:
        numerics = {k: cfg.model[k] for k in NUMERIC_FIELDS}
        mc, params = load_model(
            cfg.trainer.init_from,
            mesh=mesh,
            rules=rules,
            progress=cfg.trainer.progress,
            **numerics,
        )
        if head == "reward" and "reward_kernel" not in params:
            shardings = model.param_shardings(mc, mesh, rules, head="reward")
            params = jax.jit(
                lambda p, r: model.to_reward_params(mc, p, r), out_shardings=shardings
            )(params, seed)
        elif head == "lm" and "reward_kernel" in params:
            raise ConfigError(
                f"config trainer.init_from={cfg.trainer.init_from!r} is a reward model; "
                f"objective {cfg.objective.name} needs a language model"
            )
        mc = mc.replace(**_lora_fields(cfg))
        shardings = model.param_shardings(mc, mesh, rules, head=head)
        return mc, lora.add_adapters(mc, params, jax.random.fold_in(seed, 1), shardings)
    mc = model_config(cfg.model)
    return mc, model.init_sharded(mc, seed, mesh, rules, head=head)


def _lora_fields(cfg: DictConfig) -> dict[str, Any]:
    return {k: cfg.model[k] for k in LORA_FIELDS}


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


def adopt_init_model(cfg: DictConfig) -> None:
    """With `trainer.init_from`, make `cfg.model` the checkpoint's architecture (keeping
    the numerics chosen in `cfg.model`), so validation and the run's `config.yaml` describe
    the model actually trained."""
    if not cfg.trainer.init_from:
        return
    numerics = {k: cfg.model[k] for k in NUMERIC_FIELDS}
    try:
        mc = model_config_of(cfg.trainer.init_from, **numerics)
    except FileNotFoundError as e:
        raise ConfigError(f"config trainer.init_from={cfg.trainer.init_from!r}: {e}") from e
    name = cfg.model.get("name", "custom")
    cfg.model = {**mc.replace(**_lora_fields(cfg)).to_dict(), "name": name}


def _reference(
    cfg: DictConfig, run_dir: Path, data: TrainData, mc, params, mesh, rules
) -> dict[str, dict[str, np.ndarray]]:
    """DPO's precomputed reference log-probs of every train and eval pair, from the
    initial params, by position in the split; cached in the run dir (so a resumed run
    uses exactly the same reference)."""
    cache = run_dir / "reference_logps.npz"
    stored = dict(np.load(cache)) if cache.exists() else {}
    fn = jax.jit(
        lambda p, b: reference_logps(mc, p, b), out_shardings=NamedSharding(mesh, PartitionSpec())
    )
    batch_size = cfg.trainer.batch_size // cfg.trainer.grad_accum
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "eval"):
        rows = data.rows(split)
        keys = [f"{split}/ref_chosen_logps", f"{split}/ref_rejected_logps"]
        fingerprint = getattr(data, split).fingerprint  # the same records, in the same order
        if str(stored.get(f"{split}/fingerprint", "")) != fingerprint or not all(
            k in stored and len(stored[k]) == len(rows) for k in keys
        ):
            parts = []
            for idx in tqdm(
                list(eval_index_batches(len(rows), batch_size)),
                desc=f"reference log-probs ({split})",
                disable=not cfg.trainer.progress or jax.process_index() != 0,
            ):
                b = global_batch(rows, idx, 1, mesh, rules)
                logps = fn(params, jax.tree_util.tree_map(lambda x: x[0], b))
                parts.append({k: np.asarray(v)[idx >= 0] for k, v in logps.items()})
            for k in ("ref_chosen_logps", "ref_rejected_logps"):
                stored[f"{split}/{k}"] = np.concatenate([p[k] for p in parts])
            stored[f"{split}/fingerprint"] = np.asarray(fingerprint)
        out[split] = {
            k: stored[f"{split}/{k}"].astype(np.float32)
            for k in ("ref_chosen_logps", "ref_rejected_logps")
        }
    if jax.process_index() == 0:
        np.savez(cache, **stored)
    return out


def _local_tokens(local: dict[str, Any]) -> int:
    """Non-padding tokens in this process's rows."""
    if "segment_ids" in local:
        return int((local["segment_ids"] > 0).sum())
    return int(sum((local[s]["segment_ids"] > 0).sum() for s in ("chosen", "rejected")))


def _agree_length(local: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Pad every host's rows to the longest host's (rows of varying, bucketed length)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    rows = local if "tokens" in local else local["chosen"]
    length = int(np.max(multihost_utils.process_allgather(np.int32(rows["tokens"].shape[1]))))
    return repad(local, length, pad_id)


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint and exit between steps."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint, then exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def _evaluate(
    eval_fn, params, ref_params, ds: ArrayRows, cfg: DictConfig, mesh, rules
) -> dict[str, float]:
    t = cfg.trainer
    sums: dict[str, float] = {}
    total = 0.0
    for idx in eval_index_batches(len(ds), t.batch_size, t.eval_batches):
        m = jax.device_get(
            eval_fn(params, global_batch(ds, idx, t.grad_accum, mesh, rules), ref_params)
        )
        weight = float(sum(m.get(k, 0.0) for k in COUNT_METRICS))
        total += weight
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + (float(v) if k in COUNT_METRICS else float(v) * weight)
    return {
        f"eval/{k}": v if k in COUNT_METRICS else v / max(total, 1e-12) for k, v in sums.items()
    }


def _generation_eval(
    mc: ModelConfig, params: Any, data: TrainData, t: DictConfig, mesh, run_dir: Path
) -> dict[str, float]:
    """Answer the first `trainer.generate_eval` eval prompts greedily and score them against
    the references (`eval/gen_*`); the answers go to `generation_eval.jsonl`."""
    from jaxcai.evals.generation import evaluate_generation

    if jax.process_count() > 1:
        log.warning("trainer.generate_eval: sampling runs in one process; skipped")
        return {}
    records = [decode_record(data.eval[i]) for i in range(min(t.generate_eval, len(data.eval)))]
    out = evaluate_generation(
        mc,
        params,
        data.tok,
        records,
        max_new_tokens=t.generate_max_new_tokens,
        mesh=mesh,
        progress=t.progress,
    )
    with (run_dir / "generation_eval.jsonl").open("w", encoding="utf-8") as f:
        for example in out["examples"]:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return {f"eval/gen_{k}": v for k, v in out["metrics"].items()}


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train as `cfg` says, writing metrics and checkpoints under `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    initialize_distributed(cfg.distributed)
    adopt_init_model(cfg)
    validate(cfg, jax.device_count())
    t = cfg.trainer
    fmt = run_chat_format(cfg)
    tok = fmt.tokenizer
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rules = tuple(tuple(r) for r in cfg.rules) if cfg.rules else sharding.DEFAULT_RULES
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tok.save(run_dir / "tokenizer")  # the run is a complete model with its tokenizer

    with sharding.use_mesh(mesh, rules):
        mc, params = _model_and_params(cfg, mesh, rules)
        if tok.vocab_size > mc.vocab_size:
            raise ConfigError(
                f"config data.tokenizer: {tok.source} has {tok.vocab_size} tokens, more "
                f"than the model's {mc.vocab_size} embeddings"
            )
        data = training_data(cfg.data, cfg.objective.name, fmt, t.seed)
        ref_params, ref = None, {"train": None, "eval": None}
        if cfg.objective.name == "dpo":
            if cfg.objective.reference == "model":
                ref_params = jax.tree_util.tree_map(jnp.copy, params)
            else:
                ref = _reference(cfg, run_dir, data, mc, params, mesh, rules)
        eval_rows = data.eval_rows(ref["eval"])

        optimizer = make_optimizer(cfg.optimizer, t.steps)
        schedule = make_schedule(cfg.optimizer, t.steps)
        head = "reward" if cfg.objective.name == "rm" else "lm"
        abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, t.seed), params)
        state_sh = state_shardings(
            abstract, model.param_shardings(mc, mesh, rules, head=head), mesh
        )
        state = jax.jit(
            lambda p: init_train_state(p, optimizer, t.seed),
            out_shardings=state_sh,
            donate_argnums=0,
        )(params)
        del params

        ckpt = Checkpointer(
            run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoints
        )
        metrics_out = MetricsWriter(run_dir, tensorboard=t.tensorboard)
        shard_index, shard_count = data_shard(t.batch_size, t.grad_accum, mesh, rules)
        batches = data.iterator(
            rows_per_batch=t.batch_size // shard_count,
            seed=t.seed,
            shard_index=shard_index,
            shard_count=shard_count,
            shuffle=cfg.data.shuffle,
            workers=cfg.data.workers,
            read_threads=cfg.data.read_threads,
            ref=ref["train"],
        )
        start = 0
        if t.resume and ckpt.steps():
            start, state, meta = ckpt.restore(state)
            log.info("resumed from checkpoint %d (%s)", start, json.dumps(meta))
            metrics_out.truncate_after(start)
            try:
                ckpt.restore_data(start, batches)
            except NoCheckpointError as e:
                raise TrainingError(
                    f"{e}; the data position cannot be recovered exactly (resume with the "
                    "same number of processes, or start a new run directory)"
                ) from e

        replicated = NamedSharding(mesh, PartitionSpec())
        train_step = make_train_step(mc, cfg.objective, optimizer, schedule)
        ref_sh = (
            None if ref_params is None else jax.tree_util.tree_map(lambda x: x.sharding, ref_params)
        )
        jstep = jax.jit(
            train_step,
            in_shardings=(state_sh, None, ref_sh),  # batches arrive already sharded
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        )
        jeval = jax.jit(make_eval_step(mc, cfg.objective), out_shardings=replicated)

        def next_batch() -> tuple[dict[str, Any], int]:
            local = next(batches)
            if not data.layout.fixed_width:  # bucketed rows: hosts agree on one length
                local = _agree_length(local, tok.pad_id)
            tokens = _local_tokens(local) * shard_count
            return from_local_rows(local, t.batch_size, t.grad_accum, mesh, rules), tokens

        peak = peak_flops_per_device(t.peak_tflops)
        flops_token = flops_per_token(mc, cfg.data.max_len)
        preempt = _Preemption()
        bar = tqdm(
            total=t.steps,
            initial=start,
            desc=f"{cfg.objective.name}",
            disable=not t.progress or jax.process_index() != 0,
            unit="step",
        )
        last: dict[str, Any] = {}
        skipped_steps = 0
        pending = None
        window = {"tokens": 0, "time": time.perf_counter()}

        def save(step: int, force: bool = False) -> None:
            meta = {"step": step, "data_seed": t.seed, "objective": cfg.objective.name}
            ckpt.save(step, state, meta, data=batches, force=force)

        def finish(record) -> None:
            nonlocal skipped_steps, last
            step, device_metrics, n_tokens = record
            m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            window["tokens"] += n_tokens
            if m.pop("nonfinite"):
                if t.nonfinite == "stop":
                    raise TrainingError(
                        f"step {step}: loss {m['loss']} / grad norm {m['grad_norm']} is not "
                        f"finite; the update was not applied and no checkpoint holds it "
                        f"(set trainer.nonfinite=skip to skip such steps)"
                    )
                skipped_steps += 1
                log.warning("step %d: non-finite loss, update skipped", step)
            if step % t.log_every == 0 or step == t.steps:
                now = time.perf_counter()
                m["tokens_per_s"] = window["tokens"] / max(now - window["time"], 1e-9)
                m["mfu"] = (
                    m["tokens_per_s"] * flops_token / (peak * jax.device_count()) if peak else None
                )
                m["skipped_steps"] = skipped_steps
                window.update(tokens=0, time=now)
                metrics_out.write(step, m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            last = m

        try:
            for step in range(start, t.steps):
                batch, n_tokens = next_batch()
                state, device_metrics = jstep(state, batch, ref_params)
                if pending is not None:
                    finish(pending)  # the previous step's metrics, read while this one runs
                pending = (step + 1, device_metrics, n_tokens)
                bar.update()
                done = step + 1
                if t.eval_every and done % t.eval_every == 0 and done < t.steps:
                    finish(pending)
                    pending = None
                    metrics_out.write(
                        done,
                        _evaluate(jeval, state.params, ref_params, eval_rows, cfg, mesh, rules),
                    )
                if (t.checkpoint_every and done % t.checkpoint_every == 0) or preempt.requested:
                    if pending is not None:
                        finish(pending)  # a non-finite step stops before it is saved
                        pending = None
                    save(done)
                if preempt.requested:
                    ckpt.wait()
                    raise SystemExit(f"preempted at step {done}; checkpoint saved")
            if pending is not None:
                finish(pending)
            final_eval = _evaluate(jeval, state.params, ref_params, eval_rows, cfg, mesh, rules)
            if t.generate_eval:
                final_eval.update(_generation_eval(mc, state.params, data, t, mesh, run_dir))
            metrics_out.write(t.steps, final_eval)
            if t.steps not in ckpt.steps():
                save(t.steps, force=True)
            ckpt.wait()
        finally:
            bar.close()
            batches.close()
            preempt.restore()
            ckpt.close()
            metrics_out.close()

        if t.export_hf:
            if head == "reward":
                log.warning(
                    "trainer.export_hf: a reward model has no Hugging Face causal-LM "
                    "layout; skipped"
                )
            else:
                hf.save_pretrained(
                    run_dir / "hf", mc, state.params, progress=t.progress, tokenizer=tok
                )
    return {"step": t.steps, **{f"train/{k}": v for k, v in last.items()}, **final_eval}
