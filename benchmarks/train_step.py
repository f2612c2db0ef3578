"""Train-step throughput: `python -m benchmarks.train_step objective=<sft|rm|dpo>`.

Times the jitted, donated train step (`jaxcai.trainer.build`, the step `jaxcai-train`
runs) on random batches of the reference workload (`bench_ref`:
SFT 8 x 512 with 128-token prompts; DPO/RM 8 pairs x 512) and reports:

- tokens/s (pairs count both sequences: pair-tokens/s) and model FLOP/s, counting
  `flops_per_token` (forward + backward) per trained token, plus one forward per token
  for an in-step DPO reference (`reference=model`);
- MFU against the *measured* peak: the rate of a jitted `matmul_size`^2 matmul in the
  model's compute dtype on the same device, in the same run (and against the published
  peak where the device has one);
- peak host RSS and, where the backend reports it, peak device memory.

With `compare_hf=true` (needs the `bench` or `test` extra: transformers and torch) the
same workload also runs as a torch training step on CPU (`benchmarks.hf_train`): the
initial weights saved with `jaxcai.hf.save_pretrained` and loaded with `transformers`,
the same batch, the same loss in plain torch, backward, AdamW with the same schedule;
timed like the jaxcai step (a first step, `warmup` untimed steps, the mean of `steps`).
It adds `hf_tokens_per_s` and `ratio` = `tokens_per_s / hf_tokens_per_s` (above 1:
jaxcai is faster), and torch's losses beside jaxcai's (`hf_first_loss` before any
update, `hf_loss` after the last step: equal to `first_loss` and `loss` up to float32
rounding).

Prints a markdown table to the log and one JSON line last (also `result.json` in the
Hydra run directory) holding `tokens_per_s`, `mfu` and `peak_rss_mb`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from benchmarks.common import run_fields
from jaxcai import model, objectives, sharding
from jaxcai.config import ConfigError, compose, model_config
from jaxcai.data.batches import from_local_rows
from jaxcai.metrics import peak_flops_per_device, peak_rss_mb
from jaxcai.model_config import flops_per_token
from jaxcai.objectives import ROW_KEYS
from jaxcai.trainer import build, step_config

log = logging.getLogger(__name__)

OBJECTIVES = ("sft", "rm", "dpo")  # the objectives the reference workload has data for


def measured_peak_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """FLOP/s of a jitted `size x size` matmul in `dtype` on the first device (best of
    `repeats`): the attainable peak the MFU is measured against."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sequences(rng: np.random.Generator, n: int, length: int, prompt: int, vocab: int):
    ids = rng.integers(4, vocab, (n, length + 1)).astype(np.int32)
    mask = np.zeros((n, length), np.int32)
    mask[:, max(prompt - 1, 0) :] = 1
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "mask": mask,
        "segment_ids": np.ones((n, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
    }


def random_batch(cfg: DictConfig, objective: str, reference: str | None, vocab: int) -> dict:
    """This process's rows of one synthetic batch, in the objective's batch layout
    (`reference`: the DPO reference mode, `precompute` adding the reference log-probs)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.batch_size

    def fill(layout: dict) -> dict:
        rows = {}
        if set(ROW_KEYS) <= set(layout):  # a sequence's rows (one side of a pair, or all)
            rows.update(_sequences(rng, n, cfg.seq_len, cfg.prompt_len, vocab))
        for key, leaf in layout.items():
            if isinstance(leaf, dict):
                rows[key] = fill(leaf)
            elif key.startswith("ref_"):  # precomputed reference log-probs
                rows[key] = rng.normal(-900, 10, n).astype(np.float32)
            elif key not in ROW_KEYS:  # p_chosen, weight
                rows[key] = np.ones(n, np.float32)
        return rows

    settings = OmegaConf.create({"reference": reference})
    return fill(objectives.batch_layout(objectives.get(objective), settings, n, cfg.seq_len))


def save_for_transformers(cfg: DictConfig, config, params, objective: str) -> Path | None:
    """With `compare_hf`, the initial weights as a Hugging Face checkpoint in a temporary
    directory (saved before the donated jaxcai steps consume them); else None."""
    if not cfg.compare_hf:
        return None
    from benchmarks import hf_train

    path = Path(tempfile.mkdtemp(prefix="jaxcai-bench-train-hf-"))
    hf_train.save_weights(path, config, params, objective)
    return path


def time_transformers(
    cfg: DictConfig, oc: DictConfig, path: Path, rows: dict, tokens: int, tokens_per_s: float
) -> dict:
    """The torch step's figures on the same workload, and `ratio` = jaxcai's tokens/s over
    torch's; `tokens` is the number trained per step. Removes the checkpoint at `path`."""
    from benchmarks import hf_train

    try:
        timing = hf_train.run(path, oc, compose().optimizer, rows, cfg.warmup, cfg.steps)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    hf_tokens_per_s = tokens / timing["step_s"]
    return {
        "hf_device": "cpu",
        "hf_first_step_s": round(timing["first_s"], 4),
        "hf_step_s": round(timing["step_s"], 6),
        "hf_tokens_per_s": round(hf_tokens_per_s, 1),
        "ratio": round(tokens_per_s / hf_tokens_per_s, 4),
        "hf_first_loss": timing["first_loss"],
        "hf_loss": timing["loss"],
    }


@hydra.main(config_path="pkg://jaxcai.configs", config_name="bench_train_step", version_base=None)
def main(cfg: DictConfig) -> dict:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from benchmarks import scaling  # `+devices=N`: rerun as a subprocess on N CPU devices

    if (relaunched := scaling.relaunch_with_devices(cfg)) is not None:
        return relaunched
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise ConfigError(f"config objective={name!r}: choose one of {OBJECTIVES}")
    if cfg.compare_hf:
        from benchmarks import hf_train

        hf_train.require_torch()  # fail before the jaxcai half runs
    config = model_config(cfg.model)
    objective = objectives.get(name)
    run_cfg = step_config(
        cfg.model,
        cfg.objective,
        steps=cfg.warmup + cfg.steps + 1,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        mesh=cfg.mesh,
    )
    oc = run_cfg.objective  # the typed defaults, then ours
    reference = objective.reference_mode(oc)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rules = sharding.DEFAULT_RULES
    with sharding.use_mesh(mesh, rules):
        params = model.init_sharded(
            config, jax.random.key(cfg.seed), mesh, rules, head=objective.head
        )
        hf_dir = save_for_transformers(cfg, config, params, name)
        # The state keeps one layout across steps (as in jaxcai-train), so the step
        # compiles once: moments sharded like their params, the rest replicated.
        trainer = build(run_cfg, mesh, rules, params=(config, params))
        del params
        state, ref, step = trainer.state, trainer.ref_params, trainer.step
        trainer.state = None  # donated to the first step
        rows = random_batch(cfg, name, reference, config.vocab_size)
        batch = from_local_rows(rows, cfg.batch_size, 1, mesh)
        start = time.perf_counter()
        state, metrics = step(state, batch, ref)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        first_loss = float(metrics["loss"])
        for _ in range(cfg.warmup):
            state, metrics = step(state, batch, ref)
        jax.block_until_ready(metrics)
        trace = Path(HydraConfig.get().runtime.output_dir) / "trace" if cfg.profile else None
        with jax.profiler.trace(str(trace)) if trace else contextlib.nullcontext():
            start = time.perf_counter()
            for _ in range(cfg.steps):
                state, metrics = step(state, batch, ref)
            jax.block_until_ready(metrics)
            seconds = (time.perf_counter() - start) / cfg.steps
        if trace:
            log.info("profile of the timed steps: %s (open with TensorBoard or Perfetto)", trace)
    sequences = cfg.batch_size * (1 if name == "sft" else 2)
    tokens_per_s = sequences * cfg.seq_len / seconds
    per_token = flops_per_token(config, cfg.seq_len)
    if ref is not None:
        per_token += flops_per_token(config, cfg.seq_len) / 3  # the reference's forward
    flops_per_s = tokens_per_s * per_token
    measured = measured_peak_flops(config.dtype, cfg.matmul_size) * jax.device_count()
    published = peak_flops_per_device()
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "benchmark": "train_step",
        "objective": name,
        "reference": reference,
        **run_fields(cfg, config),
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "compile_s": round(compile_s, 2),
        "step_s": round(seconds, 6),
        "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(flops_per_s / 1e12, 4),
        "measured_peak_tflops": round(measured / 1e12, 4),
        "mfu": round(flops_per_s / measured, 4),
        "mfu_published_peak": (
            round(flops_per_s / (published * jax.device_count()), 4) if published else None
        ),
        "first_loss": first_loss,
        "loss": float(metrics["loss"]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": (
            round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None
        ),
    }
    keys = ("objective", "tokens_per_s", "model_tflops_per_s", "measured_peak_tflops", "mfu")
    if hf_dir is not None:
        step_tokens = sequences * cfg.seq_len
        result |= time_transformers(cfg, oc, hf_dir, rows, step_tokens, tokens_per_s)
        keys += ("hf_tokens_per_s", "ratio")
    log.info("| %s |", " | ".join(keys))
    log.info("|%s", "---|" * len(keys))
    log.info("| %s |", " | ".join(str(result[k]) for k in keys))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
