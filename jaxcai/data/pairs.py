"""Packed preference batches: several (chosen, rejected) pairs per row, each pair's
prompt computed once.

A pair's two sequences share their prompt. Packed, a pair occupies one stretch of a row:

    [ shared prompt | chosen branch | rejected branch ]

`shared` is the longest common prefix of the two input sequences that is prompt on both
sides (no loss on it); each branch is the rest of its side, starting with the prompt's
last token, whose next-token target is the response's first token. Both branches take
their positions from where the shared part ends, so every token sits at the position it
has unpacked. `branch` marks the parts (0 shared, 1 chosen, 2 rejected) and the model's
mask lets a response token see its pair's shared prompt and its own branch only
(`jaxcai.attention.attention_mask`); segment ids keep pairs apart. So a pair's
per-token log-probs, and hence its sequence log-probs, rewards, losses and gradients,
equal the unpacked computation; the prompt's tokens are computed once instead of twice.

One batch of `groups` micro-batches holds each micro-batch's pairs (the same pairs, in
the same order, as unpacked) in `rows` rows of `length` tokens, both picked from short
lists of bucket sizes so a run compiles a handful of programs:

    packed: tokens, targets, mask, segment_ids, positions, branch, pair   [groups * rows, length]
    p_chosen, weight (and ref_chosen_logps, ref_rejected_logps)          [groups * pairs]

`pair` is each token's pair index within its micro-batch, offset by `pair_offset` (a
process's first pair of the global micro-batch), so losses gather per-pair sums with
`jax.ops.segment_sum`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "PACKED_KEYS",
    "PackPairs",
    "PAIR_KEYS",
    "pack_pairs",
    "packed_length",
    "row_count",
    "shared_prefix",
    "unpad_pairs",
]

SEQ_KEYS = ("tokens", "targets", "mask")  # a sequence's arrays (jaxcai.data.pipeline)
PACKED_KEYS = (*SEQ_KEYS, "segment_ids", "positions", "branch", "pair")
PAIR_KEYS = ("p_chosen", "weight", "ref_chosen_logps", "ref_rejected_logps")


def shared_prefix(chosen: dict[str, np.ndarray], rejected: dict[str, np.ndarray]) -> int:
    """Tokens both sides of a pair share at their start with no loss on either side
    (always leaves each side at least one token of its own)."""
    a, b = chosen["tokens"], rejected["tokens"]
    n = min(len(a), len(b)) - 1
    same = (a[:n] == b[:n]) & (chosen["mask"][:n] == 0) & (rejected["mask"][:n] == 0)
    return int(n if same.all() else np.argmin(same))


def packed_length(example: dict[str, Any]) -> int:
    """Row slots one pair takes packed: both sides, their shared prompt once."""
    c, r = example["chosen"], example["rejected"]
    return len(c["tokens"]) + len(r["tokens"]) - shared_prefix(c, r)


def row_count(n: int, multiple: int = 1) -> int:
    """The smallest row count >= `n` among multiples `k * multiple`, k in 1, 2, 3, 4, 6,
    8, 12, 16, ... (each step at most 1.5x the last, so padding rows stay few and a run
    sees few distinct shapes)."""
    k = -(-max(n, 1) // multiple)
    size = 1
    while size < k:  # 1 -> 2, a power of two p -> 1.5p, 1.5p -> 2p
        size = 2 if size == 1 else size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size * multiple


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of `capacity`, first fit by decreasing length."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


def _write_pair(out: dict[str, np.ndarray], row: int, start: int, seg: int, pair: int, ex):
    """Lay one pair into `out[row]` from slot `start`; returns the next free slot."""
    c, r = ex["chosen"], ex["rejected"]
    shared = shared_prefix(c, r)
    parts = [(c, 0, 0, shared), (c, 1, shared, len(c["tokens"])), (r, 2, shared, len(r["tokens"]))]
    at = start
    for seq, branch, lo, hi in parts:
        n = hi - lo
        for key in SEQ_KEYS:
            out[key][row, at : at + n] = seq[key][lo:hi]
        out["segment_ids"][row, at : at + n] = seg
        out["positions"][row, at : at + n] = np.arange(lo, hi)
        out["branch"][row, at : at + n] = branch
        out["pair"][row, at : at + n] = pair
        at += n
    return at


def pack_pairs(
    examples: Sequence[dict[str, Any]],
    *,
    lengths: Sequence[int],
    pad_id: int,
    groups: int = 1,
    row_multiple: int = 1,
    pair_offset: int = 0,
) -> dict[str, Any]:
    """Encoded pairs (`jaxcai.data.pipeline.encode_example`, in order) -> one packed batch
    of `groups` equal micro-batches (see the module docstring). The row length is the one
    of `lengths` that fits the longest pair in the fewest slots (rows times length;
    considered up to twice the shortest that fits); every micro-batch gets the same
    number of rows (`row_count`), a multiple of `row_multiple`."""
    n = len(examples)
    if n == 0 or n % groups:
        raise ValueError(f"pack_pairs: {n} pairs do not split into {groups} micro-batches")
    sizes = [packed_length(e) for e in examples]
    longest = max(sizes)
    fitting = [b for b in sorted(lengths) if b >= longest]
    if not fitting:
        raise ValueError(f"pack_pairs: a pair of {longest} tokens fits no row length {lengths}")
    per = n // groups
    best = None
    for length in (b for b in fitting if b <= 2 * fitting[0]):  # fewest slots; ties: shorter
        layouts = [_first_fit(sizes[g * per : (g + 1) * per], length) for g in range(groups)]
        rows = row_count(max(len(bins) for bins in layouts), row_multiple)
        if best is None or rows * length < best[0] * best[1]:
            best = (rows, length, layouts)
    rows, length, layouts = best
    out = {k: np.zeros((groups * rows, length), np.int32) for k in PACKED_KEYS}
    out["tokens"][:] = pad_id
    out["targets"][:] = pad_id
    for g, bins in enumerate(layouts):
        for b, members in enumerate(bins):
            at = 0
            for seg, i in enumerate(members, start=1):
                at = _write_pair(out, g * rows + b, at, seg, pair_offset + i, examples[g * per + i])
    batch: dict[str, Any] = {"packed": out}
    batch["p_chosen"] = np.asarray([e.get("p_chosen", 1.0) for e in examples], np.float32)
    batch["weight"] = np.asarray([e.get("weight", 1.0) for e in examples], np.float32)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = np.asarray([e[key] for e in examples], np.float32)
    return batch


class PackPairs:
    """grain batch_fn: encoded pairs -> one packed batch (`pack_pairs` with these
    settings; picklable for grain's worker processes)."""

    def __init__(self, lengths, pad_id: int, groups: int, row_multiple: int, offset: int):
        self.lengths, self.pad_id = tuple(lengths), pad_id
        self.groups, self.row_multiple, self.offset = groups, row_multiple, offset

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pack_pairs(
            examples, lengths=self.lengths, pad_id=self.pad_id, groups=self.groups,
            row_multiple=self.row_multiple, pair_offset=self.offset,
        )  # fmt: skip


def unpad_pairs(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Padded pair rows (`chosen` / `rejected` rows with one segment each, and per-pair
    arrays) -> encoded pairs as `pack_pairs` takes them."""
    out = []
    for i in range(len(rows["weight"])):
        ex: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            k = int((rows[side]["segment_ids"][i] > 0).sum())
            ex[side] = {key: rows[side][key][i, : max(k, 1)] for key in SEQ_KEYS}
        ex.update({key: rows[key][i] for key in PAIR_KEYS if key in rows})
        out.append(ex)
    return out
