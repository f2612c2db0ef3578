"""`score`: summed log-probs of continuations given prompts; `choose`: those turned into
normalised probabilities over a set of options (the AI-feedback labeller's primitive)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcai.distributed import to_host
from jaxcai.losses import sequence_logps
from jaxcai.model import ModelConfig, Params, forward
from jaxcai.sample.batching import (
    MIN_PROMPT_BUCKET,
    SAMPLING_RULES,
    batch_shards,
    batches,
    bucket,
    mesh_context,
    padded_batch,
    place,
)
from jaxcai.sharding import Rules

__all__ = ["choose", "score"]


@partial(jax.jit, static_argnames=("config",))
def _score(config: ModelConfig, params: Params, tokens, targets, mask, segments) -> jax.Array:
    logits = forward(config, params, tokens, segment_ids_BT=segments)
    return sequence_logps(logits, targets, mask)[0]


def _check_pairs(config, prompts, continuations, batch_size: int) -> None:
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        if not p or not c:
            raise ValueError(f"pair {i}: the prompt and the continuation need a token each")
        if len(p) + len(c) - 1 > config.max_seq_len:
            raise ValueError(f"pair {i}: {len(p) + len(c)} tokens exceed max_seq_len")


def _batch_arrays(config, prompts, continuations, batch: list[int], B: int, pad_id: int):
    """Tokens, targets, mask and segments `[B, T]` of one batch of (prompt, continuation)."""
    longest = max(len(prompts[i]) + len(continuations[i]) - 1 for i in batch)
    T = min(bucket(longest, MIN_PROMPT_BUCKET), max(config.max_seq_len, longest))
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
    return arrays


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
    _check_pairs(config, prompts, continuations, batch_size)
    out = np.zeros(len(prompts), np.float32)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(continuations[i])))
    shards = batch_shards(mesh, rules)
    for batch in tqdm(
        list(batches(order, batch_size)), desc="score", unit="batch", disable=not progress
    ):
        B = padded_batch(len(batch), shards)
        arrays = _batch_arrays(config, prompts, continuations, batch, B, pad_id)
        with mesh_context(mesh, rules):
            placed = {k: place(v, ("batch", "length"), mesh, rules) for k, v in arrays.items()}
            logps = to_host(
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
