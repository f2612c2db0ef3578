"""The training engine: learning, exact gradient accumulation, the pure step, non-finite
losses, schedules, config validation and the `jaxcai-train` smoke experiments."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.errors import ConfigCompositionException

from jaxcai import model, objectives
from jaxcai import train as T
from jaxcai.checkpoint import Checkpointer
from jaxcai.config import (
    ConfigError,
    ObjectiveConfig,
    OptimizerConfig,
    compose,
    model_config,
)
from jaxcai.data.training import training_data
from jaxcai.loop import TrainingError, run
from jaxcai.metrics import read_metrics
from jaxcai.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]

# Short prompt/response pairs a tiny model can memorise in a few dozen steps.
PAIRS = [
    ("What is two plus two?", "Four."),
    ("Name a color.", "Blue."),
    ("Say hi.", "Hello there!"),
    ("What is the capital of France?", "Paris."),
    ("Count to three.", "One, two, three."),
    ("Name an animal.", "A cat."),
    ("What day follows Monday?", "Tuesday."),
    ("Is water wet?", "Yes, it is."),
]
# Responses of very different lengths, so micro-batches hold different token counts.
VARIED = [
    (f"Question {i}: tell me about item {i}.", " ".join(["Item", str(i)] + ["and more"] * (i % 5)))
    for i in range(24)
]


def write_sft(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


def train_records(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "loss" in m]


def eval_records(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if any(k.startswith("eval/") for k in m)]


# ----- jaxcai-train smoke experiments (shared by the learning checks) -------------------

SMOKE = ("sft", "rm", "dpo", "lm")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`jaxcai-train experiment=smoke_NAME` as a subprocess, run once per module."""
    done: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def get(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in done:
            run_dir = tmp_path_factory.mktemp(f"smoke_{name}")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "jaxcai.main.train",
                    f"experiment=smoke_{name}",
                    f"hydra.run.dir={run_dir}",
                    "trainer.progress=false",
                ],
                cwd=REPO,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
                capture_output=True,
                text=True,
                timeout=300,
            )
            done[name] = (proc, run_dir)
        return done[name]

    return get


@pytest.mark.parametrize(
    "name",
    [n if n in ("sft", "rm", "dpo") else pytest.param(n, marks=pytest.mark.slow) for n in SMOKE],
)
def test_smoke_experiment_end_to_end(smoke_run, name):
    proc, run_dir = smoke_run(name)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "config.yaml").is_file()
    records = read_metrics(run_dir)
    final = [m for m in records if m["step"] == 40]
    assert any("loss" in m for m in final), final
    assert any(k.startswith("eval/") for m in final for k in m), final
    # The eval at step 20 (eval_every) and the final one.
    assert [m["step"] for m in eval_records(run_dir)] == [20, 40]
    assert (run_dir / "checkpoints" / "40").is_dir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    losses = [m["loss"] for m in train_records(run_dir)]
    assert [m["step"] for m in train_records(run_dir)] == list(range(1, 41))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    # The summary the entry point prints as its last line.
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 40


# ----- learning -------------------------------------------------------------------------


def test_sft_memorises_a_small_dataset(tmp_path):
    data = write_sft(tmp_path / "pairs.jsonl", PAIRS)
    cfg = compose(
        [
            "experiment=smoke_sft",
            f"data.train={data}",
            f"data.eval={data}",
            "data.max_len=32",
            "model.n_layers=1",
            "trainer.steps=80",
            "trainer.batch_size=8",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "optimizer.lr=3e-3",
            *QUIET,
        ]
    )
    summary = run(cfg, tmp_path / "run")
    losses = [m["loss"] for m in train_records(tmp_path / "run")]
    print(f"sft loss: first {losses[0]:.4f} last {losses[-1]:.4f} eval {summary['eval/loss']:.4f}")
    assert len(losses) == 80
    # A random 1024-piece model starts near ln(1024) ~ 6.9; it reaches ~0.2 here.
    assert losses[0] > 6.0
    assert losses[-1] < 0.1 * losses[0]
    assert summary["eval/loss"] < 0.1 * losses[0]
    assert summary["eval/accuracy"] > 0.9
    rows = training_data(cfg.data, "sft", Tokenizer.load(), 0).eval_rows()
    assert summary["eval/tokens"] == rows.arrays["mask"].sum()  # each response token + eos once


def test_reward_model_ranks_held_out_pairs(smoke_run):
    proc, run_dir = smoke_run("rm")
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = eval_records(run_dir)[-1]
    assert final["step"] == 40
    assert final["eval/pairs"] == 40  # 10% of the 400 bundled pairs held out
    assert final["eval/accuracy"] > 0.95
    assert final["eval/margin"] > 0
    assert final["eval/rewards/chosen"] > final["eval/rewards/rejected"]


def test_dpo_prefers_chosen_on_held_out_pairs(smoke_run):
    proc, run_dir = smoke_run("dpo")
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = eval_records(run_dir)[-1]
    assert final["step"] == 40
    # A policy equal to its reference scores every pair 0 (accuracy 0): learning moved it.
    assert final["eval/rewards/accuracies"] > 0.5
    assert final["eval/rewards/margins"] > 0
    # beta * (log-ratio chosen - log-ratio rejected) on held-out pairs went up from 0.
    assert final["eval/rewards/chosen"] - final["eval/rewards/rejected"] > 0
    assert final["eval/loss"] < math.log(2)  # the loss of a policy equal to the reference
    assert (run_dir / "reference_logps.npz").is_file()


# ----- gradient accumulation ------------------------------------------------------------


def _accum_run(tmp_path: Path, data: Path, grad_accum: int) -> Path:
    run_dir = tmp_path / f"accum{grad_accum}"
    cfg = compose(
        [
            "experiment=smoke_sft",
            f"data.train={data}",
            f"data.eval={data}",
            "data.max_len=48",
            "model.n_layers=1",
            "trainer.steps=3",
            "trainer.batch_size=16",
            f"trainer.grad_accum={grad_accum}",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.export_hf=true",
            "optimizer.warmup_steps=0",
            *QUIET,
        ]
    )
    run(cfg, run_dir)
    return run_dir


def test_gradient_accumulation_is_exact(tmp_path):
    from safetensors.numpy import load_file

    data = write_sft(tmp_path / "varied.jsonl", VARIED)
    one, four = _accum_run(tmp_path, data, 1), _accum_run(tmp_path, data, 4)
    a, b = train_records(one), train_records(four)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b, strict=True):
        for key in ("loss", "accuracy", "grad_norm", "lr"):
            np.testing.assert_allclose(mb[key], ma[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert ma["tokens"] == mb["tokens"]
    ea, eb = eval_records(one)[-1], eval_records(four)[-1]
    np.testing.assert_allclose(eb["eval/loss"], ea["eval/loss"], rtol=1e-5)
    wa = load_file(str(one / "hf" / "model.safetensors"))
    wb = load_file(str(four / "hf" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-5, atol=2e-6, err_msg=name)


# ----- the pure step --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_step():
    """A 1-layer tiny model's params, its optimizer and the jitted sft step (compiled once)."""
    mc = model_config(compose(["model.n_layers=1"]).model)
    params = model.init_params(mc, jax.random.key(0))
    opt_cfg = OptimizerConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0)
    optimizer = T.make_optimizer(opt_cfg, 10)
    schedule = T.make_schedule(opt_cfg, 10)
    step = jax.jit(T.make_train_step(mc, ObjectiveConfig(name="sft"), optimizer, schedule))
    return mc, T.init_train_state(params, optimizer, seed=0), step


def _sft_batch(rng: np.random.Generator, accum: int, rows: int, length: int, vocab: int):
    tokens = rng.integers(4, vocab, (accum, rows, length)).astype(np.int32)
    mask = np.zeros((accum, rows, length), np.int32)
    mask[..., length // 2 :] = 1
    mask[1:, :, : length - 2] = 0  # micro-batches with different token counts
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=-1)),
        "mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((accum, rows, length), jnp.int32),
        "weight": jnp.ones((accum, rows), jnp.float32),
    }


def _trees_equal(a, b) -> bool:
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_pure_train_step(tiny_step, rng):
    mc, state0, step = tiny_step
    batch = _sft_batch(rng, 2, 2, 12, mc.vocab_size)

    state1, m1 = step(state0, batch)
    state2, m2 = step(state1, batch)
    assert int(state0.step) == 0 and int(state1.step) == 1 and int(state2.step) == 2
    assert {"loss", "accuracy", "tokens", "grad_norm", "lr", "nonfinite"} <= set(m1)
    assert int(m1["nonfinite"]) == 0 and int(m2["nonfinite"]) == 0
    assert float(m1["tokens"]) == 2 * 6 + 2 * 2
    assert float(m1["lr"]) == pytest.approx(1e-3)
    assert float(m1["grad_norm"]) > 0
    assert not _trees_equal(state0.params, state1.params)
    assert not _trees_equal(state1.params, state2.params)
    assert float(m2["loss"]) < float(m1["loss"])  # same batch again: it was learned from
    assert not np.array_equal(np.asarray(state1.rng), np.asarray(state2.rng))

    # The accumulated loss is the loss of the whole batch in one pass.
    flat = jax.tree_util.tree_map(lambda x: x.reshape(1, -1, *x.shape[2:]), batch)
    _, m_flat = step(state0, flat)
    np.testing.assert_allclose(float(m_flat["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_flat["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)


def test_step_with_no_loss_tokens_changes_nothing(tiny_step, rng):
    # From a fresh optimizer state (zero moments) with no weight decay, zero gradients
    # give a zero AdamW update.
    mc, state0, step = tiny_step
    batch = _sft_batch(rng, 2, 2, 12, mc.vocab_size)
    batch["mask"] = jnp.zeros_like(batch["mask"])
    state1, m = step(state0, batch)
    assert float(m["loss"]) == 0.0
    assert float(m["tokens"]) == 0.0
    assert float(m["grad_norm"]) == 0.0
    assert int(m["nonfinite"]) == 0
    assert int(state1.step) == 1
    assert _trees_equal(state0.params, state1.params)


# ----- non-finite losses ----------------------------------------------------------------

POISON = "Poisoned 🙂 answer."  # the emoji's byte-fallback pieces appear nowhere else
POISON_BATCH = 2
FIRST_BAD = len(PAIRS) // POISON_BATCH  # the last step of the first epoch (1-based)


def _poisoned_run(tmp_path: Path, monkeypatch, mode: str, steps: int):
    """A run whose loss is NaN on every batch holding one marked example, which the
    run's first epoch reaches at step FIRST_BAD; returns the config and run directory."""
    tok = Tokenizer.load()
    clean_ids = {i for p, r in PAIRS for i in tok.encode(f"{p} {r}")}
    marker = sorted(set(tok.encode(POISON)) - clean_ids)
    assert marker
    n, batch_size = len(PAIRS), POISON_BATCH
    # Put the marked example where seed 0's first epoch reaches it last: the pipeline
    # reads examples in a seeded permutation of their indices, one per row (no packing).
    order = grain.MapDataset.range(n).shuffle(seed=0)
    poison_at = int(order[batch_size * (FIRST_BAD - 1)])
    pairs = list(PAIRS)
    pairs[poison_at] = ("Say something.", POISON)
    data = write_sft(tmp_path / "poisoned.jsonl", pairs)
    clean = write_sft(tmp_path / "clean.jsonl", PAIRS)

    original = objectives.get("sft")

    def poisoned(mc, oc, params, batch, ref_params=None):
        loss, metrics = original.loss(mc, oc, params, batch, ref_params)
        hit = jnp.isin(batch["tokens"], jnp.asarray(marker)).any()
        return loss * jnp.where(hit, jnp.nan, 1.0), metrics

    monkeypatch.setitem(objectives._REGISTRY, "sft", dataclasses.replace(original, loss=poisoned))
    cfg = compose(
        [
            "experiment=smoke_sft",
            f"data.train={data}",
            f"data.eval={clean}",
            "data.max_len=32",
            "data.pack=false",
            "model.n_layers=1",
            f"trainer.steps={steps}",
            f"trainer.batch_size={batch_size}",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=1",
            "trainer.keep_checkpoints=10",
            f"trainer.nonfinite={mode}",
            *QUIET,
        ]
    )
    return cfg, tmp_path / mode


def test_nonfinite_loss_stops_and_checkpoints_stay_finite(tmp_path, monkeypatch):
    cfg, run_dir = _poisoned_run(tmp_path, monkeypatch, "stop", steps=2 * FIRST_BAD)
    with pytest.raises(TrainingError, match=rf"step {FIRST_BAD}\b.*not finite"):
        run(cfg, run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        assert ckpt.steps() == list(range(1, FIRST_BAD))
        mc = model_config(cfg.model)
        params = model.init_params(mc, jax.random.key(cfg.trainer.seed))
        optimizer = T.make_optimizer(cfg.optimizer, cfg.trainer.steps)
        target = T.init_train_state(params, optimizer, cfg.trainer.seed)
        for s in ckpt.steps():
            restored_step, state, meta = ckpt.restore(target, step=s)
            assert restored_step == s == int(state.step) == meta["step"]
            leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if x.dtype.kind == "f")
    finally:
        ckpt.close()
    assert [m["step"] for m in train_records(run_dir)] == list(range(1, FIRST_BAD))


def test_nonfinite_loss_skip_goes_on(tmp_path, monkeypatch):
    cfg, run_dir = _poisoned_run(tmp_path, monkeypatch, "skip", steps=FIRST_BAD + 1)
    summary = run(cfg, run_dir)
    records = train_records(run_dir)
    assert [m["step"] for m in records] == list(range(1, cfg.trainer.steps + 1))
    assert records[FIRST_BAD - 1]["loss"] is None  # NaN is written as null
    assert records[FIRST_BAD - 2]["skipped_steps"] == 0
    last = [m for m in read_metrics(run_dir) if "skipped_steps" in m][-1]
    assert last["skipped_steps"] > 0
    assert summary["train/skipped_steps"] == last["skipped_steps"]
    assert math.isfinite(summary["eval/loss"])
    assert (run_dir / "checkpoints" / str(cfg.trainer.steps)).is_dir()


# ----- schedules ------------------------------------------------------------------------

LR, WARMUP, TOTAL, RATIO = 2e-3, 10, 110, 0.1


def _schedule(kind: str, warmup: int = WARMUP):
    cfg = OptimizerConfig(lr=LR, warmup_steps=warmup, schedule=kind, min_lr_ratio=RATIO)
    return T.make_schedule(cfg, TOTAL)


def _expected(kind: str, s: int, warmup: int = WARMUP) -> float:
    if s < warmup:
        return LR * s / warmup
    end = LR * RATIO
    frac = min(s - warmup, TOTAL - warmup) / (TOTAL - warmup)
    if kind == "cosine":
        return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * frac))
    if kind == "linear":
        return LR + (end - LR) * frac
    return LR


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_values(kind):
    schedule = _schedule(kind)
    for s in [0, 1, 5, 9, 10, 11, 30, 60, 100, 109, 110, 150]:
        assert float(schedule(s)) == pytest.approx(_expected(kind, s), rel=1e-5, abs=1e-12), s
    assert float(schedule(0)) == 0.0
    assert float(schedule(WARMUP)) == pytest.approx(LR)
    final = LR if kind == "constant" else LR * RATIO
    assert float(schedule(TOTAL)) == pytest.approx(final, rel=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_without_warmup(kind):
    schedule = _schedule(kind, warmup=0)
    assert float(schedule(0)) == pytest.approx(LR)
    for s in [0, 37, 80, 110]:
        assert float(schedule(s)) == pytest.approx(_expected(kind, s, 0), rel=1e-5), s


# ----- config validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["objective=dpo", "objective.loss_type=bogus"], "objective.loss_type"),
        (["mesh.data=3"], "mesh.data"),
        (["trainer.batch_size=10", "trainer.grad_accum=4"], "trainer.batch_size"),
        (["optimizer.schedule=wavy"], "optimizer.schedule"),
        (["trainer.nonfinite=maybe"], "trainer.nonfinite"),
        (["data.max_len=100000"], "data.max_len"),
    ],
)
def test_bad_config_fails_at_start_up(tmp_path, overrides, key):
    cfg = compose(["experiment=smoke_sft", *QUIET, *overrides])
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"config {key}\b") as info:
        run(cfg, run_dir)
    value = overrides[-1].split("=", 1)[1]
    assert value in str(info.value)
    assert list(run_dir.iterdir()) == []  # nothing written: no config, metrics, checkpoints


def test_config_type_error_at_compose():
    with pytest.raises(ConfigCompositionException, match="objective.beta"):
        compose(["objective=dpo", "objective.beta=abc"])


def test_reward_model_starts_from_a_language_model_checkpoint(tmp_path):
    """`trainer.init_from` loads the backbone; the scalar head starts fresh."""
    from jaxcai import hf
    from jaxcai.model_config import ModelConfig

    config = ModelConfig.tiny(n_layers=1)
    lm = model.init_params(config, jax.random.key(7))
    hf.save_pretrained(tmp_path / "lm", config, lm, progress=False)
    Tokenizer.load().save(tmp_path / "lm")  # a complete directory: weights and tokenizer
    cfg = compose(
        [
            "experiment=smoke_rm",
            *QUIET,
            f"trainer.init_from={tmp_path / 'lm'}",
            "trainer.steps=2",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "optimizer.lr=1e-9",
            "trainer.eval_batches=1",
        ]
    )
    run(cfg, tmp_path / "run")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    target = {"params": model.init_params(config, jax.random.key(0), head="reward")}
    from orbax.checkpoint import args as ocp_args

    restored = ckpt.manager.restore(
        2, args=ocp_args.Composite(state=ocp_args.PyTreeRestore(partial_restore=True, item=target))
    )["state"]["params"]
    ckpt.close()
    assert "lm_head" not in restored and restored["reward_kernel"].shape == (config.d_model,)
    # lr 1e-9: two steps leave the loaded backbone where it was.
    np.testing.assert_allclose(restored["embed"], lm["embed"], atol=1e-6)
    np.testing.assert_allclose(
        restored["layers"]["mlp"]["up_kernel"], lm["layers"]["mlp"]["up_kernel"], atol=1e-6
    )


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_logits_give_the_same_step(rng, tied):
    """`logits_chunk` changes how the loss is computed, not what: the same metrics and
    gradients for sft and dpo (in-step reference) as with full logits."""
    mc = model_config(compose(["model.n_layers=1"]).model).replace(tie_embeddings=tied)
    params = model.init_params(mc, jax.random.key(1))
    sft = _sft_batch(rng, 2, 2, 12, mc.vocab_size)
    rows = lambda sl: {k: v[:, sl] for k, v in sft.items() if k != "weight"}
    dpo = {"chosen": rows(slice(0, 1)), "rejected": rows(slice(1, 2))}
    dpo["weight"] = jnp.ones((2, 1), jnp.float32)
    ref = model.init_params(mc, jax.random.key(2))
    for oc, batch in ((ObjectiveConfig(name="sft"), sft), (ObjectiveConfig(name="dpo"), dpo)):
        results = []
        for chunk in (0, 5):
            step = functools.partial(
                T._accumulate, objectives.get(oc.name), mc.replace(logits_chunk=chunk), oc
            )
            results.append(jax.jit(lambda p, b, s=step: s(p, b, ref, True))(params, batch))
        (m_full, g_full), (m_chunk, g_chunk) = results
        assert m_full.keys() == m_chunk.keys()
        for k in m_full:
            np.testing.assert_allclose(m_chunk[k], m_full[k], rtol=1e-5, atol=1e-6, err_msg=k)
        leaves = jax.tree_util.tree_leaves
        for a, b in zip(leaves(g_full), leaves(g_chunk), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
        assert float(optax.global_norm(g_full)) > 0
