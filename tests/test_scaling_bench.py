"""The train-step scaling sweep runs one train_step per fake CPU device count (its numbers
are read by people, not asserted), directly and under Hydra multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = (
    "model=tiny",
    "seq_len=32",
    "batch_size=2",
    "prompt_len=8",
    "steps=1",
    "warmup=0",
    "matmul_size=256",
)


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run `python -m module args` from the repository root: its last stdout line (JSON)
    and its whole stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


@pytest.mark.parametrize(
    "layout, multirun", [("data", False), pytest.param("fsdp", True, marks=pytest.mark.slow)]
)
def test_scaling_sweep_runs_each_device_count(tmp_path, layout, multirun):
    """Rows for 1 and 2 devices, each from a train_step run that saw that many devices
    with the layout's mesh; the fsdp case goes through Hydra multirun (`-m`)."""
    where = [f"hydra.sweep.dir={tmp_path}", "-m"] if multirun else [f"hydra.run.dir={tmp_path}"]
    out, stdout = run_module(
        "benchmarks.scaling", "devices=[1,2]", f"layout={layout}", *SMALL, *where
    )
    job_dir = tmp_path / "0" if multirun else tmp_path
    rows = out["rows"]
    assert "| devices | layout | tokens/s |" in stdout
    assert out["benchmark"] == "scaling" and [r["devices"] for r in rows] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["layout"] == layout for r in rows)
    assert rows[0]["vs_1_device"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["vs_1_device"] / 2, abs=1e-4)
    assert json.loads((job_dir / "result.json").read_text()) == rows
    for n in (1, 2):
        result = json.loads((job_dir / f"n{n}" / "result.json").read_text())
        assert result["devices"] == n and result["model"] == "tiny" and result["batch_size"] == 2
        overrides = (job_dir / f"n{n}" / ".hydra" / "overrides.yaml").read_text()
        assert ("mesh.fsdp=-1" in overrides) == (layout == "fsdp")


def test_train_step_devices_key_reruns_on_that_many_devices(tmp_path):
    """The direct form: `+devices=2` makes train_step rerun itself on 2 fake CPU devices
    (here from a process that has 1), into the same run directory."""
    result, _ = run_module(
        "benchmarks.train_step",
        "+devices=2",
        *SMALL,
        f"hydra.run.dir={tmp_path}",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert result["devices"] == 2 and result["tokens_per_s"] > 0
    assert json.loads((tmp_path / "result.json").read_text()) == result
