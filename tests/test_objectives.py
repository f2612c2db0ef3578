"""The objective registry: the built-in records, the batch layout the data pipeline, AOT
and the benchmarks share, and a toy objective added from outside the library by
registering one record (`tests/plugins/toy_objective.py`), trained through
`jaxcai-train plugins=[...]` with no other file changed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import model, objectives, sharding
from jaxcai import train as T
from jaxcai.config import ObjectiveConfig, compose, model_config
from jaxcai.data.training import training_data
from jaxcai.metrics import read_metrics
from jaxcai.objectives import ObjectiveError, batch_layout, check_batch
from jaxcai.tokenizer import Tokenizer
from jaxcai.trainer import abstract_batch

PLUGINS = Path(__file__).parent / "plugins"
REPO = Path(__file__).parent.parent


def test_builtin_records_say_what_each_objective_needs():
    assert {"lm", "sft", "rm", "dpo"} <= set(objectives.names())
    lm, sft, rm, dpo = (objectives.get(n) for n in ("lm", "sft", "rm", "dpo"))
    assert (lm.data_kind, sft.data_kind, rm.data_kind, dpo.data_kind) == (
        "text",
        "sft",
        "preference",
        "preference",
    )
    assert (lm.head, sft.head, rm.head, dpo.head) == ("lm", "lm", "reward", "lm")
    assert [o.pairs for o in (lm, sft, rm, dpo)] == [False, False, True, True]
    assert [o.weight for o in (lm, sft, rm, dpo)] == ["tokens", "tokens", "pairs", "pairs"]
    assert dpo.reference and not rm.reference
    assert dpo.reference_mode(ObjectiveConfig(name="dpo", reference="model")) == "model"
    assert rm.reference_mode(ObjectiveConfig(name="rm")) is None


def test_registry_errors_name_the_objective():
    with pytest.raises(ObjectiveError, match=r"unknown objective 'nope': choose one of"):
        objectives.get("nope")
    sft = objectives.get("sft")
    with pytest.raises(ObjectiveError, match="'sft' is already registered"):
        objectives.register(dataclasses.replace(sft, weight="pairs"))
    objectives.register(sft)  # the same record again is fine
    with pytest.raises(ObjectiveError, match="pairs come from preference data"):
        objectives.Objective("bad", "sft", sft.loss, pairs=True)
    with pytest.raises(ObjectiveError, match="data_kind must be one of"):
        objectives.Objective("bad", "images", sft.loss)
    with pytest.raises(ObjectiveError, match="cannot import 'no_such_module_here'"):
        objectives.import_plugins(["no_such_module_here"])


@pytest.mark.parametrize(
    "name, data, overrides",
    [
        ("lm", "pretrain", []),
        ("sft", "sft", []),
        ("rm", "preferences", []),
        ("dpo", "preferences", ["objective.reference=model"]),
    ],
)
def test_pipeline_rows_and_aot_batches_follow_the_layout(name, data, overrides):
    cfg = compose([f"objective={name}", f"data={data}", "data.max_len=32", *overrides])
    objective = objectives.get(name)
    train = training_data(cfg.data, name, Tokenizer.load(), 0)
    it = train.iterator(rows_per_batch=4, seed=0)
    rows = next(it)
    it.close()
    check_batch(objective, cfg.objective, rows)  # raises on a missing or extra key
    packed = rows.get("packed")  # preference pairs are packed by default (data.pairs)
    shape = (None, 32) if packed is None else packed["tokens"].shape
    layout = batch_layout(objective, cfg.objective, 4, shape[1], packed_rows=shape[0])
    got = jax.tree_util.tree_map(lambda a: (a.shape, np.dtype(a.dtype)), rows)
    want = jax.tree_util.tree_map(lambda s: (s.shape, np.dtype(s.dtype)), layout)
    assert got == want

    mesh = sharding.make_mesh()
    aot = abstract_batch(cfg, mesh)
    shapes = jax.tree_util.tree_map(lambda s: s.shape, aot)
    grad_accum, batch_size = cfg.trainer.grad_accum, cfg.trainer.batch_size
    assert shapes == jax.tree_util.tree_map(
        lambda s: (grad_accum, *s.shape),
        batch_layout(objective, cfg.objective, batch_size // grad_accum, 32),
    )


def test_check_batch_names_missing_and_unexpected_keys():
    dpo = objectives.get("dpo")
    oc = ObjectiveConfig(name="dpo", reference="precompute")
    rows = {k: np.zeros((2,), np.float32) for k in ("p_chosen", "weight")}
    side = {k: np.zeros((2, 4), np.int32) for k in objectives.ROW_KEYS}
    rows |= {"chosen": side, "rejected": side, "extra": np.zeros(2)}
    with pytest.raises(ObjectiveError, match=r"missing \['ref_chosen_logps', 'ref_rejected"):
        check_batch(dpo, oc, rows, "data.train=x")
    with pytest.raises(ObjectiveError, match=r"data.train=x: .*unexpected \['extra'\]"):
        check_batch(dpo, ObjectiveConfig(name="dpo", reference="model"), rows, "data.train=x")


@pytest.fixture
def toy():
    sys.path.insert(0, str(PLUGINS))
    try:
        objectives.import_plugins(["toy_objective"])
        yield objectives.get("sft_length_norm")
    finally:
        sys.path.remove(str(PLUGINS))


def test_toy_objective_accumulates_by_its_own_weight(toy):
    """Micro-batches are weighted by the record's `weight` (responses, here): the
    accumulated loss is the whole batch's mean of per-response mean token losses."""
    mc = model_config(compose(["model.n_layers=1"]).model)
    params = model.init_params(mc, jax.random.key(0))
    rng = np.random.default_rng(0)
    A, R, L = 2, 3, 10
    tokens = rng.integers(4, mc.vocab_size, (A, R, L + 1)).astype(np.int32)
    mask = np.zeros((A, R, L), np.int32)
    for a, r, start in [(0, 0, 2), (0, 1, 7), (1, 0, 4), (1, 2, 9)]:  # rows (0,2), (1,1) empty
        mask[a, r, start:] = 1
    batch = {
        "tokens": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "mask": mask,
        "segment_ids": np.ones((A, R, L), np.int32),
        "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (A, R, L)).copy(),
        "weight": np.ones((A, R), np.float32),
    }
    metrics, _ = T._accumulate(toy, mc, ObjectiveConfig(name=toy.name), params, batch, None, False)

    per_response = []
    for a in range(A):
        logits = model.forward(mc, params, jnp.asarray(batch["tokens"][a]))
        logps = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
        for r in range(R):
            m = mask[a, r].astype(bool)
            if m.any():
                nll = -logps[r, np.arange(L), batch["targets"][a, r]]
                per_response.append(nll[m].mean())
    assert float(metrics["responses"]) == 4  # a count: summed, not averaged
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(per_response), rtol=1e-5)


def test_toy_objective_trains_through_jaxcai_train(tmp_path):
    """One record in a module of its own, named by `plugins`, is all a new objective
    needs: `jaxcai-train` checks, trains, evaluates and checkpoints it."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcai.main.train",
            "experiment=smoke_sft",
            "plugins=[toy_objective]",
            "objective.name=sft_length_norm",
            "data.pack=false",
            "model.n_layers=1",
            "trainer.steps=4",
            "trainer.eval_every=2",
            "trainer.checkpoint_every=0",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert len(train) == 4 and all(np.isfinite(r["loss"]) for r in train)
    assert all(r["responses"] == 16 for r in train)  # batch_size 16, one response a row
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["eval/responses"] > 0
    assert (run_dir / "checkpoints" / "4").is_dir()
    assert "sft_length_norm" in (run_dir / "config.yaml").read_text()

    bad = subprocess.run(
        [sys.executable, "-m", "jaxcai.main.train", "objective.name=sft_length_norm",
         f"hydra.run.dir={tmp_path / 'bad'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "objective.name='sft_length_norm'" in bad.stderr and "choose one of" in bad.stderr
