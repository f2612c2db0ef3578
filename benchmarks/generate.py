"""Generation throughput: `python -m benchmarks.generate [hydra overrides]`.

Times `jaxcai.sample.generate` (greedy, every sequence runs the full `new_tokens`) on
random prompts of `prompt_len` tokens for each batch size in `batch_sizes`, with the
reference workload model by default (`configs/model/bench_ref.yaml`). Reports new
tokens/s and, where the device publishes a memory bandwidth, the bandwidth bound: each
decode step reads every weight once plus the KV cache so far, so
`bound = batch / ((weight bytes + KV bytes at the mean length) / bandwidth)`.

With `compare_hf=true` (needs the `test` or `bench` extra: transformers and torch) the
same weights run through `transformers`' `generate` (greedy, same batch, same lengths)
in the same process, and the ratio is reported.

Prints a markdown table to the log and one JSON line last (also `result.json` in the
Hydra run directory); its `new_tokens_per_s` is the `headline_batch` figure.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from benchmarks.common import run_fields
from jaxcai import hf, model, sharding
from jaxcai.config import model_config
from jaxcai.metrics import peak_rss_mb
from jaxcai.model_config import param_count
from jaxcai.sample import SAMPLING_RULES, generate

log = logging.getLogger(__name__)

# Published peak memory bandwidth per device (bytes/s), by substrings of `device_kind`.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 0.3e12}


def bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in HBM_BANDWIDTH.items() if k in kind), None)


def bound_tokens_per_s(config, batch: int, prompt_len: int, new_tokens: int) -> float | None:
    bw = bandwidth()
    if bw is None:
        return None
    weight_bytes = param_count(config) * np.dtype(config.param_dtype).itemsize
    mean_len = prompt_len + new_tokens / 2
    kv_bytes = (
        2 * config.n_layers * batch * mean_len * config.n_kv_heads * config.head_dim
    ) * np.dtype(config.dtype).itemsize
    return batch * bw / (weight_bytes + kv_bytes)


def _prompts(rng: np.random.Generator, batch: int, length: int, vocab: int) -> list[list[int]]:
    return rng.integers(4, vocab, (batch, length)).tolist()


def time_jaxcai(config, params, prompts, new_tokens: int, mesh, repeats: int) -> float:
    kwargs = dict(max_new_tokens=new_tokens, stop_ids=(), batch_size=len(prompts), mesh=mesh)
    out = generate(config, params, prompts, **kwargs)  # compile
    assert all(len(t) == new_tokens for t in out.tokens)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(config, params, prompts, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def time_transformers(hf_dir: Path, prompts, new_tokens: int, repeats: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_model.eval()
    ids = torch.tensor(prompts)
    kwargs = dict(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    with torch.no_grad():
        hf_model.generate(ids, **kwargs)  # warm up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = hf_model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return best


@hydra.main(config_path="pkg://jaxcai.configs", config_name="bench_generate", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    config = model_config(cfg.model)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rng = np.random.default_rng(cfg.seed)
    with sharding.use_mesh(mesh, SAMPLING_RULES):
        params = model.init_sharded(config, jax.random.key(cfg.seed), mesh, SAMPLING_RULES)
        # The decoding layout, converted once (as a pipeline that samples repeatedly would).
        decode_config, decode_params = model.unrolled(config, params, mesh, SAMPLING_RULES)
    hf_dir = None
    if cfg.compare_hf:
        hf_dir = Path(tempfile.mkdtemp(prefix="jaxcai-bench-hf-"))
        hf.save_pretrained(hf_dir, config, params, progress=False)
    rows = []
    for batch in cfg.batch_sizes:
        prompts = _prompts(rng, batch, cfg.prompt_len, config.vocab_size)
        seconds = time_jaxcai(
            decode_config, decode_params, prompts, cfg.new_tokens, mesh, cfg.repeats
        )
        row = {
            "batch": batch,
            "prompt_len": cfg.prompt_len,
            "new_tokens": cfg.new_tokens,
            "seconds": round(seconds, 4),
            "new_tokens_per_s": round(batch * cfg.new_tokens / seconds, 1),
        }
        bound = bound_tokens_per_s(config, batch, cfg.prompt_len, cfg.new_tokens)
        if bound:
            row["bandwidth_bound_tokens_per_s"] = round(bound, 1)
            row["fraction_of_bound"] = round(row["new_tokens_per_s"] / bound, 3)
        if hf_dir is not None:
            hf_seconds = time_transformers(hf_dir, prompts, cfg.new_tokens, cfg.repeats)
            row["transformers_new_tokens_per_s"] = round(batch * cfg.new_tokens / hf_seconds, 1)
            row["ratio_vs_transformers"] = round(hf_seconds / seconds, 3)
        rows.append(row)
        log.info("%s", json.dumps(row))
    headline = next((r for r in rows if r["batch"] == cfg.headline_batch), rows[-1])
    result = {
        "benchmark": "generate",
        **run_fields(cfg, config),
        "results": rows,
        "new_tokens_per_s": headline["new_tokens_per_s"],
        "ratio_vs_transformers": headline.get("ratio_vs_transformers"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    log.info("generation throughput\n%s", "\n".join(table))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
