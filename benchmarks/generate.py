"""Generation throughput: `python -m benchmarks.generate [hydra overrides]`.

Times `jaxcai.sample.generate` (greedy, every sequence runs the full `new_tokens`) on
random prompts of `prompt_len` tokens for each batch size in `batch_sizes`, with the
reference workload model by default (`configs/model/bench_ref.yaml`), with the default
continuous-batching sampler and, with `compare_static=true`, the static one
(`continuous=False`). Reports new tokens/s and, where the device publishes a memory
bandwidth, the bandwidth bound: each decode step reads every weight once plus the KV
cache so far, so `bound = batch / ((weight bytes + KV bytes at the mean length) /
bandwidth)`.

The mixed-length case (`mixed.prompts > 0`) gives `mixed.prompts` prompts a length
budget each, drawn uniformly from `mixed.min_new ... mixed.max_new` (a per-prompt
`max_new_tokens`, the same for both samplers), and times the static and the continuous
sampler on them at `mixed.batch` rows: tokens/s counts the tokens actually generated.

With `tunix_python` and `tunix_script` set, the Tunix `Sampler` harness
(`tunix_bench.py --mode gen`: batch 8, 128 -> 128, greedy) runs right after, in its own
process and virtual environment, and its tokens/s is reported against ours at batch 8.

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
import subprocess
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


def time_jaxcai(
    config, params, prompts, new_tokens, mesh, repeats: int, batch: int | None = None, **kw
) -> tuple[float, list[list[int]]]:
    """Best seconds of `repeats` calls after a compiling one, and the tokens."""
    batch = len(prompts) if batch is None else batch
    kwargs = dict(max_new_tokens=new_tokens, stop_ids=(), batch_size=batch, mesh=mesh, **kw)
    out = generate(config, params, prompts, **kwargs)  # compile
    budgets = [new_tokens] * len(prompts) if isinstance(new_tokens, int) else new_tokens
    assert [len(t) for t in out.tokens] == list(budgets)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(config, params, prompts, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out.tokens


def mixed_case(cfg, config, params, rng, mesh) -> dict:
    """Static vs continuous sampler on prompts whose lengths end at drawn budgets."""
    m = cfg.mixed
    max_new = min(m.max_new, config.max_seq_len - cfg.prompt_len)
    budgets = rng.integers(min(m.min_new, max_new), max_new + 1, m.prompts).tolist()
    prompts = _prompts(rng, m.prompts, cfg.prompt_len, config.vocab_size)
    row = {"prompts": m.prompts, "batch": m.batch, "prompt_len": cfg.prompt_len}
    row |= {"new_tokens": f"{min(budgets)}-{max(budgets)}", "total_new_tokens": sum(budgets)}
    tokens = {}
    for name, continuous in (("static", False), ("continuous", True)):
        seconds, tokens[name] = time_jaxcai(
            config, params, prompts, budgets, mesh, m.repeats, m.batch, continuous=continuous
        )
        row[f"{name}_seconds"] = round(seconds, 4)
        row[f"{name}_new_tokens_per_s"] = round(sum(budgets) / seconds, 1)
    row["greedy_equal"] = tokens["static"] == tokens["continuous"]
    row["speedup"] = round(row["continuous_new_tokens_per_s"] / row["static_new_tokens_per_s"], 3)
    return row


def time_tunix(python: str, script: str) -> float:
    """New tokens/s of the Tunix `Sampler` harness (its `RESULT` line), in its own venv."""
    proc = subprocess.run(
        [python, script, "--mode", "gen"], capture_output=True, text=True, check=True
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return float(json.loads(line[len("RESULT ") :])["new_tokens_per_s"])


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


def reference_row(cfg, config, decode_config, decode_params, prompts, mesh, hf_dir) -> dict:
    """The reference workload at one batch: continuous (default), static, transformers."""
    batch, new = len(prompts), cfg.new_tokens
    seconds, tokens = time_jaxcai(decode_config, decode_params, prompts, new, mesh, cfg.repeats)
    row = {"batch": batch, "prompt_len": cfg.prompt_len, "new_tokens": new}
    row |= {"seconds": round(seconds, 4), "new_tokens_per_s": round(batch * new / seconds, 1)}
    if cfg.compare_static:
        static, static_tokens = time_jaxcai(
            decode_config, decode_params, prompts, new, mesh, cfg.repeats, continuous=False
        )
        row["static_new_tokens_per_s"] = round(batch * new / static, 1)
        row["greedy_equal_static"] = static_tokens == tokens
    bound = bound_tokens_per_s(config, batch, cfg.prompt_len, new)
    if bound:
        row["bandwidth_bound_tokens_per_s"] = round(bound, 1)
        row["fraction_of_bound"] = round(row["new_tokens_per_s"] / bound, 3)
    if hf_dir is not None:
        hf_seconds = time_transformers(hf_dir, prompts, new, cfg.repeats)
        row["transformers_new_tokens_per_s"] = round(batch * new / hf_seconds, 1)
        row["ratio_vs_transformers"] = round(hf_seconds / seconds, 3)
    return row


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
        row = reference_row(cfg, config, decode_config, decode_params, prompts, mesh, hf_dir)
        rows.append(row)
        log.info("%s", json.dumps(row))
    mixed = None
    if cfg.mixed.prompts:
        mixed = mixed_case(cfg, decode_config, decode_params, rng, mesh)
        log.info("mixed lengths: %s", json.dumps(mixed))
    tunix = None
    if cfg.tunix_python and cfg.tunix_script:
        tunix = {"tunix_new_tokens_per_s": round(time_tunix(cfg.tunix_python, cfg.tunix_script), 1)}
        ours = next((r for r in rows if r["batch"] == 8), None)
        if ours is not None:
            tunix["ratio_vs_tunix_batch_8"] = round(
                ours["new_tokens_per_s"] / tunix["tunix_new_tokens_per_s"], 3
            )
        log.info("tunix: %s", json.dumps(tunix))
    headline = next((r for r in rows if r["batch"] == cfg.headline_batch), rows[-1])
    result = {
        "benchmark": "generate",
        **run_fields(cfg, config),
        "results": rows,
        "new_tokens_per_s": headline["new_tokens_per_s"],
        "ratio_vs_transformers": headline.get("ratio_vs_transformers"),
        "mixed": mixed,
        "tunix": tunix,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    log.info("generation throughput\n%s", "\n".join(table))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
