"""DPO on real-length preference data: `python -m benchmarks.pairs`.

Random fixed-shape batches hide what real preference data costs: long-tailed prompt and
response lengths, and a prompt that an unpacked pair computes twice. This benchmark
trains the DPO step (`jaxcai.trainer.build`, in-step frozen reference, the step
`jaxcai-train` runs) on pairs of real lengths, in three layouts of the same batches of
`batch_size` pairs:

- `fixed`: each side padded to `max_len` (`data.pad=fixed`, `data.pack_pairs=false`);
- `bucket`: each batch padded to the smallest bucket that fits its longest side;
- `packed`: several pairs per row, each prompt once (`jaxcai.data.pairs`, the default).

Data: `dataset=PATH` (a prepared preference dataset or raw JSONL, encoded with the
bundled tokenizer in the Human/Assistant format), or by default synthetic pairs whose
token counts follow the Anthropic hh-rlhf harmless split under the Llama-2 tokenizer:
multi-turn prompts of 20-900 tokens (log-normal, mean ~136, p90 ~297), responses of
5-600 (mean ~48, p90 ~100), random ids. Only lengths matter to the cost.

Each layout runs every batch once untimed (compiling each shape it meets; the number of
programs is `compiles`), then `passes` timed passes: steady-state throughput, all shapes
compiled. Every `fixed` batch has the same shape and cost, so that layout runs the first
`fixed_batches` batches only. It reports pairs/s, non-padding tokens/s (a pair's two
sequences, as unpacked, so all layouts count the same work), the padding share of the
row slots the model computes, and the compile count.

With `tunix_python=PATH` (a Python with `google-tunix`), the same batches then train in
Tunix's `DPOTrainer` (`benchmarks/tunix_pairs.py`, the anchor model of the reference
workload), each batch padded to its own longest prompt and longest response, the best
its fixed-shape inputs allow; its figures and `packed_vs_tunix` join the result.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from benchmarks.common import run_fields
from jaxcai import sharding
from jaxcai.data.batches import from_local_rows, local_tokens
from jaxcai.data.pairs import pack_pairs
from jaxcai.data.pipeline import Layout, encode_example, pad_rows, response_sequence
from jaxcai.data.training import open_dataset
from jaxcai.tokenizer import Tokenizer
from jaxcai.trainer import build, step_config

log = logging.getLogger(__name__)

LAYOUTS = ("fixed", "bucket", "packed")
REPO = Path(__file__).resolve().parent.parent


def _lognormal(gen, n: int, mean: float, p90: float, lo: int, hi: int) -> np.ndarray:
    """`n` integer lengths, log-normal with the given mean and 90th percentile, clipped."""
    gap = np.log(p90 / mean)  # = 1.2816 s - s^2 / 2, solved for the smaller root s
    s = 1.2816 - np.sqrt(1.2816**2 - 2 * gap)
    median = mean / np.exp(s * s / 2)
    return np.clip(np.round(gen.lognormal(np.log(median), s, n)), lo, hi).astype(int)


def synthetic_pairs(n: int, seed: int, vocab: int) -> list[dict[str, list[int]]]:
    """Token-id pairs with hh-rlhf's lengths (see the module docstring)."""
    gen = np.random.default_rng(seed)
    prompts = _lognormal(gen, n, 136, 297, 20, 900)
    chosen = _lognormal(gen, n, 54, 100, 5, 600)
    rejected = _lognormal(gen, n, 48, 100, 5, 600)
    ids = lambda k: [int(x) for x in gen.integers(4, vocab, k)]
    return [
        {"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)}
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]


def dataset_pairs(spec: str, n: int, max_len: int) -> list[dict[str, list[int]]]:
    """The first `n` pairs of a preference dataset as ids (the bundled tokenizer, the
    Human/Assistant format, `max_len` truncation)."""
    tok = Tokenizer.load()
    ds = open_dataset(spec, "preference")
    source = ds.source("train")
    layout = Layout("preference", max_len)
    out = []
    for i in range(min(n, len(source))):
        ex = encode_example({**source[i], "index": i}, tok, layout)
        c, r = ex["chosen"], ex["rejected"]
        start = int(np.argmax(c["mask"]))  # the prompt is everything before the response
        prompt = [*c["tokens"][: start + 1]]
        out.append(
            {
                "prompt": [int(x) for x in prompt],
                "chosen": [int(x) for x in c["targets"][start:]],
                "rejected": [int(x) for x in r["targets"][int(np.argmax(r["mask"])) :]],
            }
        )
    return out


def fit(pair: dict[str, list[int]], max_len: int) -> dict[str, list[int]]:
    """A pair cut so each side fits `max_len + 1` ids (responses keep their start, the
    shared prompt its end, as `data.truncate` does); both sides keep the same prompt."""
    chosen, rejected = pair["chosen"][:max_len], pair["rejected"][:max_len]
    keep = max(1, min(len(pair["prompt"]), max_len + 1 - max(len(chosen), len(rejected))))
    return {"prompt": pair["prompt"][-keep:], "chosen": chosen, "rejected": rejected}


def _encoded(pair: dict[str, list[int]]) -> dict[str, Any]:
    """One pair as the pipeline encodes it."""
    out: dict[str, Any] = {"p_chosen": np.float32(1.0)}
    for side in ("chosen", "rejected"):
        out[side] = response_sequence(pair["prompt"], pair[side])
    return out


def layout_batch(examples: list[dict], layout: str, max_len: int, pad_id: int) -> dict:
    """One batch of encoded pairs in `layout` (see the module docstring)."""
    if layout == "packed":
        lengths = Layout("preference", max_len).pair_row_lengths()
        return pack_pairs(examples, lengths=lengths, pad_id=pad_id)
    pad = "fixed" if layout == "fixed" else "bucket"
    return pad_rows(examples, Layout("preference", max_len, pad=pad), pad_id)


def _slots(batch: dict) -> int:
    sides = [batch[k] for k in ("chosen", "rejected", "packed") if k in batch]
    return int(sum(side["tokens"].size for side in sides))


def time_layout(trainer, batches: list[dict], passes: int, mesh, rules) -> dict[str, float]:
    """A compiling pass over `batches`, then `passes` timed ones."""
    size = len(batches[0]["weight"])
    placed = [from_local_rows(b, size, 1, mesh, rules) for b in batches]
    state, ref = trainer.state, trainer.ref_params
    start = time.perf_counter()
    for b in placed:
        state, metrics = trainer.step(state, b, ref)
    jax.block_until_ready(metrics)
    first_pass_s = time.perf_counter() - start
    compiles = trainer.step._cache_size()
    start = time.perf_counter()
    losses = []
    for _ in range(passes):
        for b in placed:
            state, metrics = trainer.step(state, b, ref)
            losses.append(metrics["loss"])
    jax.block_until_ready(losses)
    seconds = time.perf_counter() - start
    pairs = passes * size * len(batches)
    real = passes * sum(local_tokens(b) for b in batches)
    slots = sum(_slots(b) for b in batches)
    return {
        "pairs_per_s": pairs / seconds,
        "seconds": seconds,
        "first_pass_s": first_pass_s,
        "compiles": int(compiles),
        "padding_share": 1 - sum(local_tokens(b) for b in batches) / slots,
        "computed_tokens_per_s": real / seconds,
        "last_loss": float(losses[-1]),
    }


def _pair_tokens(examples: list[dict]) -> int:
    """A pair's two sequences as unpacked (the work every layout does)."""
    return sum(len(e["chosen"]["tokens"]) + len(e["rejected"]["tokens"]) for e in examples)


def run_tunix(python: str, pairs: list[dict], cfg: DictConfig, out_dir: Path) -> dict:
    """`benchmarks/tunix_pairs.py` on the same pairs, in `python`'s environment."""
    records = out_dir / "pairs.jsonl"
    records.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cmd = [
        python, str(REPO / "benchmarks" / "tunix_pairs.py"), "--records", str(records),
        "--batch-size", str(cfg.batch_size), "--max-len", str(cfg.max_len),
        "--passes", str(cfg.passes), "--anchor", str(REPO / Path(cfg.tunix_anchor).expanduser()),
    ]  # fmt: skip
    log.info("tunix: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the Tunix run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


@hydra.main(version_base=None, config_path="../configs", config_name="bench_pairs")
def main(cfg: DictConfig) -> None:
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rules = sharding.DEFAULT_RULES
    with sharding.use_mesh(mesh, rules):
        result = _run(cfg, mesh, rules)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    log.info("\n%s", _table(result))
    print(json.dumps(result))


def _run(cfg: DictConfig, mesh, rules) -> dict[str, Any]:
    n = cfg.batch_size * cfg.batches
    if cfg.dataset:
        pairs = dataset_pairs(cfg.dataset, n, cfg.max_len)
        n = len(pairs) - len(pairs) % cfg.batch_size
        pairs = pairs[:n]
    else:
        pairs = synthetic_pairs(n, cfg.seed, int(cfg.model.vocab_size))
    pairs = [fit(p, cfg.max_len) for p in pairs]
    examples = [_encoded(p) for p in pairs]
    groups = [examples[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    responses = [len(p[s]) for p in pairs for s in ("chosen", "rejected")]
    prompt_slots = sum(2 * int((e["chosen"]["mask"] == 0).sum()) for e in examples)
    stats = {
        "pairs": n,
        "prompt_tokens_mean": float(np.mean([len(p["prompt"]) for p in pairs])),
        "response_tokens_mean": float(np.mean(responses)),
        "prompt_share": prompt_slots / _pair_tokens(examples),
    }
    result: dict[str, Any] = {"benchmark": "pairs", **stats, "layouts": {}}
    for layout in cfg.layouts:
        step_cfg = step_config(
            cfg.model, OmegaConf.create({"name": "dpo", "reference": "model", "beta": 0.1}),
            steps=1000, seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.max_len,
            mesh=cfg.mesh,
        )  # fmt: skip
        trainer = build(step_cfg, mesh, rules)
        # Every fixed batch has the same shape and cost: a few of them time it.
        use = groups[: cfg.fixed_batches] if layout == "fixed" else groups
        batches = [layout_batch(g, layout, cfg.max_len, 0) for g in use]
        figures = time_layout(trainer, batches, cfg.passes, mesh, rules)
        used = [e for g in use for e in g]
        figures["tokens_per_s"] = cfg.passes * _pair_tokens(used) / figures["seconds"]
        result["layouts"][layout] = figures
        result.update(run_fields(cfg, trainer.model))
        log.info("%s: %s", layout, json.dumps(figures))
        del trainer
    if cfg.tunix_python:
        with tempfile.TemporaryDirectory() as tmp:
            tunix = run_tunix(cfg.tunix_python, pairs, cfg, Path(tmp))
        tunix["tokens_per_s"] = tunix["pairs_per_s"] * _pair_tokens(examples) / n
        result["tunix"] = tunix
        if "packed" in result["layouts"]:
            result["packed_vs_tunix"] = (
                result["layouts"]["packed"]["pairs_per_s"] / tunix["pairs_per_s"]
            )
    return result


def _table(result: dict) -> str:
    rows = ["| layout | pairs/s | tokens/s | padding | compiles |", "|---|---|---|---|---|"]
    entries = dict(result["layouts"])
    if "tunix" in result:
        entries["tunix DPOTrainer"] = result["tunix"]
    for name, f in entries.items():
        rows.append(
            f"| {name} | {f['pairs_per_s']:.2f} | {f['tokens_per_s']:.0f} | "
            f"{f['padding_share']:.2f} | {f['compiles']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
