"""Packed preference batches (`jaxcai.data.pairs`): exactly the unpacked computation.

Each pair's prompt is laid out once, followed by both responses; the branch-aware mask
and positions make every token's log-prob what it is unpacked, so per-pair log-probs,
rewards, losses and gradients match (fp32, ≤ 2e-5), and `jaxcai-train` runs match too.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcai import model as M
from jaxcai import objectives
from jaxcai.config import ObjectiveConfig, compose
from jaxcai.data.pairs import pack_pairs, packed_length, row_count, shared_prefix, unpad_pairs
from jaxcai.data.pipeline import Layout, pad_rows, response_sequence
from jaxcai.data.training import training_data
from jaxcai.loop import run
from jaxcai.model_config import ModelConfig
from jaxcai.tokenizer import Tokenizer

TOL = dict(rtol=2e-5, atol=2e-5)
LENGTHS = (32, 64, 128, 256)
# A scanned Llama-style model, and an unrolled one with a sliding window of 5 (counted in
# positions, so the rejected response's window skips the chosen one), q/k norms, biases.
CONFIGS = {
    "llama": ModelConfig.tiny(),
    "window_qk_norm": ModelConfig.tiny(
        sliding_window=5,
        scan_layers=False,
        qk_norm=True,
        qkv_bias=True,
        head_dim=24,
        tie_embeddings=False,
    ),  # fmt: skip
}


def _pair(gen, prompt: int, chosen: int, rejected: int, differ_at: int | None = None):
    """An encoded pair of random ids; `differ_at` makes the sides' prompts part there (as
    when two sides were truncated differently)."""
    ids = lambda n: [int(x) for x in gen.integers(3, 1000, n)]
    p = ids(prompt)
    q = list(p) if differ_at is None else p[:differ_at] + ids(prompt - differ_at)
    return {
        "chosen": response_sequence(p, ids(chosen)),
        "rejected": response_sequence(q, ids(rejected)),
        "p_chosen": np.float32(gen.uniform()),
    }


def _pairs(seed: int = 0) -> list[dict]:
    gen = np.random.default_rng(seed)
    shapes = [
        (20, 5, 30), (3, 1, 1), (60, 40, 2), (2, 9, 9), (33, 33, 4), (7, 2, 50),
        (90, 1, 90), (5, 5, 5),
    ]  # fmt: skip
    out = [_pair(gen, *s) for s in shapes]
    out.append(_pair(gen, 30, 10, 12, differ_at=4))  # prompts part after 4 tokens
    out.append(_pair(gen, 1, 3, 3))  # a bare one-token prompt: nothing shared but it
    return out


def _params(mc: ModelConfig, head: str = "lm"):
    params = M.init_params(mc, jax.random.key(0), head=head)
    noise = jax.random.key(1)  # a non-zero reward head and biases
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(noise, len(leaves))
    noisy = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return tree.unflatten(noisy)


def _batches(pairs, **pack):
    unpacked = pad_rows(pairs, Layout("preference", 256, pad="bucket"), pad_id=0)
    return unpacked, pack_pairs(pairs, lengths=pack.pop("lengths", LENGTHS), pad_id=0, **pack)


def test_layout_shares_the_prompt_and_continues_positions():
    pairs = _pairs()
    _, packed = _batches(pairs)
    rows = packed["packed"]
    assert rows["tokens"].shape[1] == 256  # the longest pair (90 + 1 + 90 ...) needs 256
    for i, ex in enumerate(pairs):
        at = rows["pair"] == i
        shared = shared_prefix(ex["chosen"], ex["rejected"])
        assert int((at & (rows["segment_ids"] > 0)).sum()) == packed_length(ex)
        assert len(np.unique(np.nonzero(at & (rows["segment_ids"] > 0))[0])) == 1  # one row
        for branch, side in ((1, "chosen"), (2, "rejected")):
            sel = at & (rows["branch"] == branch)
            np.testing.assert_array_equal(rows["tokens"][sel], ex[side]["tokens"][shared:])
            n = len(ex[side]["tokens"])
            np.testing.assert_array_equal(rows["positions"][sel], np.arange(shared, n))
    assert shared_prefix(pairs[-2]["chosen"], pairs[-2]["rejected"]) == 4
    assert shared_prefix(pairs[-1]["chosen"], pairs[-1]["rejected"]) == 0
    # Padding and rows: zero mask, zero segments; more tokens padded away than unpacked.
    assert not rows["mask"][rows["segment_ids"] == 0].any()


def test_row_counts_groups_and_offsets():
    pairs = _pairs()[:8]
    _, packed = _batches(pairs, groups=2, row_multiple=4, pair_offset=16)
    rows = packed["packed"]
    assert rows["tokens"].shape[0] % 8 == 0  # 2 groups, a multiple of 4 rows each
    half = rows["tokens"].shape[0] // 2
    assert set(np.unique(rows["pair"][:half][rows["segment_ids"][:half] > 0])) <= set(range(16, 20))
    assert [row_count(n) for n in (1, 2, 3, 5, 7, 9, 13, 17)] == [1, 2, 3, 6, 8, 12, 16, 24]
    assert row_count(5, 4) == 8
    with pytest.raises(ValueError, match="fits no row length"):
        pack_pairs(pairs, lengths=(32,), pad_id=0)
    with pytest.raises(ValueError, match="do not split"):
        pack_pairs(pairs[:3], lengths=LENGTHS, pad_id=0, groups=2)


def test_a_pair_that_fills_a_row_and_rows_of_one_short_pair():
    gen = np.random.default_rng(3)
    full = _pair(gen, 40, 12, 13)  # 40 + 12 + 13 - 1 shared... = exactly 64 slots
    assert packed_length(full) == 64
    short = _pair(gen, 2, 1, 1)
    _, packed = _batches([full, short], lengths=(64,))
    rows = packed["packed"]
    assert rows["tokens"].shape == (2, 64)
    assert (rows["segment_ids"][0] > 0).all()  # the long pair fills its row alone
    assert (rows["segment_ids"][1] > 0).sum() == packed_length(short)


@pytest.mark.parametrize("name", ["llama", pytest.param("window_qk_norm", marks=pytest.mark.slow)])
def test_packed_logps_rewards_losses_and_gradients_equal_unpacked(name):
    mc = CONFIGS[name]
    unpacked, packed = _batches(_pairs())
    params = _params(mc)
    logps = jax.jit(lambda p, b: objectives.pair_logps(mc, p, b))
    for got, want in zip(logps(params, packed), logps(params, unpacked), strict=True):
        np.testing.assert_allclose(got, want, **TOL)

    oc = ObjectiveConfig(name="dpo", reference="model", beta=0.3, soft_labels=True)
    ref = jax.tree_util.tree_map(lambda x: x * 0.9, params)

    def dpo(p, b):
        return objectives.dpo_objective_loss(mc, oc, p, b, ref)

    grad = jax.jit(jax.value_and_grad(dpo, has_aux=True))
    (loss_p, m_p), g_p = grad(params, {**packed, "weight": packed["weight"]})
    (loss_u, m_u), g_u = grad(params, unpacked)
    np.testing.assert_allclose(loss_p, loss_u, **TOL)
    for k in m_u:
        np.testing.assert_allclose(m_p[k], m_u[k], err_msg=k, **TOL)
    for a, b in zip(jax.tree_util.tree_leaves(g_p), jax.tree_util.tree_leaves(g_u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6)

    rm_params = _params(mc, head="reward")
    rewards = jax.jit(lambda p, b: objectives.pair_rewards(mc, p, b))
    for got, want in zip(rewards(rm_params, packed), rewards(rm_params, unpacked), strict=True):
        np.testing.assert_allclose(got, want, **TOL)
    if name == "llama":
        return  # the reward model's gradients: the sliding-window case (slow) covers them
    rm_oc = ObjectiveConfig(name="rm", center_coef=0.01)
    rm = jax.jit(jax.grad(lambda p, b: objectives.rm_loss(mc, rm_oc, p, b)[0]))
    for a, b in zip(
        jax.tree_util.tree_leaves(rm(rm_params, packed)),
        jax.tree_util.tree_leaves(rm(rm_params, unpacked)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6)


def test_unpad_pairs_round_trips_padded_rows():
    pairs = _pairs()
    unpacked, packed = _batches(pairs)
    again = pack_pairs(unpad_pairs(unpacked), lengths=LENGTHS, pad_id=0)
    for k, v in packed["packed"].items():
        np.testing.assert_array_equal(again["packed"][k], v, err_msg=k)
    np.testing.assert_array_equal(again["p_chosen"], packed["p_chosen"])


def test_pipeline_packs_the_same_pairs_in_the_same_order():
    cfg = compose(
        ["objective=dpo", "data=preferences", "data.max_len=64", "objective.reference=model"]
    )
    tok = Tokenizer.load()
    batches = {}
    for pack in (True, False):
        cfg.data.pack_pairs = pack
        data = training_data(cfg.data, "dpo", tok, 0)
        it = data.iterator(rows_per_batch=6, seed=0, groups=2)
        batches[pack] = [next(it) for _ in range(3)]
        it.close()
    for packed, unpacked in zip(batches[True], batches[False], strict=True):
        objectives.check_batch(objectives.get("dpo"), cfg.objective, packed)
        assert packed["packed"]["tokens"].shape[0] % 2 == 0
        np.testing.assert_array_equal(packed["p_chosen"], unpacked["p_chosen"])
        again = pack_pairs(
            unpad_pairs(unpacked), lengths=Layout("preference", 64).pair_row_lengths(),
            pad_id=tok.pad_id, groups=2,
        )  # fmt: skip
        for k, v in packed["packed"].items():
            np.testing.assert_array_equal(again["packed"][k], v, err_msg=k)


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


@pytest.mark.parametrize("objective", ["dpo", pytest.param("rm", marks=pytest.mark.slow)])
def test_jaxcai_train_losses_are_unchanged_by_packing(tmp_path, objective):
    common = [
        f"experiment=smoke_{objective}", "trainer.steps=3", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.grad_accum=2", "data.pad=bucket",
    ]  # fmt: skip
    losses = {}
    for pack in ("true", "false"):
        run(compose([*common, f"data.pack_pairs={pack}"]), tmp_path / pack)
        losses[pack] = _losses(tmp_path / pack)
    assert len(losses["true"]) == 3
    np.testing.assert_allclose(losses["true"], losses["false"], **TOL)
    if objective == "dpo":  # the reference pass packs its pairs too
        ref = {k: np.load(tmp_path / k / "reference_logps.npz") for k in losses}
        for key in ("train/ref_chosen_logps", "eval/ref_rejected_logps"):
            np.testing.assert_allclose(ref["true"][key], ref["false"][key], **TOL)


def test_branch_mask_keeps_responses_apart():
    """Changing the chosen response never changes a rejected token's logits."""
    mc = CONFIGS["llama"]
    gen = np.random.default_rng(5)
    a = _pair(gen, 10, 6, 6)
    b = {**a, "chosen": response_sequence(list(a["chosen"]["tokens"][:10]), [7] * 6)}
    params = _params(mc)
    fwd = jax.jit(
        lambda p, r: M.forward(
            mc,
            p,
            r["tokens"],
            segment_ids_BT=r["segment_ids"],
            positions_BT=r["positions"],
            branch_BT=r["branch"],
        )
    )
    rows = [pack_pairs([x], lengths=(32,), pad_id=0)["packed"] for x in (a, b)]
    logits = [np.asarray(fwd(params, r)) for r in rows]
    rejected = rows[0]["branch"] == 2
    np.testing.assert_allclose(logits[0][rejected], logits[1][rejected], rtol=0, atol=0)
    assert not np.allclose(logits[0][rows[0]["branch"] == 1], logits[1][rows[0]["branch"] == 1])
    assert jnp.asarray(rows[0]["pair"]).max() == 0
