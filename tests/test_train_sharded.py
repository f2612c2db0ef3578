"""Training on a mesh of fake CPU devices, and on two processes, equals training on one device.

Each configuration runs `tests/scripts/train_mesh.py` in a subprocess (the device count is
fixed when JAX starts); the script trains every job it is given and the test compares the
runs' `metrics.jsonl` losses and final checkpoints with a single-device reference run.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from launch import Launch as _Launch
from launch import Lazy, finish, free_port
from safetensors.numpy import load_file

from jaxcai.checkpoint import Checkpointer

SCRIPT = Path(__file__).parent / "scripts" / "train_mesh.py"
OBJECTIVES = ("sft", "rm", "dpo", "lm")
STEPS = 5
# The smoke experiments shortened to 5 steps; the final evaluation (always run) reads one
# batch. `warmup_steps: 5` in the smoke configs makes the learning rate of steps 1-5 the
# same for any `trainer.steps` (the resume test relies on it).
COMMON = [
    f"trainer.steps={STEPS}",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.batch_size=8",
    "trainer.eval_batches=1",
]
D2F2T2 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
RTOL = ATOL = 1e-5
# Each host packs its own examples, so two hosts' packed rows differ from one host's
# packing of the same examples; unpacked, the two hosts' rows are exactly the reference's.
UNPACKED = ["data.pack=false"]


def overrides(objective: str, *extra: str) -> list[str]:
    out = [f"experiment=smoke_{objective}", *COMMON]
    if objective != "rm":  # a reward model has no Hugging Face layout
        out.append("trainer.export_hf=true")
    return [*out, *extra]


def Launch(jobs: list[dict], devices: int, log_dir: Path, name: str) -> _Launch:
    """`train_mesh.py` started on `jobs` (the `launch` helpers do the rest)."""
    return _Launch(SCRIPT, [json.dumps(jobs)], devices, log_dir, name)


def metrics(run_dir: Path) -> tuple[np.ndarray, dict[str, float]]:
    """Per-step train losses (steps 1..5 in order) and the final evaluation's metrics."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), records
    evals = [r for r in records if "eval/loss" in r and r["step"] == STEPS]
    assert len(evals) == 1, records
    return np.array([r["loss"] for r in train]), {
        k: v for k, v in evals[0].items() if k.startswith("eval/")
    }


def restore_on_one_device(run_dir: Path, step: int = STEPS) -> dict:
    """The whole train state of checkpoint `step`, restored onto this process's first
    device. The target comes from the checkpoint's own metadata: orbax cannot restore
    without one onto a topology other than the one that saved it."""
    path = (run_dir / "checkpoints" / str(step) / "state").absolute()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
        ocp.StandardCheckpointer().metadata(path).item_metadata,
    )
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        restored_step, state, meta = ckpt.restore(target, step)
    finally:
        ckpt.close()
    assert restored_step == step and meta["step"] == step
    return state


def assert_trees_close(actual, expected, what: str) -> None:
    flat_a = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_a.keys() == flat_e.keys(), what
    for path, e in flat_e.items():
        a = np.asarray(flat_a[path])
        assert a.shape == np.shape(e) and a.dtype == np.asarray(e).dtype, (what, path)
        np.testing.assert_allclose(
            a, np.asarray(e), rtol=RTOL, atol=ATOL, err_msg=f"{what} {jax.tree_util.keystr(path)}"
        )


def assert_run_equals_reference(run_dir: Path, ref_dir: Path, objective: str) -> None:
    losses, evals = metrics(run_dir)
    ref_losses, ref_evals = metrics(ref_dir)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL, err_msg="train loss")
    state, ref_state = restore_on_one_device(run_dir), restore_on_one_device(ref_dir)
    assert int(state["step"]) == STEPS
    assert_trees_close(state["params"], ref_state["params"], "params")
    assert_trees_close(state, ref_state, "train state")  # Adam moments, step, RNG
    if objective != "rm":
        exported = load_file(run_dir / "hf" / "model.safetensors")
        ref_exported = load_file(ref_dir / "hf" / "model.safetensors")
        assert_trees_close(exported, ref_exported, "hf export")
    assert evals.keys() == ref_evals.keys()
    for k, v in ref_evals.items():
        np.testing.assert_allclose(evals[k], v, rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_sharded")


@pytest.fixture(scope="module")
def reference(run_root):
    """All objectives, 5 steps each, on one device (started at once, waited for lazily)."""
    jobs = [{"run_dir": str(run_root / "ref" / o), "overrides": overrides(o)} for o in OBJECTIVES]
    jobs.append(
        {
            "run_dir": str(run_root / "ref" / "sft_unpacked"),
            "overrides": overrides("sft", *UNPACKED),
        }
    )
    lazy = Lazy(Launch(jobs, 1, run_root, "reference"))
    yield lazy
    lazy.kill()


@pytest.fixture(scope="module")
def sharded(run_root):
    """The same runs on 8 devices, mesh data=2 fsdp=2 tensor=2 (in parallel with the
    reference: each process mostly compiles, on one core)."""
    jobs = [
        {"run_dir": str(run_root / "d2f2t2" / o), "overrides": overrides(o, *D2F2T2)}
        for o in OBJECTIVES
    ]
    lazy = Lazy(Launch(jobs, 8, run_root, "d2f2t2"))
    yield lazy
    lazy.kill()


@pytest.mark.slow  # one launch of every objective on 8 devices and on 1: a minute
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sharded_training_equals_single_device(reference, sharded, run_root, objective):
    (ref_records,) = reference.records()
    (records,) = sharded.records()
    assert [r["device_count"] for r in ref_records] == [1] * (len(OBJECTIVES) + 1)
    assert [r["device_count"] for r in records] == [8] * len(OBJECTIVES)
    assert_run_equals_reference(
        run_root / "d2f2t2" / objective, run_root / "ref" / objective, objective
    )


# Slow: with the reference fixture it waits on, it was the longest default test (77 s);
# the slow run launches those references anyway, so there it costs only its own two processes.
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_processes_equal_single_device(reference, run_root, objective):
    """Two processes with 4 devices each (Gloo over 127.0.0.1) share one run directory."""
    run_dir = run_root / "two_processes" / objective
    distributed = [
        *UNPACKED,
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{free_port()}",
        "distributed.num_processes=2",
    ]
    launches = [
        Launch(
            [
                {
                    "run_dir": str(run_dir),
                    "overrides": overrides(
                        objective, *D2F2T2, *distributed, f"distributed.process_id={i}"
                    ),
                }
            ],
            4,
            run_root,
            f"two_processes_{objective}_{i}",
        )
        for i in range(2)
    ]
    try:
        records = finish(*launches)
    finally:
        for x in launches:
            x.kill()
    seen = [
        {k: r[k] for k in ("process_index", "process_count", "device_count", "local_device_count")}
        for (r,) in records
    ]
    assert seen == [
        {"process_index": i, "process_count": 2, "device_count": 8, "local_device_count": 4}
        for i in range(2)
    ]
    reference.records()
    ref = "sft_unpacked" if objective == "sft" else objective
    assert_run_equals_reference(run_dir, run_root / "ref" / ref, objective)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(reference, run_root):
    """3 steps on mesh data=8, then resumed to 5 on fsdp=4 tensor=2: steps 4-5 (and the
    final state) equal an uninterrupted 5-step run on one device."""
    objective = "sft"
    run_dir = run_root / "remesh" / objective
    first = overrides(objective, "mesh.data=8", "trainer.steps=3", "trainer.checkpoint_every=3")
    resumed = overrides(objective, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")
    launch = Launch(
        [{"run_dir": str(run_dir), "overrides": o} for o in (first, resumed)],
        8,
        run_root,
        "remesh",
    )
    try:
        finish(launch)
    finally:
        launch.kill()
    assert "resumed from checkpoint 3" in launch.stderr(), launch.tail()
    steps = Checkpointer(run_dir / "checkpoints")
    try:
        assert steps.steps() == [3, STEPS]
    finally:
        steps.close()
    reference.records()
    assert_run_equals_reference(run_dir, run_root / "ref" / objective, objective)
