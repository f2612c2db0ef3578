"""Input-pipeline throughput: `python benchmarks/input_pipeline.py [hydra overrides]`.

Times the grain pipeline (`jaxcai.data.pipeline.train_iterator`) on its own, then the
jitted train step of `model` (default `small`) on a batch of the same shape, and reports
whether the pipeline keeps up: `headroom = pipeline tokens/s / train tokens/s` (> 1 means
the pipeline is not the bottleneck).

Data: by default the bundled file of `kind` (sft.jsonl, preferences.jsonl,
pretrain.jsonl) repeated `repeat` times into a temporary JSONL (copy N > 0 gets
" (copy N)" appended to its prompt, or text, with `vary=true`) and prepared with
`builders.prepare`; its time is reported as `prepare_s`, outside the pipeline figures.
`dataset=PATH` benchmarks a prepared dataset directory, `bundled:NAME` or a raw JSONL file
of `kind` instead.

Counts: `tokens` are non-padding row slots (`segment_ids > 0`, both sides of a pair);
`examples` are the segments of each row (distinct nonzero segment ids: packed
conversations, documents or document pieces for text, which splits documents across
rows) or pairs; `padding_fraction = 1 - tokens / row slots`.

The train step uses the objective of `kind` (sft: `sft`, text: `lm`, preference: `rm`)
with default optimizer settings, on one real batch from the pipeline placed on the mesh
of all local devices with a leading accumulation axis of 1 (`[1, batch_size, max_len]`).
Train tokens/s counts that batch's real tokens per step. `train_steps=0` skips it.

Prints a markdown table to the log and one JSON line last (also `result.json` in the
Hydra run directory).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from jaxcai import model, objectives, sharding
from jaxcai.data import builders
from jaxcai.data.batches import from_local_rows
from jaxcai.data.pipeline import IndexedSource, Layout, train_iterator
from jaxcai.data.training import open_dataset
from jaxcai.model_config import ModelConfig, param_count
from jaxcai.tokenizer import Tokenizer
from jaxcai.trainer import build, step_config

log = logging.getLogger(__name__)

BUNDLED_FILE = {"sft": "sft.jsonl", "preference": "preferences.jsonl", "text": "pretrain.jsonl"}
VARIED_FIELD = {"sft": "prompt", "preference": "prompt", "text": "text"}
OBJECTIVE = {"sft": "sft", "preference": "rm", "text": "lm"}


# ----- data -----------------------------------------------------------------------------


def write_repeated(kind: str, path: Path, repeat: int, vary: bool) -> int:
    """`repeat` copies of the bundled `kind` records as one JSONL file; returns its lines."""
    text = builders.bundled_path(BUNDLED_FILE[kind]).read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    field = VARIED_FIELD[kind]
    with path.open("w", encoding="utf-8") as f:
        for copy in range(repeat):
            for record in records:
                if vary and copy:
                    record = {**record, field: f"{record[field]} (copy {copy})"}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records) * repeat


def open_data(cfg: DictConfig, workdir: Path) -> tuple[builders.PreparedDataset, float]:
    """The dataset to read and the seconds spent preparing (or opening) it."""
    start = time.perf_counter()
    if cfg.dataset:
        ds = open_dataset(str(cfg.dataset), cfg.kind, key="dataset")
    else:
        if cfg.repeat < 1:
            raise ValueError(f"repeat={cfg.repeat}: must be at least 1")
        raw = workdir / f"{cfg.kind}_x{cfg.repeat}.jsonl"
        write_repeated(cfg.kind, raw, cfg.repeat, cfg.vary)
        ds = builders.prepare(cfg.kind, str(raw), workdir / "prepared")
    return ds, time.perf_counter() - start


# ----- counting -------------------------------------------------------------------------


def _segments(segment_ids: np.ndarray) -> int:
    """Segments of a batch of rows: starts of runs of one nonzero id (ids are contiguous)."""
    previous = np.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
    return int(((segment_ids > 0) & (segment_ids != previous)).sum())


def batch_counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(examples, real tokens, row slots) of one pipeline batch."""
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        return _segments(seg), int((seg > 0).sum()), seg.size
    sides = [batch[s]["segment_ids"] for s in ("chosen", "rejected")]
    pairs = int(np.count_nonzero(batch["weight"]))
    return pairs, sum(int((s > 0).sum()) for s in sides), sum(s.size for s in sides)


# ----- timing ---------------------------------------------------------------------------


def time_pipeline(cfg: DictConfig, source: IndexedSource, tok: Tokenizer) -> dict[str, Any]:
    """Read `warmup` batches (at least the first), then time `batches` more."""
    layout = Layout(kind=cfg.kind, max_len=cfg.max_len, pack=cfg.pack)
    start = time.perf_counter()
    it = train_iterator(
        source,
        tok,
        layout,
        rows_per_batch=cfg.batch_size,
        seed=cfg.seed,
        workers=cfg.workers,
        read_threads=cfg.read_threads,
    )
    try:
        batch = next(it)
        first_batch_s = time.perf_counter() - start
        for _ in range(cfg.warmup - 1):
            batch = next(it)
        examples = tokens = slots = 0
        start = time.perf_counter()
        for _ in range(cfg.batches):
            batch = next(it)
            n_examples, n_tokens, n_slots = batch_counts(batch)
            examples, tokens, slots = examples + n_examples, tokens + n_tokens, slots + n_slots
        seconds = time.perf_counter() - start
        batch = jax.tree.map(np.array, batch)  # our own copy (worker batches share memory)
    finally:
        it.close()
    return {
        "first_batch_s": first_batch_s,
        "seconds": seconds,
        "examples": examples,
        "tokens": tokens,
        "slots": slots,
        "last_batch": batch,
    }


def time_train_step(cfg: DictConfig, mc: ModelConfig, batch: dict[str, Any]) -> dict[str, Any]:
    """Compile, then time `train_steps` jitted train steps on `batch`."""
    objective = objectives.get(OBJECTIVE[cfg.kind])
    run_cfg = step_config(
        cfg.model,
        OmegaConf.create({"name": objective.name}),
        steps=cfg.train_warmup + cfg.train_steps,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_len,
    )
    mesh = sharding.make_mesh()
    with sharding.use_mesh(mesh):
        params = model.init_sharded(mc, jax.random.key(cfg.seed), mesh, head=objective.head)
        trainer = build(run_cfg, mesh, params=(mc, params))
        del params
        state, step = trainer.state, trainer.step
        trainer.state = None  # donated to the first step
        device_batch = from_local_rows(batch, cfg.batch_size, 1, mesh)  # [1, B, ...]
        start = time.perf_counter()
        for _ in range(cfg.train_warmup):
            state, metrics = step(state, device_batch, None)
            jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(cfg.train_steps):
            state, metrics = step(state, device_batch, None)
        jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - start) / cfg.train_steps
    return {
        "objective": objective.name,
        "compile_s": compile_s,
        "step_s": seconds,
        "loss": float(metrics["loss"]),
    }


# ----- report ---------------------------------------------------------------------------


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.items()]
    return "\n".join(lines)


@hydra.main(
    config_path="pkg://jaxcai.configs", config_name="bench_input_pipeline", version_base=None
)
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if cfg.kind not in OBJECTIVE:
        raise ValueError(f"kind={cfg.kind!r}: choose one of {sorted(OBJECTIVE)}")
    for key in ("batches", "warmup", "batch_size", "max_len"):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]}: must be at least 1")
    tok = Tokenizer.load()
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    if cfg.train_steps > 0:
        if tok.vocab_size > mc.vocab_size:
            raise ValueError(f"model: {mc.vocab_size} embeddings < {tok.vocab_size} pieces")
        if cfg.max_len > mc.max_seq_len:
            raise ValueError(f"max_len={cfg.max_len} exceeds model.max_seq_len={mc.max_seq_len}")

    with tempfile.TemporaryDirectory(prefix="jaxcai-bench-") as workdir:
        ds, prepare_s = open_data(cfg, Path(workdir))
        source = IndexedSource(ds.source("train"))
        log.info("%s: %d %s examples (%.2f s)", ds.path, len(source), cfg.kind, prepare_s)
        pipe = time_pipeline(cfg, source, tok)

    examples_per_s = pipe["examples"] / pipe["seconds"]
    tokens_per_s = pipe["tokens"] / pipe["seconds"]
    train = None
    if cfg.train_steps > 0:
        train = time_train_step(cfg, mc, pipe["last_batch"])
    batch_tokens = batch_counts(pipe["last_batch"])[1]
    train_tokens_per_s = batch_tokens / train["step_s"] if train else None

    result = {
        "kind": cfg.kind,
        "max_len": cfg.max_len,
        "batch_size": cfg.batch_size,
        "pack": cfg.kind == "text" or (cfg.kind == "sft" and bool(cfg.pack)),
        "workers": cfg.workers,
        "read_threads": cfg.read_threads,
        "dataset_examples": len(source),
        "prepare_s": round(prepare_s, 3),
        "first_batch_s": round(pipe["first_batch_s"], 3),
        "batches": cfg.batches,
        "batch_ms": round(pipe["seconds"] / cfg.batches * 1e3, 3),
        "examples_per_s": round(examples_per_s, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "examples_per_batch": round(pipe["examples"] / cfg.batches, 2),
        "padding_fraction": round(1 - pipe["tokens"] / pipe["slots"], 4),
        "model": cfg.model.get("name", "custom"),
        "params": param_count(mc),
        "platform": jax.devices()[0].platform,
        "devices": jax.device_count(),
        "objective": train["objective"] if train else None,
        "train_steps": cfg.train_steps,
        "train_compile_s": round(train["compile_s"], 3) if train else None,
        "train_step_ms": round(train["step_s"] * 1e3, 3) if train else None,
        "train_batch_tokens": batch_tokens,
        "train_tokens_per_s": round(train_tokens_per_s, 1) if train else None,
        "train_loss": round(train["loss"], 4) if train else None,
        "headroom": round(tokens_per_s / train_tokens_per_s, 2) if train else None,
    }
    log.info("input pipeline benchmark\n%s", markdown_table(result))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
