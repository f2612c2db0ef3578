"""`generate`: batched, jitted, sharded sampling with the KV cache, exactly reproducible.

By default sequences decode with continuous batching (`jaxcai.sample.continuous`):
`batch_size` slots, each refilled with the next waiting prompt as soon as its sequence
ends, every step reading only a window of the cache. With `continuous=False` (the static
sampler) prompts are sorted by length and run `batch_size` at a time, left-padded to
power-of-two shapes; each batch is prefilled in one pass and decoded by
`device.decode_steps` until its longest sequence ends. Every sequence draws from its own
key (`fold_in(fold_in(key(seed), prompt index), sample index)`, or the caller's
per-prompt `seeds`), folded with its step, so a sample never depends on its batch, its
slot, padding or the mesh: both samplers give the same outputs. Stop ids end a row on
device; stop strings need text, so with `stop_strings` the loop decodes
`stop_check_every` tokens at a time and the host reads the text between chunks.

Continuous batching works on a mesh (slots spread over its batch axes) and on a mesh
that spans processes (every process runs the same host loop on the same values). The
static sampler stays for comparison and for callers that want one batch's rows to end
together; no case needs it.
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
from jaxcai.sample.continuous import generate_continuous
from jaxcai.sample.device import (
    RUNNING,
    STOP_ID,
    STOP_STRING,
    DecodeRules,
    DecodeState,
    decode_steps,
    prefill_step,
)
from jaxcai.sample.stops import Stops, cut_at_stop_string, first_stop, keep_row
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


def _budgets(max_new_tokens: int | Sequence[int], n_prompts: int) -> list[int]:
    """Each prompt's `max_new_tokens` (one int for all, or one per prompt), checked."""
    if isinstance(max_new_tokens, int | np.integer):
        budgets = [int(max_new_tokens)] * n_prompts
    else:
        budgets = [int(n) for n in max_new_tokens]
        if len(budgets) != n_prompts:
            raise ValueError(f"{len(budgets)} max_new_tokens for {n_prompts} prompts")
    if any(n <= 0 for n in budgets):
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    return budgets


def _check_args(
    config, prompts, max_new_tokens: int, rules: tuple, seeds, stops: Stops, batch_size: int
) -> None:
    temperature, top_k, top_p, num_samples = rules
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
    state: DecodeState, n_live: int, cuts: dict[int, tuple[int, str]], stops: Stops
) -> tuple[DecodeState, np.ndarray]:
    """Mark rows whose text now holds a stop string (their cut kept in `cuts`). On a
    mesh that spans processes every process reads the same rows, so all decide alike."""
    reason = np.array(to_host(state.reason_B))  # a writable copy
    new, budget = to_host(state.tokens_BN), to_host(state.budget_B)
    step = int(to_host(state.step))
    for r in range(n_live):
        if r in cuts:
            continue
        ids = new[r, : min(step, budget[r])].tolist()
        if reason[r] == STOP_ID:
            ids = ids[: first_stop(ids, stops.ids)]
        found = cut_at_stop_string(stops.tokenizer, ids, stops.strings)
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
    stops: Stops,
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
    budgets: list[int],
    rules_arr: DecodeRules,
    max_new_tokens: int,
    stops: Stops,
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
            place(np.array(budgets + [1] * (B - n_live), np.int32), ("batch",), mesh, rules),
            rules_arr,
            max_new_tokens,
        )
        return _decode_batch(config, params, state, n_live, rules_arr, max_new_tokens, stops, mesh)


def _collect(state: DecodeState, cuts, batch: list[int], stops: Stops, out: dict) -> None:
    """Each live row's kept tokens, log-probs, stop reason and text, into `out`."""
    new, logps, reason = to_host(state.tokens_BN), to_host(state.logps_BN), to_host(state.reason_B)
    step, budget = int(to_host(state.step)), to_host(state.budget_B)
    for r, n in enumerate(batch):
        ends = min(step, int(budget[r]))
        ids, lp = new[r, :ends].tolist(), logps[r, :ends].tolist()
        keep_row(ids, lp, int(reason[r]), cuts.get(r), stops, out, n)


def _padded(ids: list[int], n: int) -> list[int]:
    return ids + [-1] * (n - len(ids))


def _vocab(config: ModelConfig, tokenizer: Any) -> int:
    """How many ids may be sampled: the tokenizer's (when smaller than the model's
    embedding table, the extra rows have no text), else all of the model's."""
    size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    return min(int(size), config.vocab_size) if size else config.vocab_size


def _generate_static(config, params, seqs, order, rules_arr, stops, *, batch_size, out, **kw):
    """The static sampler: `batch_size` sequences at a time, each batch to its end."""
    prompts, keys, budgets = seqs
    N = max(budgets)
    for batch in tqdm(
        list(batches(order, batch_size)), desc="generate", unit="batch", disable=not kw["progress"]
    ):
        rows, row_keys = [prompts[n] for n in batch], [keys[n] for n in batch]
        state, cuts = _run_batch(
            config, params, rows, row_keys, [budgets[n] for n in batch], rules_arr, N, stops,
            kw["pad_id"], kw["shards"], kw["mesh"], kw["rules"],
        )  # fmt: skip
        _collect(state, cuts, batch, stops, out)


def generate(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
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
    continuous: bool = True,
) -> Generation:
    """Sample `num_samples` continuations of each id-list prompt.

    `temperature=0` is greedy; `top_k`/`top_p` filter the temperature-scaled
    distribution (combinable). A sequence stops at any of `stop_ids` (excluded from its
    tokens), at any of `stop_strings` (needs `tokenizer`; the text is cut before it), or
    after `max_new_tokens` (one for all, or one per prompt); with a `tokenizer`, only ids
    it can decode are sampled. With `continuous`, `batch_size` slots decode together and
    a finished sequence's slot takes the next prompt (`jaxcai.sample.continuous`); else
    prompts run `batch_size` at a time, longest first, padded to power-of-two shapes.
    Outputs are the same either way. With `mesh`, rows are sharded over its batch axes
    (params placed, `SAMPLING_RULES`)."""
    stops = Stops(stop_ids, stop_strings, tokenizer, stop_check_every)
    budgets = _budgets(max_new_tokens, len(prompts))
    sampling = (temperature, top_k, top_p, num_samples)
    _check_args(config, prompts, max(budgets, default=1), sampling, seeds, stops, batch_size)
    config, params = unrolled(config, params, mesh, rules)  # no per-step weight slicing
    items = _sequence_keys(len(prompts), seed, seeds, num_samples)
    seqs = (
        [list(prompts[i]) for i, _, _ in items],
        [key for _, _, key in items],
        [budgets[i] for i, _, _ in items],
    )
    order = sorted(range(len(items)), key=lambda n: -len(seqs[0][n]))
    rules_arr = DecodeRules(
        temperature=scalar(temperature, jnp.float32, mesh),
        top_k=scalar(top_k, jnp.int32, mesh),
        top_p=scalar(top_p, jnp.float32, mesh),
        # padded with -1 to a few sizes, so another set of stop ids compiles nothing new
        stop_ids=scalar(_padded(list(stop_ids), bucket(len(stop_ids), 4)), jnp.int32, mesh),
        vocab=scalar(_vocab(config, tokenizer), jnp.int32, mesh),
    )
    out: dict[str, Any] = {
        "tokens": [[] for _ in items],
        "logps": [[] for _ in items],
        "reasons": [""] * len(items),
        "texts": [""] * len(items) if tokenizer is not None else None,
    }
    kw = dict(pad_id=pad_id, batch_size=batch_size, mesh=mesh, rules=rules, out=out)
    kw["shards"] = batch_shards(mesh, rules)
    if not items:
        pass
    elif continuous:
        with tqdm(total=len(items), desc="generate", unit="seq", disable=not progress) as bar:
            generate_continuous(config, params, seqs, order, rules_arr, stops, progress=bar, **kw)
    else:
        _generate_static(config, params, seqs, order, rules_arr, stops, progress=progress, **kw)
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
