"""One online RL update on fixed rollout rows, on the mesh the overrides give.

    python rl_step.py OBJECTIVES OVERRIDES_JSON

Builds the run's trainer (`jaxcai.trainer.build`, random tiny model), fills one batch of
the objective's layout with rows drawn from a fixed numpy seed (so every mesh sees the
same rollout), runs the train step (and PPO's value step) once and prints one JSON line
per objective (`OBJECTIVES` is comma-separated): the step's metrics and the sum of
squares of every updated parameter. The test runs it
on 1 device and on 8 fake devices and compares.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from jaxcai import objectives, sharding
from jaxcai.config import compose
from jaxcai.data.batches import from_local_rows
from jaxcai.rl.value import ValueModel
from jaxcai.trainer import build

ROWS, LENGTH, PROMPT = 8, 16, 5


def _rows(rng: np.random.Generator, n: int, vocab: int) -> dict[str, np.ndarray]:
    tokens = rng.integers(3, vocab, size=(n, LENGTH + 1)).astype(np.int32)
    ends = rng.integers(PROMPT + 2, LENGTH + 1, size=n)
    slots = np.arange(LENGTH)
    real = slots[None, :] < ends[:, None]
    return {
        "tokens": np.where(real, tokens[:, :-1], 0).astype(np.int32),
        "targets": np.where(real, tokens[:, 1:], 0).astype(np.int32),
        "mask": (real & (slots[None, :] >= PROMPT - 1)).astype(np.int32),
        "segment_ids": real.astype(np.int32),
        "positions": np.where(real, slots[None, :], 0).astype(np.int32),
    }


def fixed_batch(objective, oc, vocab: int) -> dict:
    """Every key of the objective's layout, drawn from seed 0."""
    rng = np.random.default_rng(0)
    layout = objectives.batch_layout(objective, oc, ROWS, LENGTH)

    def fill(tree: dict) -> dict:
        rows = _rows(rng, ROWS, vocab)
        out = {}
        for key, spec in tree.items():
            if isinstance(spec, dict):
                out[key] = fill(spec)
            elif key in rows:
                out[key] = rows[key]
            elif key in ("weight", "p_chosen"):
                out[key] = rng.uniform(0.6, 1.0, size=spec.shape).astype(np.float32)
            else:  # log-probs, advantages, returns, values
                out[key] = (-rng.random(spec.shape) if "logps" in key else rng.normal(
                    size=spec.shape)).astype(np.float32)  # fmt: skip
        mask = out.get("mask")
        for key in ("old_logps", "ref_logps", "advantages", "returns", "old_values"):
            if key in out:
                out[key] = out[key] * mask
        return out

    return fill(layout)


def main(name: str, overrides: list[str]) -> None:
    cfg = compose([f"objective={name}", "model=tiny", "reward.fn=a:b", *overrides])
    cfg.trainer.batch_size, cfg.data.max_len, cfg.optimizer.warmup_steps = ROWS, LENGTH, 0
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    rules = sharding.DEFAULT_RULES
    with sharding.use_mesh(mesh, rules):
        trainer = build(cfg, mesh, rules)
        local = fixed_batch(trainer.objective, cfg.objective, trainer.model.vocab_size)
        batch = from_local_rows(local, ROWS, 1, mesh, rules)
        value = ValueModel(cfg, (trainer.model, trainer.state.params), mesh, rules) if (
            name == "ppo") else None  # fmt: skip
        state, metrics = trainer.step(trainer.state, batch, trainer.ref_params)
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
        out["params"] = {jax.tree_util.keystr(p): float(np.sum(np.square(x))) for p, x in leaves}
        if value is not None:
            out.update({k: float(v) for k, v in jax.device_get(value.update(batch)).items()})
    print(json.dumps({"objective": name, "devices": jax.device_count(), **out}), flush=True)


if __name__ == "__main__":
    for objective in sys.argv[1].split(","):
        main(objective, json.loads(sys.argv[2]))
