"""A frozen reference policy's sequence log-probs, computed once before training.

For an objective with a reference (`Objective.reference`, DPO) and
`objective.reference=precompute`, every train and eval pair's chosen and rejected
log-probs under the initial params are computed in one pass and cached in the run
directory (`reference_logps.npz`, keyed by each split's fingerprint), so a resumed run
uses exactly the same reference and the train step runs one model, not two.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxcai.data.batches import eval_index_batches, global_batch
from jaxcai.data.training import TrainData
from jaxcai.objectives import reference_logps

__all__ = ["KEYS", "precompute_reference"]

KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _compute(trainer, fn, params, rows, batch_size: int, desc: str, progress: bool) -> dict:
    """`fn` (the jitted reference log-probs) over every row of a split, in order."""
    parts = []
    for idx in tqdm(
        list(eval_index_batches(len(rows), batch_size)),
        desc=desc,
        disable=not progress or jax.process_index() != 0,
    ):
        b = global_batch(rows, idx, 1, trainer.mesh, trainer.rules)
        logps = fn(params, jax.tree_util.tree_map(lambda x: x[0], b))
        parts.append({k: np.asarray(v)[idx >= 0] for k, v in logps.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def precompute_reference(
    trainer, data: TrainData, run_dir: Path, batch_size: int, progress: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """`{"train": {key: [n]}, "eval": {...}}` reference log-probs of every pair of each
    split, by position, from the trainer's initial params (cached in `run_dir`)."""
    cache = Path(run_dir) / "reference_logps.npz"
    stored = dict(np.load(cache)) if cache.exists() else {}
    params = trainer.state.params
    fn = jax.jit(  # one compile serves both splits
        lambda p, b: reference_logps(trainer.model, p, b),
        out_shardings=NamedSharding(trainer.mesh, PartitionSpec()),
    )
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "eval"):
        rows = data.rows(split)
        fingerprint = getattr(data, split).fingerprint  # the same records, in the same order
        fresh = str(stored.get(f"{split}/fingerprint", "")) == fingerprint and all(
            f"{split}/{k}" in stored and len(stored[f"{split}/{k}"]) == len(rows) for k in KEYS
        )
        if not fresh:
            desc = f"reference log-probs ({split})"
            logps = _compute(trainer, fn, params, rows, batch_size, desc, progress)
            stored.update({f"{split}/{k}": v for k, v in logps.items()})
            stored[f"{split}/fingerprint"] = np.asarray(fingerprint)
        out[split] = {k: stored[f"{split}/{k}"].astype(np.float32) for k in KEYS}
    if jax.process_index() == 0:
        np.savez(cache, **stored)
    return out
