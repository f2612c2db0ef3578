"""Sampling and scoring with the KV cache: batched, jitted, sharded, exactly reproducible.

`generate` left-pads a batch of prompts, prefills them in one pass, then decodes inside
one compiled `lax.while_loop` over a preallocated cache, finishing early once every row
has stopped. Sampling rules (greedy, temperature, top-k, top-p) are traced values, so
changing them never recompiles; shapes are padded to a few buckets (batch sizes and
prompt lengths of powers of two) so a long pipeline compiles a handful of programs.

Every sequence draws its randomness from its own key, `fold_in(fold_in(key(seed),
prompt index), sample index)` (or the caller's per-prompt `seeds`), folded with the step,
so a sample never depends on which other prompts share its batch, on padding or on the
mesh. Log-probs are the model's own (`log_softmax` of the raw logits, before temperature
or filtering), so they equal a forward pass over the generated text.

Stop token ids end a sequence on device; stop strings need text, so with `stop_strings`
the decode loop runs in chunks of `stop_check_every` tokens and the host checks the text
between chunks (the compiled program is the same for every chunk).

`score` sums the log-probs of continuations given prompts; `choose` turns them into
normalised probabilities over a set of options (the AI-feedback labeller's primitive).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcai.losses import sequence_logps
from jaxcai.model import (
    KVCache,
    ModelConfig,
    Params,
    forward,
    forward_with_cache,
    prefill,
    unrolled,
)
from jaxcai.sharding import DEFAULT_RULES, Rules, named_sharding, use_mesh

__all__ = [
    "SAMPLING_RULES",
    "STOP_REASONS",
    "Generation",
    "choose",
    "filter_logits",
    "generate",
    "greedy_generate",
    "keep_end",
    "left_pad",
    "sample_tokens",
    "score",
]

# Weights for sampling: never sharded over `fsdp` (that would all-gather every weight at
# every decode step); the batch still spreads over `data` and `fsdp`, heads over `tensor`.
SAMPLING_RULES: Rules = tuple(r for r in DEFAULT_RULES if r != ("embed", "fsdp"))
STOP_REASONS = ("running", "stop_id", "stop_string", "length")
_RUNNING, _STOP_ID, _STOP_STRING, _LENGTH = range(4)
MIN_PROMPT_BUCKET = 16


# ----- sampling rules (pure) ----------------------------------------------------------


def filter_logits(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with every token outside the top-k, then outside the top-p nucleus, set to
    `-inf`. `top_k = 0` and `top_p >= 1` switch a filter off. The nucleus is the smallest
    set of most likely tokens whose probability reaches `top_p` (the token that crosses
    it is kept); tokens tied with the last kept one are kept too."""
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B1 = jnp.take_along_axis(
        sorted_BV, jnp.broadcast_to(k - 1, sorted_BV.shape[:-1] + (1,)), -1
    )
    sorted_BV = jnp.where(jnp.arange(V) < k, sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (mass_before_BV < top_p) | (top_p >= 1.0)
    n_keep_B1 = jnp.maximum(jnp.sum(keep_BV & (sorted_BV > -jnp.inf), -1, keepdims=True), 1)
    pth_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    threshold_B1 = jnp.maximum(kth_B1, pth_B1)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def sample_tokens(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token per row: argmax when `temperature == 0`, else a draw from the
    temperature-scaled, top-k/top-p-filtered distribution with each row's own key."""
    greedy_B = jnp.argmax(logits_BV, axis=-1)

    def draw(_):
        scaled = logits_BV / jnp.maximum(temperature, 1e-6)
        filtered = jax.lax.cond(
            (top_k > 0) | (top_p < 1.0),
            lambda x: filter_logits(x, top_k, top_p),
            lambda x: x,
            scaled,
        )
        return jax.vmap(jax.random.categorical)(keys_B, filtered)

    sampled_B = jax.lax.cond(temperature > 0, draw, lambda _: greedy_B, None)
    return sampled_B.astype(jnp.int32)


# ----- the compiled prefill and decode ------------------------------------------------


@flax.struct.dataclass
class _State:
    step: jax.Array  # [] tokens generated so far
    last_B: jax.Array  # the newest token of each row
    pos_B: jax.Array  # its position
    reason_B: jax.Array  # 0 while running, else why the row stopped
    tokens_BN: jax.Array
    logps_BN: jax.Array
    keys_B: jax.Array  # [B, 2] uint32 raw keys, one stream per row
    cache: KVCache


@flax.struct.dataclass
class _Rules:
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_ids: jax.Array  # [S] (-1 = unused slot)


def _pick(logits_BV, state_keys_B, step, rules: _Rules):
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(state_keys_B)
    token_B = sample_tokens(logits_BV, keys, rules.temperature, rules.top_k, rules.top_p)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, -1), token_B[:, None], -1)[:, 0]
    return token_B, logp_B


def _record(state: _State, token_B, logp_B, rules: _Rules) -> _State:
    running_B = state.reason_B == _RUNNING
    stopped_B = running_B & jnp.isin(token_B, rules.stop_ids)
    step = state.step + 1
    full_B = running_B & ~stopped_B & (step >= state.tokens_BN.shape[1])
    reason_B = jnp.where(stopped_B, _STOP_ID, jnp.where(full_B, _LENGTH, state.reason_B))
    return state.replace(
        step=step,
        last_B=token_B,
        pos_B=state.pos_B + 1,
        reason_B=reason_B,
        tokens_BN=state.tokens_BN.at[:, state.step].set(token_B),
        logps_BN=state.logps_BN.at[:, state.step].set(logp_B),
    )


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _prefill(
    config: ModelConfig,
    params: Params,
    tokens_BP: jax.Array,
    segments_BP: jax.Array,
    keys_B: jax.Array,
    live_B: jax.Array,
    rules: _Rules,
    max_new_tokens: int,
) -> _State:
    """Run the prompts, pick each row's first token. Rows with `live_B` false (batch
    filler) start stopped, so they never keep the decode loop going."""
    B, P = tokens_BP.shape
    positions_BP = jnp.maximum(jnp.cumsum(segments_BP, axis=1) - 1, 0)
    logits, cache = prefill(
        config,
        params,
        tokens_BP,
        P + max_new_tokens,
        segment_ids_BT=segments_BP,
        positions_BT=positions_BP,
    )
    state = _State(
        step=jnp.zeros((), jnp.int32),
        last_B=jnp.zeros((B,), jnp.int32),
        pos_B=positions_BP[:, -1],
        reason_B=jnp.where(live_B, _RUNNING, _LENGTH).astype(jnp.int32),
        tokens_BN=jnp.zeros((B, max_new_tokens), jnp.int32),
        logps_BN=jnp.zeros((B, max_new_tokens), jnp.float32),
        keys_B=keys_B,
        cache=cache,
    )
    token_B, logp_B = _pick(logits[:, -1], keys_B, 0, rules)
    return _record(state, token_B, logp_B, rules)


@partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def _decode(
    config: ModelConfig, params: Params, state: _State, until: jax.Array, rules: _Rules
) -> _State:
    """Decode until every row stopped or `until` tokens are out."""

    def keep_going(s: _State):
        return (s.step < until) & jnp.any(s.reason_B == _RUNNING)

    def one(s: _State) -> _State:
        logits, cache = forward_with_cache(
            config, params, s.last_B[:, None], s.cache, positions_BT=s.pos_B[:, None]
        )
        token_B, logp_B = _pick(logits[:, -1], s.keys_B, s.step, rules)
        return _record(s.replace(cache=cache), token_B, logp_B, rules)

    return jax.lax.while_loop(keep_going, one, state)


# ----- host side ----------------------------------------------------------------------


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


def keep_end(ids: Sequence[int], limit: int) -> list[int]:
    """A prompt cut to at most `limit` ids by dropping from the start after its first id
    (the bos), so the most recent context is kept."""
    if limit < 2:
        raise ValueError(f"a prompt limit of {limit} leaves no room for the context")
    ids = list(ids)
    return ids if len(ids) <= limit else [ids[0], *ids[len(ids) - limit + 1 :]]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists to one length: (tokens [B, P], segment ids [B, P], 0 = padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        segments[i, width - len(p) :] = 1
    return tokens, segments


def _bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _padded_batch(n: int, shards: int) -> int:
    """Rows to run `n` sequences in: a power of two, divisible by the batch shards."""
    return -(-max(_bucket(n), shards) // shards) * shards


def _mesh_context(mesh, rules: Rules):
    return use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()


def _batch_shards(mesh, rules: Rules) -> int:
    if mesh is None:
        return 1
    spec = named_sharding(("batch",), mesh, rules).spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _place(x: np.ndarray, logical: tuple[str | None, ...], mesh, rules: Rules):
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, named_sharding(logical, mesh, rules, x.shape))


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


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
    after `max_new_tokens`. Prompts are sorted by length and run `batch_size` at a time,
    padded to power-of-two shapes. With `mesh`, rows are sharded over its batch axes
    (params should already be placed, e.g. with `SAMPLING_RULES`).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1 and num_samples >= 1):
        raise ValueError(
            f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1, num_samples >= 1; got "
            f"{temperature}, {top_k}, {top_p}, {num_samples}"
        )
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to read the text")
    if batch_size < 1 or stop_check_every < 1:
        raise ValueError(
            f"batch_size={batch_size} and stop_check_every={stop_check_every} must be >= 1"
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
    config, params = unrolled(config, params, mesh, rules)  # no per-step weight slicing
    base = jax.random.key(seed)
    items = []  # (prompt index, sample index, raw key)
    for i in range(len(prompts)):
        key = jax.random.key(seeds[i]) if seeds is not None else jax.random.fold_in(base, i)
        for j in range(num_samples):
            items.append((i, j, np.asarray(jax.random.key_data(jax.random.fold_in(key, j)))))
    order = sorted(range(len(items)), key=lambda n: -len(prompts[items[n][0]]))
    rules_arr = _Rules(
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
        stop_ids=jnp.asarray(list(stop_ids) or [-1], jnp.int32),
    )
    shards = _batch_shards(mesh, rules)
    tokens_out: list[list[int]] = [[] for _ in items]
    logps_out: list[list[float]] = [[] for _ in items]
    reasons_out = [""] * len(items)
    texts_out: list[str] | None = [""] * len(items) if tokenizer is not None else None
    batches = list(_batches(order, batch_size))
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        rows = [list(prompts[items[n][0]]) for n in batch]
        B = _padded_batch(len(rows), shards)
        P = min(
            _bucket(max(map(len, rows)), MIN_PROMPT_BUCKET), config.max_seq_len - max_new_tokens
        )
        rows += [[pad_id]] * (B - len(rows))  # filler rows: one token, outputs dropped
        tokens, segments = left_pad(rows, pad_id)
        tokens = np.pad(tokens, ((0, 0), (P - tokens.shape[1], 0)), constant_values=pad_id)
        segments = np.pad(segments, ((0, 0), (P - segments.shape[1], 0)))
        keys = np.stack([items[n][2] for n in batch] + [items[batch[0]][2]] * (B - len(batch)))
        with _mesh_context(mesh, rules):
            state = _prefill(
                config,
                params,
                _place(tokens, ("batch", "length"), mesh, rules),
                _place(segments, ("batch", "length"), mesh, rules),
                _place(keys, ("batch", None), mesh, rules),
                _place(np.arange(B) < len(batch), ("batch",), mesh, rules),
                rules_arr,
                max_new_tokens,
            )
            cuts: dict[int, tuple[int, str]] = {}
            while True:
                step = int(state.step)
                until = (
                    max_new_tokens
                    if not stop_strings
                    else min(max_new_tokens, step + stop_check_every)
                )
                state = _decode(config, params, state, jnp.int32(until), rules_arr)
                if not stop_strings:
                    break
                reason = np.array(state.reason_B)  # a writable copy
                new = np.asarray(state.tokens_BN)
                step = int(state.step)
                for r in range(len(batch)):
                    if r in cuts:
                        continue
                    ids = new[r, :step].tolist()
                    if reason[r] == _STOP_ID:
                        ids = ids[: _first_stop(ids, stop_ids)]
                    found = _cut_at_stop_string(tokenizer, ids, stop_strings)
                    if found is not None:
                        cuts[r] = found
                        reason[r] = _STOP_STRING
                state = state.replace(reason_B=jnp.asarray(reason, jnp.int32))
                if step >= max_new_tokens or np.all(reason[: len(batch)] != _RUNNING):
                    break
        new = np.asarray(state.tokens_BN)
        logps = np.asarray(state.logps_BN)
        reason = np.asarray(state.reason_B)
        step = int(state.step)
        for r, n in enumerate(batch):
            ids = new[r, :step].tolist()
            lp = logps[r, :step].tolist()
            why = int(reason[r])
            if why == _STOP_STRING:
                keep = cuts[r][0]
            elif why == _STOP_ID:
                keep = _first_stop(ids, stop_ids)
            else:
                why = _LENGTH if why == _RUNNING else why
                keep = len(ids)
            tokens_out[n], logps_out[n], reasons_out[n] = ids[:keep], lp[:keep], STOP_REASONS[why]
            if texts_out is not None:
                texts_out[n] = cuts[r][1] if why == _STOP_STRING else tokenizer.decode(ids[:keep])
    return Generation(tokens_out, logps_out, reasons_out, texts_out, num_samples)


def _first_stop(ids: list[int], stop_ids: Sequence[int]) -> int:
    stops = set(stop_ids)
    return next((k for k, t in enumerate(ids) if t in stops), len(ids))


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


# ----- scoring ------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("config",))
def _score(config: ModelConfig, params: Params, tokens, targets, mask, segments) -> jax.Array:
    logits = forward(config, params, tokens, segment_ids_BT=segments)
    return sequence_logps(logits, targets, mask)[0]


def score(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = SAMPLING_RULES,
    progress: bool = False,
) -> np.ndarray:
    """Summed log-prob of each continuation given its prompt (float32 `[N]`)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        if not p or not c:
            raise ValueError(f"pair {i}: the prompt and the continuation need a token each")
        if len(p) + len(c) - 1 > config.max_seq_len:
            raise ValueError(f"pair {i}: {len(p) + len(c)} tokens exceed max_seq_len")
    out = np.zeros(len(prompts), np.float32)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(continuations[i])))
    shards = _batch_shards(mesh, rules)
    batches = list(_batches(order, batch_size))
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
        B = _padded_batch(len(batch), shards)
        longest = max(len(prompts[i]) + len(continuations[i]) - 1 for i in batch)
        T = min(_bucket(longest, MIN_PROMPT_BUCKET), max(config.max_seq_len, longest))
        arrays = {k: np.zeros((B, T), np.int32) for k in ("tokens", "targets", "mask", "segments")}
        arrays["tokens"][:] = pad_id
        for r, i in enumerate(batch):
            ids = list(prompts[i]) + list(continuations[i])
            n = len(ids) - 1
            arrays["tokens"][r, :n] = ids[:-1]
            arrays["targets"][r, :n] = ids[1:]
            arrays["mask"][r, len(prompts[i]) - 1 : n] = 1
            arrays["segments"][r, :n] = 1
        arrays["segments"][len(batch) :, 0] = 1  # filler rows hold one (unscored) token
        with _mesh_context(mesh, rules):
            placed = {k: _place(v, ("batch", "length"), mesh, rules) for k, v in arrays.items()}
            logps = np.asarray(
                _score(
                    config,
                    params,
                    placed["tokens"],
                    placed["targets"],
                    placed["mask"],
                    placed["segments"],
                )
            )
        out[batch] = logps[: len(batch)]
    return out


def choose(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    **kwargs,
) -> np.ndarray:
    """Normalised probabilities of `options` (e.g. the ids of " (A)" and " (B)") as the
    continuation of each prompt: `[len(options)]` for one prompt, else `[N, len(options)]`.
    Keyword arguments go to `score`."""
    single = len(prompts) > 0 and isinstance(prompts[0], int | np.integer)
    batch = [list(prompts)] if single else [list(p) for p in prompts]
    if len(options) < 2:
        raise ValueError("choose needs at least two options")
    flat_p = [p for p in batch for _ in options]
    flat_c = [list(o) for _ in batch for o in options]
    logps = score(config, params, flat_p, flat_c, **kwargs).reshape(len(batch), len(options))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logps, jnp.float32), axis=-1))
    return probs[0] if single else probs
