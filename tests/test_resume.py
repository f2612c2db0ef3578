"""Resumed runs continue with exactly the losses of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai.checkpoint import Checkpointer, NoCheckpointError
from jaxcai.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "experiment=smoke_sft",
    "trainer.steps=30",
    "trainer.checkpoint_every=1",
    "trainer.eval_every=10",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "model.n_layers=1",
]


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcai.main.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _losses(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every loss logged, train and eval."""
    out = {}
    for record in read_metrics(run_dir):
        for key in ("loss", "eval/loss"):
            if key in record:
                out[(record["step"], key)] = record[key]
    return out


def _interrupt(run_dir: Path, sig: int, after_records: int) -> str:
    proc = _launch(run_dir)
    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_records:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    return stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("full")
    proc = _launch(run_dir)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return _losses(run_dir)


def _resume_and_compare(run_dir: Path, reference: dict) -> None:
    proc = _launch(run_dir)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    resumed = _losses(run_dir)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.slow  # a training subprocess interrupted and resumed
def test_sigterm_saves_then_resume_is_exact(tmp_path, uninterrupted):
    stderr = _interrupt(tmp_path, signal.SIGTERM, after_records=12)
    assert "preempted at step" in stderr, stderr[-2000:]
    steps = Checkpointer(tmp_path / "checkpoints").steps()
    assert steps and steps[-1] < 30
    _resume_and_compare(tmp_path, uninterrupted)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_exact(tmp_path, uninterrupted):
    _interrupt(tmp_path, signal.SIGKILL, after_records=15)
    assert Checkpointer(tmp_path / "checkpoints").steps()[-1] < 30
    _resume_and_compare(tmp_path, uninterrupted)


def _tree(seed: float) -> dict:
    return {"w": jnp.full((4, 3), seed), "b": jnp.arange(3.0) + seed, "step": jnp.asarray(1)}


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _tree(float(step)), {"step": step})
    ckpt.wait()
    # Damage the newest checkpoint's array data.
    for f in (tmp_path / "3").rglob("*"):
        if f.is_file() and "state" in f.parts and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    step, tree, meta = ckpt.restore(_tree(0.0))
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(tree["w"], np.full((4, 3), 2.0))
    assert "checkpoint 3" in caplog.text and "unreadable" in caplog.text
    ckpt.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    ckpt.save(1, _tree(1.0), {"step": 1})
    ckpt.wait()
    ckpt.close()
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()  # what a kill during a save leaves
    ckpt = Checkpointer(tmp_path)
    assert ckpt.steps() == [1]
    assert ckpt.restore(_tree(0.0))[0] == 1
    ckpt.close()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(NoCheckpointError, match="no checkpoint in"):
        Checkpointer(tmp_path).restore(_tree(0.0))


def test_restore_keeps_target_sharding(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, _tree(5.0), {"step": 5})
    ckpt.wait()
    target = jax.tree_util.tree_map(jnp.zeros_like, _tree(0.0))
    _, tree, _ = ckpt.restore(target)
    for restored, like in zip(
        jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(target), strict=True
    ):
        assert restored.sharding == like.sharding and restored.dtype == like.dtype
    ckpt.close()
