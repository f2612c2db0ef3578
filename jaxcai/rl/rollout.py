"""Sampling a rollout from the current policy and laying it out as training rows.

`sample` opens each prompt for the assistant's answer in the policy's chat format, keeps
the end of a prompt that would not leave room for `max_new_tokens` (and the stop token),
and samples through `jaxcai.sample.generate` on the training mesh, with the params the
train step updates (no copy to another engine). `rows` turns the sampled ids into the
rows the train step reads: `tokens` / `targets` shifted by one, `mask` on the response
tokens (and the format's stop id after a response that ended on a stop id or a stop
string, so the policy learns to stop),
`segment_ids` on the real tokens. `device_map` runs a per-row function (log-probs,
values) over such rows on the mesh, a micro-batch at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxcai.chat import ChatFormat, messages_from_transcript
from jaxcai.data.batches import data_shard, from_local_rows
from jaxcai.data.pipeline import pad_sequences, response_sequence
from jaxcai.sample import generate, keep_end
from jaxcai.sample.chat import context_ids
from jaxcai.sample.device import STOP_ID, STOP_STRING

__all__ = ["Samples", "device_map", "rows", "sample"]

ENDED = (STOP_ID, STOP_STRING)  # the stop reasons that end a turn


@dataclasses.dataclass
class Samples:
    """`K` responses to each of `P` prompts: sequence `i * K + j` is sample `j` of
    prompt `i`; `prompt_ids` and `response_ids` are what the rows are built from."""

    prompts: list[str]
    indices: list[int]  # the prompts' global indices in the prompt stream
    samples: int
    prompt_ids: list[list[int]]  # per sequence
    response_ids: list[list[int]]  # per sequence, the stop token included when it stopped
    texts: list[str]  # per sequence, stripped
    new_tokens: int  # tokens generated (stop tokens included)

    def sequence_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.samples)]

    def lengths(self) -> np.ndarray:
        return np.asarray([len(r) for r in self.response_ids], np.float32)


def sample(
    config: Any,
    params: Any,
    fmt: ChatFormat,
    prompts: Sequence[str],
    indices: Sequence[int],
    seeds: Sequence[int],
    rc: Any,
    *,
    max_len: int,
    mesh=None,
) -> Samples:
    """`rc.samples` responses to each prompt (`seeds[i]` seeds prompt `i`'s), with the
    rollout settings `rc` (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `batch_size`)."""
    budget = max_len - rc.max_new_tokens - 1
    if budget < 2:
        raise ValueError(
            f"rollout.max_new_tokens={rc.max_new_tokens} leaves no room for a prompt in "
            f"data.max_len={max_len}"
        )
    ids = [keep_end(context_ids(fmt, messages_from_transcript(p)), budget) for p in prompts]
    out = generate(
        config, params, ids, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
        top_k=rc.top_k, top_p=rc.top_p, seeds=list(seeds), num_samples=rc.samples,
        stop_ids=fmt.stop_ids, stop_strings=fmt.stop_strings, tokenizer=fmt.tokenizer,
        pad_id=fmt.tokenizer.pad_id, batch_size=rc.batch_size, mesh=mesh,
    )  # fmt: skip
    stop = fmt.stop_ids[0] if fmt.stop_ids else None
    responses = []
    for tokens, reason in zip(out.tokens, out.stop_reasons, strict=True):
        # A turn that ended (on a stop id, or on a stop string such as a new Human turn,
        # which is cut off) ends with the format's stop id, so the policy learns to stop.
        ended = reason in ENDED and stop is not None
        responses.append(list(tokens) + ([stop] if ended else []))
    k = rc.samples
    return Samples(
        prompts=list(prompts),
        indices=list(indices),
        samples=k,
        prompt_ids=[ids[n // k] for n in range(len(responses))],
        response_ids=responses,
        texts=[t.strip() for t in out.texts],
        new_tokens=sum(len(r) for r in responses),
    )


def rows(samples: Samples, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`[N, max_len]` training rows of the sampled sequences (`N = P * K`), laid out as
    the data pipeline lays out a response (`pad_sequences`); `sample` keeps each prompt
    short enough that prompt, response and stop id fit."""
    seqs = [
        response_sequence(prompt, response)
        for prompt, response in zip(samples.prompt_ids, samples.response_ids, strict=True)
    ]
    return pad_sequences(seqs, max_len, pad_id)


def _gather(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def device_map(
    fn: Callable[..., jax.Array],
    arrays: dict[str, np.ndarray],
    chunk: int,
    mesh,
    rules,
) -> np.ndarray:
    """`fn(batch)` over `[N, ...]` host rows, `chunk` rows at a time placed on the mesh
    as `[1, chunk, ...]` batches (each process places the rows its devices hold); `fn`
    returns `[chunk, ...]`, and the results are concatenated."""
    n = len(next(iter(arrays.values())))
    index, count = data_shard(chunk, 1, mesh, rules)
    per = chunk // count
    outs = []
    for lo in range(0, n, chunk):
        local = {k: v[lo + index * per : lo + (index + 1) * per] for k, v in arrays.items()}
        outs.append(_gather(fn(from_local_rows(local, chunk, 1, mesh, rules))))
    return np.concatenate(outs, axis=0)
