"""Continuous batching on the host: B slots decode together, and a finished sequence's
slot takes the next waiting prompt inside the decode loop, so no slot decodes padding for
a sequence that already ended while prompts wait.

The device loop (`slots.decode_slots`) returns to the host when `refill` slots are free
(or every `stop_check_every` steps with stop strings, or when the longest running row
outgrows its cache window); the host keeps the finished sequences, prefills waiting
prompts into the free slots (`slots.fill_slots`, several prompts in one pass) and resumes.

Nothing a sequence computes depends on its slot or its neighbours: its keys are its own,
its cache row holds only its own prompt (positions from 0), and stop strings are read at
the same steps as the static sampler reads them (every `stop_check_every` tokens after
the first, and at its end), whenever the host happens to look, so outputs equal the
static sampler's for the same seeds.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcai.distributed import to_global, to_host
from jaxcai.model import ModelConfig, Params
from jaxcai.sample.batching import (
    MIN_PROMPT_BUCKET,
    bucket,
    mesh_context,
    padded_batch,
    place,
    scalar,
)
from jaxcai.sample.device import RUNNING, STOP_ID, STOP_STRING, DecodeRules
from jaxcai.sample.slots import SlotState, decode_slots, empty_slots, fill_slots
from jaxcai.sample.stops import Stops, cut_at_stop_string, first_stop, keep_row
from jaxcai.sharding import Rules

__all__ = ["MIN_WINDOW", "generate_continuous", "window_bucket"]

MIN_WINDOW = 64  # the smallest cache window a decode step reads
WINDOW_STEPS = 4  # windows per doubling: 64, 80, 96, 112, 128, 160, ...


def window_bucket(n: int, cache_len: int) -> int:
    """The cache window for rows filled to `n` slots: the smallest of MIN_WINDOW * 2^k *
    (1 + j / WINDOW_STEPS) that holds them, at most the whole cache (few programs, and a
    decode step reads at most a quarter-octave more than it needs)."""
    w = MIN_WINDOW
    while w < n:
        w += max(1, bucket(w + 1) // 2 // WINDOW_STEPS)
    return min(w, cache_len)


class _Slots:
    """The host's view of the slots: which sequence each holds, and stop-string checks."""

    def __init__(self, batch: int, stops: Stops):
        self.item: list[int | None] = [None] * batch  # the sequence in each slot
        self.checked = [0] * batch  # the last step whose text was read
        self.cut: list[tuple[int, str] | None] = [None] * batch
        self.stops = stops

    def check(self, r: int, ids: list[int], steps: int, why: int) -> bool:
        """Read row r's text at the static sampler's check steps up to `steps` (1 + k *
        every, and its end if it stopped); True when a stop string ends it."""
        every, end = self.stops.check_every, None if why == RUNNING else steps
        if why == STOP_ID:
            ids = ids[: first_stop(ids, self.stops.ids)]
        start = max(self.checked[r] + 1, 2)
        points = [c for c in range(start, steps + 1) if (c - 1) % every == 0]
        points = [c for c in points if end is None or c < end] + ([end] if end else [])
        for c in points:
            found = cut_at_stop_string(self.stops.tokenizer, ids[:c], self.stops.strings)
            if found is not None:
                self.cut[r] = found
                return True
        self.checked[r] = steps
        return False


def _fill(config, params, state, slots: _Slots, free, waiting, seqs, env) -> SlotState:
    """Prefill as many waiting sequences as there are free slots, in one pass."""
    (prompts, keys, budgets), (rules_arr, pad_id, cap, mesh, rules) = seqs, env
    take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
    R = bucket(len(take))
    P = min(bucket(max(len(prompts[n]) for n in take), MIN_PROMPT_BUCKET), cap)
    tokens = np.full((R, P), pad_id, np.int32)
    lengths, rows = np.ones(R, np.int32), np.full(R, len(slots.item), np.int32)  # filler
    for i, n in enumerate(take):
        tokens[i, : len(prompts[n])], lengths[i], rows[i] = prompts[n], len(prompts[n]), free[i]
        slots.item[free[i]], slots.checked[free[i]], slots.cut[free[i]] = n, 0, None
    keys_R = np.stack([keys[n] for n in take] + [keys[take[0]]] * (R - len(take)))
    budget_R = np.array([budgets[n] for n in take] + [1] * (R - len(take)), np.int32)
    put = lambda x, *names: place(x, names, mesh, rules)  # noqa: E731  (replicated)
    return fill_slots(
        config, params, state, put(tokens, None, None), put(lengths, None), put(rows, None),
        put(keys_R, None, None), put(budget_R, None), rules_arr,
    )  # fmt: skip


def _read_stop_strings(state: SlotState, slots: _Slots, new, steps, reason) -> SlotState:
    """Mark rows whose text now holds a stop string (running or just stopped)."""
    hits = [
        r
        for r, n in enumerate(slots.item)
        if n is not None
        and slots.cut[r] is None
        and slots.check(r, new[r, : steps[r]].tolist(), int(steps[r]), int(reason[r]))
    ]
    if not hits:
        return state
    reason = np.array(reason)  # a writable copy
    reason[hits] = STOP_STRING
    if not state.reason_B.is_fully_addressable:
        return state.replace(reason_B=to_global(reason.astype(np.int32), state.reason_B.sharding))
    return state.replace(reason_B=jnp.asarray(reason, jnp.int32))


def _keep_finished(state: SlotState, slots: _Slots, out: dict, progress) -> SlotState:
    """Read stop strings, then move every finished sequence out of its slot into `out`."""
    reason, steps = to_host(state.reason_B), to_host(state.steps_B)
    if not slots.stops.strings and all(
        n is None or reason[r] == RUNNING for r, n in enumerate(slots.item)
    ):
        return state
    new, logps = to_host(state.tokens_BN), to_host(state.logps_BN)
    if slots.stops.strings:
        state = _read_stop_strings(state, slots, new, steps, reason)
        reason = to_host(state.reason_B)
    for r, n in enumerate(slots.item):
        if n is not None and reason[r] != RUNNING:
            s = int(steps[r])
            ids, lp = new[r, :s].tolist(), logps[r, :s].tolist()
            keep_row(ids, lp, int(reason[r]), slots.cut[r], slots.stops, out, n)
            slots.item[r] = None
            if progress is not None:
                progress.update(1)
    return state


def generate_continuous(
    config: ModelConfig,
    params: Params,
    seqs: tuple[list[list[int]], list[np.ndarray], list[int]],
    order: list[int],
    rules_arr: DecodeRules,
    stops: Stops,
    *,
    pad_id: int,
    batch_size: int,
    shards: int,
    mesh: Any,
    rules: Rules,
    out: dict,
    refill: int | None = None,
    progress: Any = None,
) -> None:
    """Generate every sequence n (`seqs` = prompts, raw keys, budgets, indexed by n) into
    `out`, taking them in `order`, on `batch_size` slots (padded to a power of two the
    mesh's batch axes divide); the loop returns for refills when `refill` slots are free
    (default B / 8)."""
    prompts, keys, budgets = seqs
    N = max(budgets)
    B = padded_batch(min(batch_size, len(order)), shards)
    cap = config.max_seq_len - N
    cache_len = min(bucket(max(len(prompts[n]) for n in order), MIN_PROMPT_BUCKET), cap) + N
    refill = max(1, B // 8) if refill is None else refill
    env = (rules_arr, pad_id, cap, mesh, rules)
    waiting, slots = deque(order), _Slots(B, stops)
    with mesh_context(mesh, rules):
        state = empty_slots(config, B, N, cache_len)
        while True:
            state = _keep_finished(state, slots, out, progress)
            free = [r for r, n in enumerate(slots.item) if n is None]
            if waiting and free:
                state = _fill(config, params, state, slots, free, waiting, seqs, env)
                continue  # a sequence may stop at its first token
            if len(free) == B:
                return
            index = to_host(state.cache.index)
            longest = max(int(index[r]) for r, n in enumerate(slots.item) if n is not None)
            refill_at = min(refill, len(waiting)) if waiting else B + 1
            state = decode_slots(
                config,
                params,
                state,
                rules_arr,
                scalar(refill_at, jnp.int32, mesh),
                scalar(stops.check_every if stops.strings else N, jnp.int32, mesh),
                window_bucket(longest, cache_len),
            )
