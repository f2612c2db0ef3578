"""LoRA adapters: the function they add, what trains, merging, export and loading."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from jaxcai import hf, lora, model, objectives
from jaxcai import train as T
from jaxcai.config import ConfigError, ObjectiveConfig, OptimizerConfig, compose, model_config
from jaxcai.load import load_model
from jaxcai.loop import run
from jaxcai.metrics import read_metrics
from jaxcai.model_config import LORA_TARGETS, ModelConfig
from jaxcai.tokenizer import load as load_tokenizer

QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]
BASE = ModelConfig.tiny()


def _flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _randomise_b(params, seed: int = 3):
    """Adapters as if trained: B no longer zero (a fresh adapter is a no-op)."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, value) in zip(keys, list(flat.items()), strict=True):
        if path[-1].endswith("_lora_b"):
            flat[path] = 0.1 * jax.random.normal(key, value.shape, value.dtype)
    return traverse_util.unflatten_dict(flat)


def _tokens(seed: int = 0, shape=(2, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, BASE.vocab_size, shape))


@pytest.mark.parametrize("scan", [True, False])
def test_adapters_follow_the_formula_and_merge_exactly(scan):
    c0 = BASE.replace(scan_layers=scan)
    base = model.init_params(c0, jax.random.key(0))
    c = c0.replace(lora_rank=4, lora_alpha=8.0)
    params = lora.add_adapters(c, base, jax.random.key(1))
    tokens = _tokens()
    # Fresh adapters (B = 0) leave the function unchanged; base weights are untouched.
    np.testing.assert_allclose(
        model.forward(c, params, tokens), model.forward(c0, base, tokens), atol=1e-6
    )
    flat, flat_base = _flat(params), _flat(base)
    for k, v in flat_base.items():
        np.testing.assert_array_equal(flat[k], v)
    adapters = {k for k in flat if "_lora_" in k}
    n_layers_trees = 1 if scan else BASE.n_layers
    assert len(adapters) == 2 * len(LORA_TARGETS) * n_layers_trees

    params = _randomise_b(params)
    out = model.forward(c, params, tokens)
    assert float(jnp.abs(out - model.forward(c0, base, tokens)).max()) > 1e-2
    merged_config, merged = lora.merge(c, params)
    assert merged_config == c0 and not lora.has_adapters(merged)
    np.testing.assert_allclose(model.forward(c0, merged, tokens), out, atol=2e-5)

    # Each merged kernel is W + (alpha / r) A @ B, written out independently in numpy.
    flat, flat_merged = _flat(params), _flat(merged)
    layer = "layers/" if scan else "layers_0/"
    for proj, group, n_in in (("q", "attn", 1), ("o", "attn", 2), ("down", "mlp", 1)):
        prefix = f"{layer}{group}/{proj}"
        w = np.asarray(flat[f"{prefix}_kernel"], np.float64)
        a = np.asarray(flat[f"{prefix}_lora_a"], np.float64)
        b = np.asarray(flat[f"{prefix}_lora_b"], np.float64)
        if not scan:
            w, a, b = w[None], a[None], b[None]
        want = np.stack(
            [w[i] + 2.0 * np.tensordot(a[i], b[i], axes=([n_in], [0])) for i in range(w.shape[0])]
        )
        got = np.asarray(flat_merged[f"{prefix}_kernel"])
        np.testing.assert_allclose(got if scan else got[None], want, rtol=1e-5, atol=1e-6)


def test_targets_choose_which_projections_adapt():
    c = BASE.replace(lora_rank=2, lora_targets=("q", "v"))
    names = {k.split("/")[-1] for k in _flat(model.param_shapes(c)) if "_lora_" in k}
    assert names == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b"}
    with pytest.raises(ValueError, match="lora_targets"):
        BASE.replace(lora_rank=2, lora_targets=("q", "bogus"))
    with pytest.raises(ValueError, match="lora_rank"):
        BASE.replace(lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_targets"):
        model_config(compose(["model.lora_rank=2", "model.lora_targets=[attn]"]).model)


def test_only_adapters_train_and_the_optimizer_holds_only_them(rng):
    c = BASE.replace(n_layers=1, lora_rank=4)
    params = lora.add_adapters(
        c, model.init_params(c.replace(lora_rank=0), jax.random.key(0)), jax.random.key(1)
    )
    opt_cfg = OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0)
    optimizer = T.make_optimizer(opt_cfg, 10)
    state = T.init_train_state(params, optimizer, seed=0)
    adapters, frozen = lora.split(params)
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
    assert n_opt == 2 * n_adapter  # Adam's two moments, for the adapters alone
    assert n_adapter < 0.2 * sum(x.size for x in jax.tree_util.tree_leaves(frozen))

    tokens = rng.integers(4, c.vocab_size, (1, 2, 12)).astype(np.int32)
    batch = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, -1)),
        "mask": jnp.ones((1, 2, 12), jnp.int32),
        "segment_ids": jnp.ones((1, 2, 12), jnp.int32),
        "weight": jnp.ones((1, 2), jnp.float32),
    }
    step = jax.jit(T.make_train_step(c, ObjectiveConfig(name="sft"), optimizer))
    new = state
    for _ in range(3):
        new, metrics = step(new, batch)
    assert float(metrics["loss"]) < float(step(state, batch)[1]["loss"])
    before, after = _flat(state.params), _flat(new.params)
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == ("_lora_" in k), k  # every adapter moved, no base weight did

    # The adapter gradients equal those of the full model's loss w.r.t. the adapters.
    oc = ObjectiveConfig(name="sft")
    _, grads = T._accumulate(objectives.get("sft"), c, oc, adapters, batch, None, True, frozen)
    sft = objectives.get("sft")
    full = jax.grad(lambda p: sft.loss(c, oc, p, jax.tree_util.tree_map(lambda x: x[0], batch))[0])(
        params
    )
    want = lora.split(full)[0]
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert float(optax.global_norm(grads)) > 0


def test_lora_run_trains_exports_merged_and_loads_merged(tmp_path):
    """`jaxcai-train model.lora_rank=...` from a Hugging Face model: only adapters move, the
    exported directory is a plain model equal to base + adapters (checked in
    `transformers`), and `load_model` of the run returns the same merged weights."""
    import transformers

    base_dir = tmp_path / "base"
    c0 = BASE.replace(n_layers=1)
    base = model.init_params(c0, jax.random.key(5))
    hf.save_pretrained(base_dir, c0, base, progress=False)
    load_tokenizer().save(base_dir)  # a complete directory: weights and tokenizer
    data = tmp_path / "pairs.jsonl"
    pairs = [("Name a colour.", "Blue."), ("Two plus two?", "Four."), ("Say hi.", "Hi!")]
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    cfg = compose(
        [
            "experiment=smoke_sft",
            f"data.train={data}",
            f"data.eval={data}",
            "optimizer.warmup_steps=0",
            f"trainer.init_from={base_dir}",
            "model.lora_rank=4",
            "model.lora_alpha=8",
            "model.lora_targets=[q,v,o,down]",
            "data.max_len=32",
            "trainer.steps=6",
            "trainer.batch_size=2",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.export_hf=true",
            "optimizer.lr=1e-2",
            *QUIET,
        ]
    )
    run(cfg, tmp_path / "run")
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]

    config, merged = load_model(tmp_path / "run")
    assert config.lora_rank == 0 and not lora.has_adapters(merged)
    flat_merged, flat_base = _flat(merged), _flat(base)
    assert set(flat_merged) == set(flat_base)
    moved = [k for k in flat_base if not np.array_equal(flat_merged[k], flat_base[k])]
    assert moved and all(
        k.split("/")[-1] in {"q_kernel", "v_kernel", "o_kernel", "down_kernel"} for k in moved
    )

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "run" / "hf", attn_implementation="eager"
    ).eval()
    tokens = np.asarray(_tokens(1, (2, 10)))
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(tokens)).logits.float().numpy()
    ours = model.forward(config, merged, jnp.asarray(tokens))
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_adapters_keep_float32_masters_over_a_bf16_base():
    c = BASE.replace(param_dtype="bfloat16", dtype="bfloat16", lora_rank=2)
    flat = _flat(model.param_shapes(c))
    assert flat["layers/attn/q_kernel"].dtype == jnp.bfloat16
    assert flat["layers/attn/q_lora_a"].dtype == jnp.float32
    assert flat["layers/mlp/up_lora_b"].dtype == jnp.float32
    params = _randomise_b(model.init_params(c, jax.random.key(0)))
    merged_config, merged = lora.merge(c, params)
    assert _flat(merged)["layers/attn/q_kernel"].dtype == jnp.bfloat16
    tokens = _tokens()
    np.testing.assert_allclose(
        model.forward(merged_config, merged, tokens).astype(np.float32),
        model.forward(c, params, tokens).astype(np.float32),
        atol=0.1,  # bf16 compute and a bf16-rounded merged kernel
    )
