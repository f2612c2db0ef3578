"""Ahead-of-time compilation: the memory report of a run's step, from shapes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxcai import sharding
from jaxcai.aot import compile_train_step, memory_report
from jaxcai.config import compose, model_config
from jaxcai.model_config import param_count

REPO = Path(__file__).resolve().parent.parent
MB = 1024**2


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_report_counts_params_and_optimizer_exactly(objective):
    data = "preferences" if objective == "dpo" else "sft"
    cfg = compose(["experiment=smoke_sft", f"objective={objective}", f"data={data}"])
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh), jax.devices()[:1])
    compiled, state, mc = compile_train_step(cfg, mesh)
    r = memory_report(compiled, state)
    n = param_count(mc)
    assert r["params_mb"] == pytest.approx(4 * n / MB)  # float32, one device holds all
    assert r["opt_state_mb"] == pytest.approx(2 * 4 * n / MB, rel=1e-3)  # Adam's mu and nu
    # The state is donated: its buffers are both argument and output, aliased.
    assert r["arguments_mb"] >= r["params_mb"] + r["opt_state_mb"]
    assert r["aliased_mb"] >= r["params_mb"] + r["opt_state_mb"]
    assert r["temp_mb"] > 0
    want = r["arguments_mb"] + r["outputs_mb"] - r["aliased_mb"] + r["temp_mb"]
    assert r["peak_mb"] == pytest.approx(want)


def test_lora_state_holds_optimizer_moments_for_adapters_only():
    cfg = compose(["experiment=smoke_sft", "model.lora_rank=2"])
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh), jax.devices()[:1])
    compiled, state, mc = compile_train_step(cfg, mesh)
    r = memory_report(compiled, state)
    assert r["opt_state_mb"] < 0.2 * r["params_mb"]


def test_jaxcai_aot_compiles_for_a_mesh_of_fake_devices(tmp_path):
    """`jaxcai-aot ... aot.devices=8` in a fresh process: an FSDP mesh of 8 devices whose
    per-device params are an eighth of the model's (the norms, replicated, are a rounding
    error), and the result as JSON."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcai.main.aot",
            "experiment=smoke_sft",
            "mesh.data=1",
            "mesh.fsdp=-1",
            "aot.devices=8",
            "aot.device_memory_gb=0.001",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "aot.json").read_text())
    assert result["devices"] == 8 and result["mesh"]["fsdp"] == 8
    cfg = compose(["experiment=smoke_sft"])
    full_mb = 4 * param_count(model_config(cfg.model)) / MB
    assert full_mb / 8 <= result["params_mb"] < 1.1 * full_mb / 8
    assert result["fits"] is False  # 1 MB of device memory holds nothing
    assert "| devices |" in proc.stderr or "| devices |" in proc.stdout


def test_bad_device_count_is_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcai.main.aot", "aot.devices=0", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "aot.devices" in proc.stderr
