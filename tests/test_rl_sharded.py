"""Online RL on meshes and through crashes: one update on fixed rollout rows is the same on
1 device and on 8 fake devices (data x fsdp x tensor); two processes (Gloo) run RL with
the metrics of one; and a run killed with SIGKILL mid-rollout and restarted writes the
same metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcai.metrics import read_metrics

pytestmark = pytest.mark.slow  # subprocesses: minutes on 2 cores

HERE = Path(__file__).parent
STEP_SCRIPT = HERE / "scripts" / "rl_step.py"
OBJECTIVES = ("grpo", "ppo", "rloo", "online_dpo")
TIMING = ("seconds", "tokens_per_s", "sampling_share", "mfu")


def _env(devices: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **extra,
    }


def _rl_steps(devices: int, mesh: list[str]) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, str(STEP_SCRIPT), ",".join(OBJECTIVES), json.dumps(mesh)],
        env=_env(devices), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    return {r.pop("objective"): r for r in records}


def test_rl_update_is_the_same_on_one_and_eight_devices():
    one = _rl_steps(1, [])
    eight = _rl_steps(8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    for objective in OBJECTIVES:
        a, b = one[objective], eight[objective]
        assert (a.pop("devices"), b.pop("devices")) == (1, 8)
        pa, pb = a.pop("params"), b.pop("params")
        assert set(a) == set(b) and set(pa) == set(pb)
        for key in a:
            # A clip fraction counts tokens past a threshold: float32 rounding may move
            # one token (of ~60) across it.
            atol = 0.02 if key.endswith("clipfrac") else 1e-6
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=atol, err_msg=key)
        for key in pa:
            np.testing.assert_allclose(pb[key], pa[key], rtol=2e-5, err_msg=key)


RESUME = [
    "experiment=smoke_ppo",
    "reward.fn=rl_test_rewards:concise_then_kill",
    "plugins=[rl_test_rewards]",
    "rollout.prompts=4",
    "rollout.samples=2",
    "rollout.max_new_tokens=8",
    "rollout.epochs=2",
    "data.max_len=64",
    "trainer.batch_size=4",  # 4 updates per rollout: checkpoints at 3 and 6 are mid-rollout
    "trainer.steps=12",
    "trainer.checkpoint_every=3",
    "trainer.async_checkpoints=false",
    "trainer.progress=false",
    "trainer.tensorboard=false",
]


def _train(run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxcai.main.train", *RESUME, f"hydra.run.dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _plain(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not any(t in k for t in TIMING)}
        for r in read_metrics(run_dir)
    ]


def test_kill_9_mid_rollout_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The third rollout (step 9) is killed with SIGKILL inside the reward function; the
    restart resumes from checkpoint 6 (half-way through rollout 2: its rows, the prompt
    position, the rollout count and the value model come back) and finishes."""
    env = _env(1, PYTHONPATH=os.pathsep.join([str(HERE / "plugins"), os.environ.get(
        "PYTHONPATH", "")]))  # fmt: skip
    whole = _train(tmp_path / "whole", env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    kill_file = tmp_path / "kill_at"
    kill_file.write_text("3")
    crashed = _train(tmp_path / "crashed", {**env, "RL_KILL_FILE": str(kill_file)})
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert not kill_file.exists()
    assert sorted(int(p.name) for p in (tmp_path / "crashed/checkpoints").iterdir()) == [3, 6]
    resumed = _train(tmp_path / "crashed", env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint 6" in (tmp_path / "crashed/train.log").read_text()
    got, want = _plain(tmp_path / "crashed"), _plain(tmp_path / "whole")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b), a["step"]
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


TWO_HOSTS = [
    "experiment=smoke_grpo",
    "rollout.prompts=4",
    "rollout.samples=2",
    "rollout.max_new_tokens=8",
    "data.max_len=64",
    "trainer.batch_size=8",
    "trainer.steps=4",
    "trainer.checkpoint_every=2",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]


def test_two_processes_run_rl_like_one(tmp_path):
    """Two processes of 4 devices each (Gloo over 127.0.0.1) sample the rollouts on the
    global mesh, score them and update: the metrics equal one process of 8 devices."""
    from launch import Launch, finish, free_port

    script = HERE / "scripts" / "train_mesh.py"

    def job(run_dir: Path, *extra: str) -> list[str]:
        return [json.dumps([{"run_dir": str(run_dir), "overrides": [*TWO_HOSTS, *extra]}])]

    one = Launch(script, job(tmp_path / "one"), 8, tmp_path, "one")
    finish(one)
    port = free_port()
    hosts = [
        Launch(
            script,
            job(
                tmp_path / "two",
                "distributed.enabled=true",
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
            ),
            4,
            tmp_path,
            f"two_{i}",
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        records = finish(*hosts)
    finally:
        for x in hosts:
            x.kill()
    assert [r[0]["process_count"] for r in records] == [2, 2]
    got, want = _plain(tmp_path / "two"), _plain(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] and len(want) >= 4
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b), a["step"]
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
