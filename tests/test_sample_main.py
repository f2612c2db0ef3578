"""`python -m jaxcai.main.sample`: the Hydra entry point with its CPU smoke defaults."""

from __future__ import annotations

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
