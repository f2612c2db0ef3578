"""SL-CAI data: sample a response, then critique and revise it for n rounds.

For each prompt (a transcript ending on a Human turn) the helpful model first answers it;
then each round appends a critique request for a principle drawn at random (with
replacement, seeded) and samples a critique, appends the matching revision request and
samples a revision, which the next round critiques in turn. The constitution's few-shot
examples come first. Every text is kept (`Revised`), and `sft_pairs` turns them into
(prompt, revision) pairs for SFT.

Each context is a conversation (`jaxcai.chat` messages): the few-shot examples as
earlier user/assistant turns, the prompt's turns, then each round's response, critique
request, critique and revision request; the chat format (`tok`: a `ChatFormat`, or a
`Tokenizer` for the paper's Human/Assistant transcript) opens it for the assistant's
answer and says where an answer ends (its end-of-turn ids and stop strings).

Each step is one batched `jaxcai.sample.generate_chat` call over all prompts. A sequence's
randomness depends on the seed, the prompt's index, the round and the step only (never
on batching), and the principle draws on the seed only, so a run is reproducible.
Contexts longer than the model allows keep their end: the few-shot examples are dropped
first, the prompt and the latest turns kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxcai import streams
from jaxcai.cai.constitution import Constitution
from jaxcai.chat import ChatFormat, as_format, messages_from_transcript, transcript_from_messages
from jaxcai.model import unrolled
from jaxcai.sample import SAMPLING_RULES, generate_chat
from jaxcai.tokenizer import Tokenizer

__all__ = [
    "Revised",
    "SamplingSettings",
    "critique_and_revise",
    "few_shot_messages",
    "few_shot_prefix",
    "sft_pairs",
]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32


@dataclasses.dataclass
class Revised:
    """One prompt's trajectory: the initial response and every round's texts."""

    prompt: str
    initial: str
    rounds: list[
        dict[str, str]
    ]  # principle, critique_request, critique, revision_request, revision

    @property
    def final(self) -> str:
        return self.rounds[-1]["revision"] if self.rounds else self.initial


def few_shot_messages(constitution: Constitution) -> list[dict[str, str]]:
    """The critique examples as conversation turns: per example the user's prompt, the
    assistant's response, the critique request, the critique, the revision request and
    the revision."""
    messages = []
    for ex in constitution.critique_examples:
        for role, text in (
            ("user", ex.prompt),
            ("assistant", ex.response),
            ("user", ex.critique_request),
            ("assistant", ex.critique),
            ("user", ex.revision_request),
            ("assistant", ex.revision),
        ):
            messages.append({"role": role, "content": text.strip()})
    return messages


def few_shot_prefix(constitution: Constitution) -> str:
    """The critique examples as a Human/Assistant transcript (each a full critique ->
    revision exchange)."""
    return transcript_from_messages(few_shot_messages(constitution))


def _conversation(shots: list[dict[str, str]], prompt: str) -> list[dict[str, str]]:
    """The few-shot turns, then the prompt's (a system message of the prompt goes first,
    where chat formats expect it)."""
    messages = messages_from_transcript(prompt)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    return [*system, *shots, *messages[len(system) :]]


def _sample(
    config,
    params,
    fmt: ChatFormat,
    conversations: Sequence[list[dict[str, str]]],
    seeds: Sequence[int],
    settings: SamplingSettings,
    mesh,
    progress: bool,
) -> list[str]:
    return generate_chat(
        config,
        params,
        fmt,
        conversations,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seeds=list(seeds),
        batch_size=settings.batch_size,
        progress=progress,
        mesh=mesh,
    ).texts


def critique_and_revise(
    config,
    params,
    tok: Tokenizer | ChatFormat,
    constitution: Constitution,
    prompts: Sequence[str],
    *,
    rounds: int = 4,
    seed: int = 0,
    few_shot: bool = True,
    settings: SamplingSettings = SamplingSettings(),
    indices: Sequence[int] | None = None,
    mesh=None,
    progress: bool = False,
) -> list[Revised]:
    """Initial responses and `rounds` critique -> revision rounds for every prompt.

    `prompts` are transcripts ending on a Human turn (`"\\n\\nHuman: ..."`, as stored in
    prompts datasets). A prompt's principle draws and sampling seeds depend on `seed` and
    its global index (`indices`, default 0..n-1) only, so chunks of a prompt set give the
    same texts as the whole set at once. `tok` is the chat format the contexts are
    written in (a `Tokenizer` means its Human/Assistant transcript)."""
    fmt = as_format(tok)
    if rounds < 0:
        raise ValueError(f"rounds={rounds} must be >= 0")
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices")
    # The decoding layout once, not at each of the 1 + 2 * rounds `generate` calls.
    config, params = unrolled(config, params, mesh, SAMPLING_RULES)
    draws = np.array(
        [
            streams.rng("critique.principles", seed, i).integers(
                0, len(constitution.critiques), rounds
            )
            for i in indices
        ]
    ).reshape(len(prompts), rounds)
    shots = few_shot_messages(constitution) if few_shot else []

    def seeds(step: int) -> list[int]:  # one stream per (prompt, step), batch independent
        return [streams.draw_seed("critique.samples", seed, step, i) for i in indices]

    contexts = [_conversation(shots, p) for p in prompts]
    sample = lambda step: _sample(
        config, params, fmt, contexts, seeds(step), settings, mesh, progress
    )
    responses = sample(0)
    records = [Revised(p, r, []) for p, r in zip(prompts, responses, strict=True)]
    for r in range(rounds):
        chosen = [constitution.critiques[k] for k in draws[:, r]]
        for ctx, resp, c in zip(contexts, responses, chosen, strict=True):
            ctx += [
                {"role": "assistant", "content": resp},
                {"role": "user", "content": c.critique.strip()},
            ]
        critiques = sample(2 * r + 1)
        for ctx, crit, c in zip(contexts, critiques, chosen, strict=True):
            ctx += [
                {"role": "assistant", "content": crit},
                {"role": "user", "content": c.revision.strip()},
            ]
        responses = sample(2 * r + 2)
        for rec, c, crit, rev in zip(records, chosen, critiques, responses, strict=True):
            rec.rounds.append(
                {
                    "principle": c.name,
                    "critique_request": c.critique.strip(),
                    "critique": crit,
                    "revision_request": c.revision.strip(),
                    "revision": rev,
                }
            )
    return records


def sft_pairs(records: Sequence[Revised], *, up_to: int | None = None) -> list[dict[str, Any]]:
    """(prompt, revision) pairs for SFT: every round's revision (`up_to=None`), only the
    final one (`up_to=-1`), or rounds 1..k (`up_to=k`). Empty revisions are left out."""
    pairs = []
    for i, rec in enumerate(records):
        if up_to == -1:
            chosen = rec.rounds[-1:]
        else:
            chosen = rec.rounds if up_to is None else rec.rounds[:up_to]
        for k, rnd in enumerate(chosen):
            if rnd["revision"].strip():
                round_no = len(rec.rounds) if up_to == -1 else k + 1
                pairs.append(
                    {
                        "prompt": rec.prompt,
                        "response": rnd["revision"],
                        "metadata": {
                            "prompt_index": i,
                            "round": round_no,
                            "principle": rnd["principle"],
                        },
                    }
                )
    return pairs
