"""No hidden host <-> device copies: the train step and the decode loop run under
`jax.transfer_guard("disallow")` once their inputs are on device, so a stray
`np.asarray`, Python scalar or `float(...)` inside them fails loudly here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import model, sharding
from jaxcai.config import compose, model_config
from jaxcai.data.batches import from_local_rows
from jaxcai.sample.device import DecodeRules, decode_steps, prefill_step
from jaxcai.trainer import build


def _rows(rng: np.random.Generator, n: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    ids = rng.integers(4, vocab, (n, length + 1)).astype(np.int32)
    mask = np.ones((n, length), np.int32)
    mask[:, : length // 2] = 0
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "mask": mask,
        "segment_ids": np.ones((n, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
    }


def test_train_steps_copy_nothing_between_host_and_device():
    cfg = compose(["model.n_layers=1", "objective=dpo", "objective.reference=model"])
    cfg.trainer.grad_accum = 2
    cfg.trainer.batch_size = 4
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    with sharding.use_mesh(mesh):
        trainer = build(cfg, mesh)
        vocab = trainer.model.vocab_size
        local = {"chosen": _rows(rng, 4, 16, vocab), "rejected": _rows(rng, 4, 16, vocab)}
        local |= {"p_chosen": np.ones(4, np.float32), "weight": np.ones(4, np.float32)}
        batch = from_local_rows(local, 4, 2, mesh)
        state, ref = trainer.state, trainer.ref_params
        state, _ = trainer.step(state, batch, ref)  # compile outside the guard
        host_batch = jax.tree_util.tree_map(np.asarray, batch)
        with jax.transfer_guard("disallow"):
            for _ in range(2):
                state, metrics = trainer.step(state, batch, ref)
            eval_metrics = trainer.eval_step(state.params, batch, ref)
            with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
                trainer.eval_step(state.params, host_batch, ref)  # the guard is on
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(eval_metrics["loss"]))
    assert int(state.step) == 3


def test_decode_loop_copies_nothing_between_host_and_device():
    mc = model_config(compose(["model.n_layers=1"]).model)
    params = model.init_params(mc, jax.random.key(0))
    B, P, N = 2, 8, 6
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, mc.vocab_size, (B, P)), jnp.int32)
    segments = jnp.ones((B, P), jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(2), B))
    live = jnp.ones((B,), bool)
    rules = DecodeRules(
        temperature=jnp.float32(1.0),
        top_k=jnp.int32(0),
        top_p=jnp.float32(1.0),
        stop_ids=jnp.asarray([-1], jnp.int32),
    )
    until = jnp.int32(N)
    budget = jnp.full((B,), N, jnp.int32)  # each row's new-token budget
    prefill = lambda: prefill_step(mc, params, tokens, segments, keys, live, budget, rules, N)
    decode_steps(mc, params, prefill(), until, rules)  # compile outside
    with jax.transfer_guard("disallow"):
        state = prefill()
        state = decode_steps(mc, params, state, until, rules)
    assert int(state.step) == N
    assert np.asarray(state.tokens_BN).shape == (B, N)
