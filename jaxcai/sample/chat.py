"""Generating answers in a chat format: the one place that opens a conversation for the
assistant, cuts it to fit, samples until the format says the answer is over, and strips.

Every sampling stage (critique -> revision, the policy's response pairs, the feedback
model's chain of thought, evaluation by generation) goes through `generate_chat`. A
context is either a conversation (a list of `jaxcai.chat` messages, opened with
`fmt.prompt_ids`) or text already written in the format (`fmt.encode_text`). Contexts
longer than the model allows keep their first id and their end (`keep_end`). Sampling
ends at the format's stop ids (eos, a template's end-of-turn token), at its stop strings
(the start of a new Human turn in the transcript) or at `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from jaxcai.chat import ChatFormat, HumanAssistantFormat, Message, as_format
from jaxcai.model import ModelConfig, Params
from jaxcai.sample.batching import keep_end
from jaxcai.sample.decoding import generate
from jaxcai.tokenizer import Tokenizer

__all__ = ["HUMAN_TURN", "STOP", "ChatSamples", "context_ids", "generate_chat"]

# Where a Human turn starts in the Human/Assistant transcript, and so where an assistant's
# answer ends (the format's one stop string); `STOP` is the older name.
HUMAN_TURN: str = HumanAssistantFormat.stop_strings[0]
STOP = HUMAN_TURN

Context = Sequence[Message] | str


@dataclasses.dataclass(frozen=True)
class ChatSamples:
    """Stripped answers (sample `j` of context `i` at `i * num_samples + j`), why each
    stopped, and how many contexts were cut to fit the model."""

    texts: list[str]
    stop_reasons: list[str]
    truncated: int


def context_ids(fmt: ChatFormat, context: Context) -> list[int]:
    """The ids the model reads for a context: a conversation opened for the assistant's
    answer, or text already in the format encoded as it stands."""
    return fmt.encode_text(context) if isinstance(context, str) else fmt.prompt_ids(context)


def generate_chat(
    config: ModelConfig,
    params: Params,
    fmt: ChatFormat | Tokenizer,
    contexts: Sequence[Context],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    num_samples: int = 1,
    extra_stop_strings: Sequence[str] = (),
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> ChatSamples:
    """Sample answers to `contexts` in the chat format `fmt` (a `Tokenizer` means its
    Human/Assistant transcript), stopping where the format ends a turn or at any of
    `extra_stop_strings`; `seed`/`seeds` as in `jaxcai.sample.generate`."""
    fmt = as_format(fmt)
    limit = config.max_seq_len - max_new_tokens
    if limit < 2:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"max_seq_len={config.max_seq_len}"
        )
    ids, truncated = [], 0
    for context in contexts:
        full = context_ids(fmt, context)
        ids.append(keep_end(full, limit))
        truncated += len(full) > limit
    out = generate(
        config,
        params,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        seeds=None if seeds is None else list(seeds),
        num_samples=num_samples,
        stop_ids=fmt.stop_ids,
        stop_strings=(*fmt.stop_strings, *extra_stop_strings),
        tokenizer=fmt.tokenizer,
        pad_id=fmt.tokenizer.pad_id,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    return ChatSamples([t.strip() for t in out.texts], list(out.stop_reasons), truncated)
