"""`generate`: batched, jitted, sharded sampling with the KV cache, exactly reproducible.

Prompts are sorted by length and run `batch_size` at a time, left-padded to power-of-two
shapes; each batch is prefilled in one pass and decoded by `device.decode_steps`. Every
sequence draws from its own key (`fold_in(fold_in(key(seed), prompt index), sample
index)`, or the caller's per-prompt `seeds`), folded with the step, so a sample never
depends on its batch, on padding or on the mesh. Stop ids end a row on device; stop
strings need text, so with `stop_strings` the loop decodes `stop_check_every` tokens at a
time and the host reads the text between chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcai.distributed import to_global, to_host
from jaxcai.model import ModelConfig, Params, unrolled
from jaxcai.sample.batching import (
    MIN_PROMPT_BUCKET,
    SAMPLING_RULES,
    batch_shards,
    batches,
    bucket,
    left_pad,
    mesh_context,
    padded_batch,
    place,
    scalar,
)
from jaxcai.sample.device import (
    LENGTH,
    RUNNING,
    STOP_ID,
    STOP_REASONS,
    STOP_STRING,
    DecodeRules,
    DecodeState,
    decode_steps,
    prefill_step,
)
from jaxcai.sharding import Rules

__all__ = ["Generation", "generate", "greedy_generate"]


@dataclasses.dataclass(frozen=True)
class Generation:
    """New tokens per sequence (stop token or stop string excluded), their log-probs,
    why each stopped (`stop_id`, `stop_string`, `length`) and, given a tokenizer, the
    text. With `num_samples = n`, sequence `i * n + j` is sample `j` of prompt `i`."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stop_reasons: list[str]
    texts: list[str] | None = None
    num_samples: int = 1

    def samples(self, prompt_index: int) -> range:
        """Indices of one prompt's samples."""
        n = self.num_samples
        return range(prompt_index * n, (prompt_index + 1) * n)


@dataclasses.dataclass(frozen=True)
class _Stops:
    """Where sequences end: stop ids on device, stop strings read on the host."""

    ids: Sequence[int]
    strings: Sequence[str]
    tokenizer: Any
    check_every: int


def _cut_at_stop_string(tok, ids: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """(tokens to keep, text) when the decoded ids contain a stop string, else None: the
    text is cut before the earliest stop string, the tokens to those whose text it holds."""
    text = tok.decode(ids)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return None
    kept = text[: min(hits)]
    keep = 0
    while keep < len(ids) and kept.startswith(tok.decode(ids[: keep + 1])):
        keep += 1
    return keep, kept


def _first_stop(ids: list[int], stop_ids: Sequence[int]) -> int:
    stops = set(stop_ids)
    return next((k for k, t in enumerate(ids) if t in stops), len(ids))


def _check_args(
    config,
    prompts,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    num_samples,
    seeds,
    stops: _Stops,
    batch_size: int,
) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1 and num_samples >= 1):
        raise ValueError(
            f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1, num_samples >= 1; got "
            f"{temperature}, {top_k}, {top_p}, {num_samples}"
        )
    if stops.strings and stops.tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to read the text")
    if batch_size < 1 or stops.check_every < 1:
        raise ValueError(
            f"batch_size={batch_size} and stop_check_every={stops.check_every} must be >= 1"
        )
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > config.max_seq_len:
            raise ValueError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceed the "
                f"model's max_seq_len={config.max_seq_len}"
            )


def _sequence_keys(
    n_prompts: int, seed: int, seeds: Sequence[int] | None, num_samples: int
) -> list[tuple[int, int, np.ndarray]]:
    """(prompt index, sample index, raw key) of every sequence to sample."""
    base = jax.random.key(seed)
    items = []
    for i in range(n_prompts):
        key = jax.random.key(seeds[i]) if seeds is not None else jax.random.fold_in(base, i)
        for j in range(num_samples):
            items.append((i, j, np.asarray(jax.random.key_data(jax.random.fold_in(key, j)))))
    return items


def _apply_stop_strings(
    state: DecodeState, n_live: int, cuts: dict[int, tuple[int, str]], stops: _Stops
) -> tuple[DecodeState, np.ndarray]:
    """Mark rows whose text now holds a stop string (their cut kept in `cuts`). On a
    mesh that spans processes every process reads the same rows, so all decide alike."""
    reason = np.array(to_host(state.reason_B))  # a writable copy
    new = to_host(state.tokens_BN)
    step = int(to_host(state.step))
    for r in range(n_live):
        if r in cuts:
            continue
        ids = new[r, :step].tolist()
        if reason[r] == STOP_ID:
            ids = ids[: _first_stop(ids, stops.ids)]
        found = _cut_at_stop_string(stops.tokenizer, ids, stops.strings)
        if found is not None:
            cuts[r] = found
            reason[r] = STOP_STRING
    if not state.reason_B.is_fully_addressable:
        reason_B = to_global(reason.astype(np.int32), state.reason_B.sharding)
    else:
        reason_B = jnp.asarray(reason, jnp.int32)
    return state.replace(reason_B=reason_B), reason


def _decode_batch(
    config,
    params,
    state: DecodeState,
    n_live: int,
    rules_arr: DecodeRules,
    max_new_tokens: int,
    stops: _Stops,
    mesh,
) -> tuple[DecodeState, dict[int, tuple[int, str]]]:
    """Decode a prefilled batch to its end; returns the state and the stop-string cuts."""
    cuts: dict[int, tuple[int, str]] = {}
    while True:
        step = int(to_host(state.step))
        until = (
            max_new_tokens if not stops.strings else min(max_new_tokens, step + stops.check_every)
        )
        state = decode_steps(config, params, state, scalar(until, jnp.int32, mesh), rules_arr)
        if not stops.strings:
            break
        state, reason = _apply_stop_strings(state, n_live, cuts, stops)
        step = int(to_host(state.step))
        if step >= max_new_tokens or np.all(reason[:n_live] != RUNNING):
            break
    return state, cuts


def _run_batch(
    config,
    params,
    rows: list[list[int]],
    keys: list[np.ndarray],
    rules_arr: DecodeRules,
    max_new_tokens: int,
    stops: _Stops,
    pad_id: int,
    shards: int,
    mesh,
    rules: Rules,
) -> tuple[DecodeState, dict[int, tuple[int, str]]]:
    """Pad one batch of prompts to its bucket, prefill it and decode it."""
    n_live = len(rows)
    B = padded_batch(n_live, shards)
    P = min(bucket(max(map(len, rows)), MIN_PROMPT_BUCKET), config.max_seq_len - max_new_tokens)
    rows = rows + [[pad_id]] * (B - n_live)  # filler rows: one token, outputs dropped
    tokens, segments = left_pad(rows, pad_id)
    tokens = np.pad(tokens, ((0, 0), (P - tokens.shape[1], 0)), constant_values=pad_id)
    segments = np.pad(segments, ((0, 0), (P - segments.shape[1], 0)))
    keys_arr = np.stack(keys + [keys[0]] * (B - n_live))
    with mesh_context(mesh, rules):
        state = prefill_step(
            config,
            params,
            place(tokens, ("batch", "length"), mesh, rules),
            place(segments, ("batch", "length"), mesh, rules),
            place(keys_arr, ("batch", None), mesh, rules),
            place(np.arange(B) < n_live, ("batch",), mesh, rules),
            rules_arr,
            max_new_tokens,
        )
        return _decode_batch(config, params, state, n_live, rules_arr, max_new_tokens, stops, mesh)


def _collect(state: DecodeState, cuts, batch: list[int], stops: _Stops, out: dict) -> None:
    """Each live row's kept tokens, log-probs, stop reason and text, into `out`."""
    new, logps, reason = to_host(state.tokens_BN), to_host(state.logps_BN), to_host(state.reason_B)
    step = int(to_host(state.step))
    for r, n in enumerate(batch):
        ids = new[r, :step].tolist()
        lp = logps[r, :step].tolist()
        why = int(reason[r])
        if why == STOP_STRING:
            keep = cuts[r][0]
        elif why == STOP_ID:
            keep = _first_stop(ids, stops.ids)
        else:
            why = LENGTH if why == RUNNING else why
            keep = len(ids)
        out["tokens"][n], out["logps"][n] = ids[:keep], lp[:keep]
        out["reasons"][n] = STOP_REASONS[why]
        if out["texts"] is not None:
            text = cuts[r][1] if why == STOP_STRING else stops.tokenizer.decode(ids[:keep])
            out["texts"][n] = text


def _vocab(config: ModelConfig, tokenizer: Any) -> int:
    """How many ids may be sampled: the tokenizer's (when smaller than the model's
    embedding table, the extra rows have no text), else all of the model's."""
    size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    return min(int(size), config.vocab_size) if size else config.vocab_size


def generate(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    num_samples: int = 1,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    pad_id: int = 0,
    batch_size: int = 32,
    stop_check_every: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = SAMPLING_RULES,
    progress: bool = False,
) -> Generation:
    """Sample `num_samples` continuations of each id-list prompt.

    `temperature=0` is greedy; `top_k`/`top_p` filter the temperature-scaled
    distribution (combinable). A sequence stops at any of `stop_ids` (excluded from its
    tokens), at any of `stop_strings` (needs `tokenizer`; the text is cut before it), or
    after `max_new_tokens`; with a `tokenizer`, only ids it can decode are sampled.
    Prompts run `batch_size` at a time, longest first, padded to power-of-two shapes;
    with `mesh`, rows are sharded over its batch axes (params placed, `SAMPLING_RULES`)."""
    stops = _Stops(stop_ids, stop_strings, tokenizer, stop_check_every)
    _check_args(
        config,
        prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        num_samples,
        seeds,
        stops,
        batch_size,
    )
    config, params = unrolled(config, params, mesh, rules)  # no per-step weight slicing
    items = _sequence_keys(len(prompts), seed, seeds, num_samples)
    order = sorted(range(len(items)), key=lambda n: -len(prompts[items[n][0]]))
    rules_arr = DecodeRules(
        temperature=scalar(temperature, jnp.float32, mesh),
        top_k=scalar(top_k, jnp.int32, mesh),
        top_p=scalar(top_p, jnp.float32, mesh),
        stop_ids=scalar(list(stop_ids) or [-1], jnp.int32, mesh),
        vocab=scalar(_vocab(config, tokenizer), jnp.int32, mesh),
    )
    shards = batch_shards(mesh, rules)
    out: dict[str, Any] = {
        "tokens": [[] for _ in items],
        "logps": [[] for _ in items],
        "reasons": [""] * len(items),
        "texts": [""] * len(items) if tokenizer is not None else None,
    }
    for batch in tqdm(
        list(batches(order, batch_size)), desc="generate", unit="batch", disable=not progress
    ):
        rows = [list(prompts[items[n][0]]) for n in batch]
        keys = [items[n][2] for n in batch]
        state, cuts = _run_batch(
            config,
            params,
            rows,
            keys,
            rules_arr,
            max_new_tokens,
            stops,
            pad_id,
            shards,
            mesh,
            rules,
        )
        _collect(state, cuts, batch, stops, out)
    return Generation(out["tokens"], out["logps"], out["reasons"], out["texts"], num_samples)


def greedy_generate(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int = 0,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of id-list prompts; each stops before its first `eos_id`."""
    stop = () if eos_id is None else (eos_id,)
    return generate(
        config, params, prompts, max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=pad_id
    ).tokens
