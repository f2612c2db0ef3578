"""Online RL throughput: `python -m benchmarks.rl algorithm=<ppo|rloo|grpo|online_dpo>`.

Runs the real online RL path (`jaxcai.loop.run`, the loop `jaxcai-train` runs) on a
temporary run directory: the reference workload model (`bench_ref`, random weights),
prompts from `bundled:red_team_prompts.jsonl`, the model-free reward
`jaxcai.rl.example_rewards:concise`. Each RL step is one rollout of `sequences`
responses (`max_new_tokens` each, sampled on the training mesh from the live params),
its scoring (the policy's and the reference's log-probs, PPO's values, the rewards and
advantages) and its `sequences * epochs / batch_size` update steps.

The figures come from the run's `metrics.jsonl`, which the feed (`jaxcai.rl.feed`)
writes on the step that starts each rollout: `rollout/sample_seconds`,
`rollout/score_seconds`, `rollout/tokens_per_s`, and for the RL step before it
`rollout/sampling_share` and `rollout/update_tokens_per_s`, from which that step's
length and update time follow. So the run makes one more rollout than it times, and the
first `warmup` RL steps (the first compiles everything) are not timed. With `sync=true`
the benchmark waits for the update steps in flight (and PPO's value step) before each
rollout's clock starts, so their tail is counted as update time, not sampling time; the
sampling had to wait for those params anyway. A timed RL step during which XLA compiled
something (a new prompt-length bucket of the sampler, say) for more than
`compile_tolerance` of its time is reported in `cycles` but left out of the figures;
`compiled_steps` counts them.

Reports rollout tokens/s (generated tokens per second of sampling), update tokens/s
(real tokens of the update batches per second of updating, PPO's value step included),
seconds per RL step and its split into sampling / scoring / updating, and peak host RSS
and device memory. Prints a markdown table to the log and one JSON line last (also
`result.json` in the Hydra run directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from jax import monitoring
from omegaconf import DictConfig

from benchmarks.common import run_fields
from jaxcai.config import ConfigError, compose, model_config
from jaxcai.metrics import peak_rss_mb

log = logging.getLogger(__name__)

ALGORITHMS = ("ppo", "rloo", "grpo", "online_dpo")
GROUP_SAMPLES = {"rloo": 4, "grpo": 4}  # the others sample 2 per prompt (online_dpo: a pair)

_compile_seconds = [0.0]  # tracing, lowering and XLA compilation so far in this process


def _count_compiles(event: str, seconds: float, **_: Any) -> None:
    if event.startswith("/jax/core/compile/"):
        _compile_seconds[0] += seconds


def shape(cfg: DictConfig) -> dict[str, int]:
    """The rollout and update sizes of the benchmark's settings."""
    name = cfg.algorithm
    if name not in ALGORITHMS:
        raise ConfigError(f"config algorithm={name!r}: choose one of {ALGORITHMS}")
    samples = cfg.samples or GROUP_SAMPLES.get(name, 2)
    if cfg.sequences % samples:
        raise ConfigError(f"config sequences={cfg.sequences}: must be a multiple of {samples}")
    pairs = name == "online_dpo"
    per_update = cfg.batch_size // 2 if pairs else cfg.batch_size  # trainer.batch_size
    rows = cfg.sequences // 2 if pairs else cfg.sequences
    if per_update < 1 or rows % per_update:
        raise ConfigError(f"config batch_size={cfg.batch_size}: must divide {cfg.sequences}")
    return {
        "prompts": cfg.sequences // samples,
        "samples": samples,
        "trainer_batch_size": per_update,
        "updates_per_step": rows // per_update * cfg.epochs,
    }


def train_config(cfg: DictConfig, sizes: dict[str, int]) -> DictConfig:
    """The `jaxcai-train` config of the benchmark run: enough steps for `warmup + rollouts`
    RL steps and the first update of one more rollout (which closes the last timed one)."""
    steps = (cfg.warmup + cfg.rollouts) * sizes["updates_per_step"] + 1
    overrides = [
        f"objective={cfg.algorithm}",
        f"data.train={cfg.prompts_data}",
        f"data.max_len={cfg.max_len}",
        f"reward.fn={cfg.reward_fn}",
        f"rollout.prompts={sizes['prompts']}",
        f"rollout.samples={sizes['samples']}",
        f"rollout.max_new_tokens={cfg.max_new_tokens}",
        f"rollout.epochs={cfg.epochs}",
        f"rollout.batch_size={cfg.sequences}",  # the whole rollout sampled as one batch
        f"trainer.steps={steps}",
        f"trainer.batch_size={sizes['trainer_batch_size']}",
        f"trainer.seed={cfg.seed}",
        "trainer.checkpoint_every=0",
        "trainer.eval_every=0",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        *cfg.overrides,
    ]
    run_cfg = compose(overrides)
    run_cfg.model = cfg.model
    run_cfg.mesh.merge_with(cfg.mesh)
    return run_cfg


@contextlib.contextmanager
def marked_rollouts(sync: bool, marks: list[float]):
    """While open, each rollout of `RolloutFeed` first (with `sync`) waits for the state
    the updates in flight produce, then appends the compile seconds so far to `marks`."""
    from jaxcai.rl.feed import RolloutFeed

    original = RolloutFeed._rollout

    def rollout(feed: RolloutFeed) -> None:
        if sync:
            jax.block_until_ready(feed.ctx.state)
            if feed.value is not None:
                jax.block_until_ready(feed.value.state)
        marks.append(_compile_seconds[0])
        original(feed)

    RolloutFeed._rollout = rollout
    try:
        yield
    finally:
        RolloutFeed._rollout = original


def cycles(records: list[dict[str, Any]], marks: list[float]) -> list[dict[str, Any]]:
    """One row per completed RL step: rollout `r`'s sampling and scoring (its own record)
    and its updates (the next rollout's record), and the compile seconds in between."""
    by_index = {int(m["rollout/index"]): m for m in records if "rollout/index" in m}
    out = []
    for r in sorted(by_index):
        if r + 1 not in by_index:
            break
        m, after = by_index[r], by_index[r + 1]
        rollout_s = m["rollout/sample_seconds"] + m["rollout/score_seconds"]
        step_s = rollout_s / after["rollout/sampling_share"]
        update_s = step_s - rollout_s
        out.append({
            "rl_step": r,
            "step_s": round(step_s, 4),
            "sample_s": round(m["rollout/sample_seconds"], 4),
            "score_s": round(m["rollout/score_seconds"], 4),
            "update_s": round(update_s, 4),
            "rollout_tokens_per_s": round(m["rollout/tokens_per_s"], 1),
            "update_tokens_per_s": round(after["rollout/update_tokens_per_s"], 1),
            "generated_tokens": round(m["rollout/tokens_per_s"] * m["rollout/sample_seconds"]),
            "update_tokens": round(after["rollout/update_tokens_per_s"] * update_s),
            "compile_s": round(marks[r] - marks[r - 1], 3),  # marks[r]: rollout r + 1's start
        })  # fmt: skip
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted rates and mean times over `rows` (timed RL steps)."""
    n = len(rows)
    total = {k: sum(r[k] for r in rows) for k in ("step_s", "sample_s", "score_s", "update_s")}
    generated = sum(r["generated_tokens"] for r in rows)
    trained = sum(r["update_tokens"] for r in rows)
    return {
        "rollout_tokens_per_s": round(generated / total["sample_s"], 1),
        "update_tokens_per_s": round(trained / max(total["update_s"], 1e-9), 1),
        "step_s": round(total["step_s"] / n, 4),
        "sample_s": round(total["sample_s"] / n, 4),
        "score_s": round(total["score_s"] / n, 4),
        "update_s": round(total["update_s"] / n, 4),
        "sample_share": round(total["sample_s"] / total["step_s"], 4),
        "score_share": round(total["score_s"] / total["step_s"], 4),
        "update_share": round(total["update_s"] / total["step_s"], 4),
        "generated_tokens_per_step": round(generated / n, 1),
        "update_tokens_per_step": round(trained / n, 1),
    }


def run_and_read(cfg: DictConfig, run_cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Run the RL loop in `run_dir`; its RL steps' rows (`cycles`)."""
    from jaxcai.loop import run

    marks: list[float] = []
    with marked_rollouts(cfg.sync, marks):
        run(run_cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cycles(records, marks)


@hydra.main(config_path="pkg://jaxcai.configs", config_name="bench_rl", version_base=None)
def main(cfg: DictConfig) -> dict:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    monitoring.register_event_duration_secs_listener(_count_compiles)
    sizes = shape(cfg)
    if cfg.rollouts < 1:
        raise ConfigError(f"config rollouts={cfg.rollouts}: time at least one RL step")
    config = model_config(cfg.model)
    run_cfg = train_config(cfg, sizes)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = out_dir / "run" if cfg.keep_run else Path(tempfile.mkdtemp(prefix="jaxcai-rl-"))
    try:
        rows = run_and_read(cfg, run_cfg, run_dir)
    finally:
        if not cfg.keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    timed = rows[cfg.warmup : cfg.warmup + cfg.rollouts]
    if len(timed) < cfg.rollouts:
        raise RuntimeError(
            f"the run completed {len(rows)} RL steps, not {cfg.warmup + cfg.rollouts}"
        )
    steady = [r for r in timed if r["compile_s"] <= cfg.compile_tolerance * r["step_s"]]
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "benchmark": "rl",
        "algorithm": cfg.algorithm,
        **run_fields(cfg, config),
        **{k: sizes[k] for k in ("prompts", "samples", "updates_per_step")},
        "sequences": cfg.sequences,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "max_len": cfg.max_len,
        "epochs": cfg.epochs,
        "sync": cfg.sync,
        "first_step_s": rows[0]["step_s"],
        "timed_steps": len(steady or timed),
        "compiled_steps": len(timed) - len(steady),
        **summary(steady or timed),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": (
            round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None
        ),
        "cycles": rows,
    }
    keys = ("rl_step", "step_s", "sample_s", "score_s", "update_s", "rollout_tokens_per_s",
            "update_tokens_per_s", "compile_s")  # fmt: skip
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    log.info("%s: RL steps (the first %d untimed)\n%s", cfg.algorithm, cfg.warmup, "\n".join(table))
    log.info("%s", json.dumps({k: v for k, v in result.items() if k != "cycles"}))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
