"""A frozen reference policy's sequence log-probs, computed once before training.

For an objective with a reference (`Objective.reference`, DPO) and
`objective.reference=precompute`, every train and eval pair's chosen and rejected
log-probs under the initial params are computed in one pass and cached in the run
directory (`reference_logps.npz`, keyed by each split's fingerprint), so a resumed run
uses exactly the same reference and the train step runs one model, not two. With
`data.pack_pairs` the pass packs each batch's pairs, as training does.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxcai.data.batches import (
    agree_rows,
    data_shard,
    eval_index_batches,
    from_local_rows,
    global_batch,
    local_row_slices,
)
from jaxcai.data.pairs import pack_pairs
from jaxcai.data.pipeline import encode_example, pad_id_of
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


def _compute_packed(
    trainer, fn, params, data: TrainData, split: str, batch_size: int, desc: str, progress: bool
) -> dict:
    """`_compute` with each batch's pairs packed (`jaxcai.data.pairs`): each process packs
    the pairs its devices hold, so the pass computes each prompt once, with little
    padding."""
    source, mesh, rules = getattr(data, split), trainer.mesh, trainer.rules
    index, count = data_shard(batch_size, 1, mesh, rules)
    multiple = local_row_slices(batch_size, 1, mesh, rules)
    pad_id = pad_id_of(data.tok)
    parts = []
    for idx in tqdm(
        list(eval_index_batches(len(source), batch_size)),
        desc=desc,
        disable=not progress or jax.process_index() != 0,
    ):
        mine = idx.reshape(count, -1)[index]
        examples = [
            {**encode_example(source[max(int(i), 0)], data.tok, data.layout),
             "weight": np.float32(i >= 0)}
            for i in mine
        ]  # fmt: skip
        local = pack_pairs(
            examples, lengths=data.layout.pair_row_lengths(), pad_id=pad_id,
            row_multiple=multiple, pair_offset=index * len(mine),
        )  # fmt: skip
        local = agree_rows(local, pad_id, 1)
        b = from_local_rows(local, batch_size, 1, mesh, rules)
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
            if data.layout.packs_pairs:
                logps = _compute_packed(trainer, fn, params, data, split, batch_size, desc,
                                        progress)  # fmt: skip
            else:
                logps = _compute(trainer, fn, params, rows, batch_size, desc, progress)
            stored.update({f"{split}/{k}": v for k, v in logps.items()})
            stored[f"{split}/fingerprint"] = np.asarray(fingerprint)
        out[split] = {k: stored[f"{split}/{k}"].astype(np.float32) for k in KEYS}
    if jax.process_index() == 0:
        np.savez(cache, **stored)
    return out
