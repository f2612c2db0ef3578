"""The benchmark programs still run (their numbers are read by people, not asserted)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path: Path, *command: str) -> dict:
    """Run a benchmark on CPU; its last stdout line, parsed as JSON."""
    proc = subprocess.run(
        [sys.executable, *command, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_module(name: str):
    """`benchmarks.<name>`, imported from the repository (not an installed package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_forward_benchmark_reports_throughput(tmp_path):
    result = run_benchmark(tmp_path, "benchmarks/forward.py", "steps=1", "warmup=1", "seq_len=16")
    assert result["model"] == "tiny" and result["seq_len"] == 16
    assert result["tokens_per_s"] > 0 and result["tflops_per_s"] > 0


def test_input_pipeline_benchmark_reports_throughput(tmp_path):
    result = run_benchmark(
        tmp_path,
        "benchmarks/input_pipeline.py",
        "model=tiny",
        "repeat=1",
        "max_len=64",
        "batches=5",
        "warmup=1",
        "train_steps=1",
    )
    assert result["kind"] == "sft" and result["max_len"] == 64 and result["model"] == "tiny"
    assert result["tokens_per_s"] > 0 and result["examples_per_s"] > 0
    assert result["train_tokens_per_s"] > 0 and result["headroom"] > 0
    assert 0 <= result["padding_fraction"] < 1
    assert json.loads((tmp_path / "result.json").read_text()) == result


@pytest.mark.slow
def test_generate_benchmark_reports_throughput(tmp_path):
    result = run_benchmark(
        tmp_path,
        "-m",
        "benchmarks.generate",
        "model=tiny",
        "batch_sizes=[1,2]",
        "headline_batch=2",
        "prompt_len=8",
        "new_tokens=4",
        "repeats=1",
        "mixed.prompts=6",  # the mixed-length case, small: 6 budgets of 2-12 on 4 rows
        "mixed.batch=4",
        "mixed.min_new=2",
        "mixed.max_new=12",
    )
    assert result["model"] == "tiny" and [r["batch"] for r in result["results"]] == [1, 2]
    assert result["mixed"]["greedy_equal"]
    assert all(r["new_tokens_per_s"] > 0 for r in result["results"])
    assert result["new_tokens_per_s"] == result["results"][1]["new_tokens_per_s"]
    assert result["ratio_vs_transformers"] > 0 and result["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "result.json").read_text()) == result


@pytest.mark.parametrize(
    "objective, extra, sequences, forwards",
    [("sft", [], 1, 0), ("dpo", ["objective.reference=model"], 2, 1)],
)
def test_train_step_benchmark_counts_tokens_and_flops(
    tmp_path, objective, extra, sequences, forwards
):
    """tokens/s counts both sequences of a pair; model FLOPs are `flops_per_token` per
    token plus one forward (a third) for an in-step reference; MFU is against the
    matmul peak measured in the same run."""
    from jaxcai.model_config import flops_per_token, preset

    result = run_benchmark(
        tmp_path,
        "-m",
        "benchmarks.train_step",
        f"objective={objective}",
        *extra,
        "model=tiny",
        "batch_size=2",
        "seq_len=32",
        "prompt_len=8",
        "steps=1",
        "warmup=0",
        "matmul_size=256",
    )
    assert result["objective"] == objective and result["peak_rss_mb"] > 0
    step_tokens = 2 * sequences * 32
    assert result["tokens_per_s"] == pytest.approx(step_tokens / result["step_s"], rel=1e-2)
    per_token = flops_per_token(preset("tiny"), 32) * (1 + forwards / 3)
    flops = result["tokens_per_s"] * per_token
    assert result["model_tflops_per_s"] == pytest.approx(flops / 1e12, rel=1e-2, abs=1e-4)
    assert result["mfu"] == pytest.approx(flops / (result["measured_peak_tflops"] * 1e12), rel=2e-2)
    assert json.loads((tmp_path / "result.json").read_text()) == result


@pytest.mark.slow  # the torch loss itself is checked in the default run (test_torch_loss_...)
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_train_step_benchmark_compares_with_transformers(tmp_path, objective):
    """`compare_hf=true` times the same step in torch: positive torch tokens/s, `ratio`
    is jaxcai's tokens/s over torch's, and both sides start from the same loss."""
    result = run_benchmark(
        tmp_path,
        "-m",
        "benchmarks.train_step",
        f"objective={objective}",
        "compare_hf=true",
        "model=tiny",
        "seq_len=32",
        "prompt_len=8",
        "batch_size=2",
        "steps=1",
        "warmup=0",
        "matmul_size=256",
    )
    assert result["hf_tokens_per_s"] > 0 and result["hf_device"] == "cpu"
    expected = result["tokens_per_s"] / result["hf_tokens_per_s"]
    assert result["ratio"] == pytest.approx(expected, rel=1e-3)
    assert result["hf_first_loss"] == pytest.approx(result["first_loss"], abs=1e-4)
    assert json.loads((tmp_path / "result.json").read_text()) == result


@pytest.mark.parametrize(
    "objective, reference",
    [("sft", None), ("dpo", "precompute"), ("dpo", "model"), ("rm", None)],
)
def test_torch_loss_matches_jaxcai_before_any_update(tmp_path, objective, reference):
    """The torch side computes jaxcai's loss: same weights, same batch, same value."""
    import jax
    import jax.numpy as jnp
    from omegaconf import OmegaConf

    from jaxcai.config import compose, model_config
    from jaxcai.model import init_params
    from jaxcai.train import make_eval_step

    hf_train = benchmark_module("hf_train")
    train_step = benchmark_module("train_step")
    config = model_config(compose(["model=tiny"]).model)
    oc = compose([f"objective={objective}"]).objective
    if reference:
        oc.reference = reference
    head = "reward" if objective == "rm" else "lm"
    params = init_params(config, jax.random.key(3), head=head)
    shape = OmegaConf.create(dict(seed=5, batch_size=2, seq_len=32, prompt_len=8))
    rows = train_step.random_batch(shape, objective, reference, config.vocab_size)

    batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], rows)  # one micro-batch
    ref = params if reference == "model" else None
    jax_loss = float(make_eval_step(config, oc)(params, batch, ref)["loss"])

    hf_train.save_weights(tmp_path, config, params, objective)
    model = hf_train.load_model(tmp_path, oc)
    ref_model = hf_train.frozen_copy(model) if reference == "model" else None
    torch_loss = hf_train.torch_loss(oc, model, hf_train.torch_batch(rows), ref_model)
    assert torch_loss.item() == pytest.approx(jax_loss, abs=1e-4)


def test_rl_benchmark_splits_each_rl_step_from_the_feed_metrics():
    """Rollout r's record holds its sampling and scoring; rollout r + 1's holds the share
    of r's RL step spent rolling out and its update tokens/s: step = rollout / share.
    Rates are token-weighted over the timed steps; compile seconds come from the marks."""
    from omegaconf import OmegaConf

    rl = benchmark_module("rl")
    records = [
        {"step": 1, "rollout/index": 1, "rollout/sample_seconds": 2.0,
         "rollout/score_seconds": 1.0, "rollout/tokens_per_s": 100.0},
        {"step": 2, "loss": 0.5},
        {"step": 3, "rollout/index": 2, "rollout/sample_seconds": 4.0,
         "rollout/score_seconds": 2.0, "rollout/tokens_per_s": 50.0,
         "rollout/sampling_share": 0.3, "rollout/update_tokens_per_s": 20.0},
        {"step": 5, "rollout/index": 3, "rollout/sample_seconds": 1.0,
         "rollout/score_seconds": 1.0, "rollout/tokens_per_s": 9.0,
         "rollout/sampling_share": 0.5, "rollout/update_tokens_per_s": 10.0},
    ]  # fmt: skip
    rows = rl.cycles(records, marks=[0.0, 5.0, 5.0])
    assert [(r["rl_step"], r["step_s"], r["update_s"], r["compile_s"]) for r in rows] == [
        (1, 10.0, 7.0, 5.0),
        (2, 12.0, 6.0, 0.0),
    ]
    s = rl.summary(rows)
    assert s["rollout_tokens_per_s"] == pytest.approx(400 / 6, abs=0.1)
    assert s["update_tokens_per_s"] == pytest.approx((7 * 20 + 6 * 10) / 13, abs=0.1)
    assert s["step_s"] == 11.0 and s["sample_share"] == pytest.approx(6 / 22, abs=1e-4)
    assert s["sample_share"] + s["score_share"] + s["update_share"] == pytest.approx(1, abs=1e-3)
    settings = dict(sequences=32, samples=None, batch_size=16, epochs=2)
    pairs = rl.shape(OmegaConf.create({**settings, "algorithm": "online_dpo"}))
    assert pairs == {"prompts": 16, "samples": 2, "trainer_batch_size": 8, "updates_per_step": 4}
    group = rl.shape(OmegaConf.create({**settings, "algorithm": "grpo"}))
    assert group["prompts"] == 8 and group["samples"] == 4 and group["updates_per_step"] == 4


@pytest.mark.slow  # a minute on 2 cores: compiling the sampler, the scoring and the update
@pytest.mark.parametrize("algorithm", ["ppo", "online_dpo"])
def test_rl_benchmark_reports_rollout_and_update_throughput(tmp_path, algorithm):
    result = run_benchmark(
        tmp_path,
        "-m",
        "benchmarks.rl",
        f"algorithm={algorithm}",
        "model=tiny",
        "sequences=4",
        "batch_size=4",
        "max_new_tokens=4",
        "max_len=64",
        "warmup=0",
        "rollouts=1",
        "compile_tolerance=1.0",  # the only timed RL step is the compiling one
    )
    assert result["algorithm"] == algorithm and result["model"] == "tiny"
    assert result["updates_per_step"] == 1 and result["timed_steps"] == 1
    assert result["rollout_tokens_per_s"] > 0 and result["update_tokens_per_s"] > 0
    split = result["sample_s"] + result["score_s"] + result["update_s"]
    assert split == pytest.approx(result["step_s"], rel=1e-3)
    assert result["generated_tokens_per_step"] <= 4 * 4 and result["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "result.json").read_text()) == result


def test_pairs_benchmark_reports_every_layout(tmp_path):
    result = run_benchmark(
        tmp_path, "-m", "benchmarks.pairs", "model=tiny", "max_len=96", "batches=2",
        "batch_size=4", "fixed_batches=1",
    )  # fmt: skip
    assert set(result["layouts"]) == {"fixed", "bucket", "packed"}
    layouts = result["layouts"]
    for figures in layouts.values():
        assert figures["pairs_per_s"] > 0 and figures["compiles"] >= 1
        assert 0 <= figures["padding_share"] < 1
    assert 0 < result["prompt_share"] < 1
    # The same pairs, the same steps (the fixed layout trains on its first batch only).
    assert abs(layouts["bucket"]["last_loss"] - layouts["packed"]["last_loss"]) < 1e-4


def test_synthetic_pairs_follow_the_hh_lengths():
    pairs = benchmark_module("pairs").synthetic_pairs(4000, seed=0, vocab=100)
    import numpy as np

    prompts = np.asarray([len(p["prompt"]) for p in pairs])
    responses = np.asarray([len(p["chosen"]) for p in pairs])
    assert prompts.min() >= 20 and prompts.max() <= 900
    assert 120 < prompts.mean() < 150 and 260 < np.percentile(prompts, 90) < 330
    assert responses.min() >= 5 and responses.max() <= 600 and 45 < responses.mean() < 62
