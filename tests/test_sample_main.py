"""`python -m jaxcai.main.sample`: the Hydra entry point with its CPU smoke defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_sample(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HYDRA_FULL_ERROR="1")
    return subprocess.run(
        # Hydra's run directory goes under tmp_path, not outputs/ in the repository.
        [sys.executable, "-m", "jaxcai.main.sample", *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sample_smoke_defaults(tmp_path):
    result = _run_sample(tmp_path, "max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    assert "Human: How do I keep basil alive" in result.stdout
    assert "Assistant:" in result.stdout
    assert "M params" in result.stderr


def test_sample_rejects_model_smaller_than_tokenizer(tmp_path):
    result = _run_sample(tmp_path, "max_new_tokens=5", "model.vocab_size=512")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "1024 pieces" in output
    assert "512" in output
    assert "Assistant:" not in result.stdout


def test_sample_from_a_training_run_writes_jsonl(tmp_path):
    """`jaxcai-sample checkpoint=<run>` reads the run's orbax params and writes a JSON line
    per sample, for prompts from a bundled dataset."""
    from jaxcai.config import compose
    from jaxcai.loop import run

    run_dir = tmp_path / "run"
    cfg = compose(
        [
            "experiment=smoke_sft",
            "trainer.steps=2",
            "trainer.eval_every=0",
            "trainer.progress=false",
            "trainer.tensorboard=false",
        ]
    )
    run(cfg, run_dir)
    out = tmp_path / "samples.jsonl"
    result = _run_sample(
        tmp_path / "hydra",
        f"checkpoint={run_dir}",
        "prompts=bundled:red_team_prompts.jsonl",
        "limit=3",
        "num_samples=2",
        "temperature=1.0",
        "max_new_tokens=6",
        f"output={out}",
        "progress=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["index"], x["sample"]) for x in lines] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    for x in lines:
        assert x["prompt"].startswith("\n\nHuman: ")
        assert x["stop_reason"] in ("stop_id", "stop_string", "length")
        assert 0 < len(x["tokens"]) <= 6 or x["stop_reason"] != "length"
        assert x["logprob"] < 0


def test_load_model_reads_runs_and_hf_directories(tmp_path):
    """`load_model` gives the same params from a run's checkpoint and from its HF export."""
    import jax
    import numpy as np

    from jaxcai.config import compose
    from jaxcai.load import load_model
    from jaxcai.loop import run

    run_dir = tmp_path / "run"
    cfg = compose(
        [
            "experiment=smoke_sft",
            "trainer.steps=2",
            "trainer.eval_every=0",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            "trainer.export_hf=true",
        ]
    )
    run(cfg, run_dir)
    config, params = load_model(run_dir)
    config2, params2 = load_model(run_dir / "hf")
    _, params3 = load_model(run_dir / "checkpoints" / "2")
    assert config.n_layers == config2.n_layers and config.vocab_size == config2.vocab_size
    for a, b, c in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(params2),
        jax.tree_util.tree_leaves(params3),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    try:
        load_model(tmp_path)
    except FileNotFoundError as e:
        assert "neither a Hugging Face directory" in str(e)
    else:
        raise AssertionError("a directory without a model must fail")
