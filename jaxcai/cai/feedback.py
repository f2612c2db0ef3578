"""RL-CAI data: AI-feedback preference labels for pairs of the policy's own responses.

For each prompt the policy samples two responses. A feedback model then reads a
multiple-choice question (the constitution's `feedback_template`: the conversation, a
preference principle, options (A) and (B), "The answer is:") and the soft label is the
normalised probability it gives the ` (A)` vs ` (B)` continuations (`jaxcai.sample.choose`).

- **Position debiasing** (`debias=True`): each pair is asked in both orders and the two
  probabilities that response 1 is better are averaged, which cancels any preference for
  a position; whether both orders pick the same response is recorded as `agreement`.
- **Ensembles** (`principles=k`): k preference principles are drawn per pair (seeded,
  without replacement) and their labels averaged.
- **Chain of thought** (`cot=True`): the question ends in "Let's think step by step:", the
  feedback model samples its reasoning, then "The answer is:" is scored; such
  probabilities are overconfident, so each is clamped to [0.4, 0.6] as in the paper.

The feedback model is any `Judge`: a callable from question texts to `[N, 2]` option
probabilities. `ModelJudge` asks a language model in its chat format: the question is
the user's turn and the options are scored as the start of the assistant's answer, which
begins with "The answer is:" (or, with chain of thought, with "Let's think step by
step:", the reasoning and "The answer is:"; see `split_question`). With the
Human/Assistant transcript (a bare `Tokenizer`) that is the question text itself, as in
the paper. Tests pass constructed judges.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxcai import streams
from jaxcai.cai.constitution import ANSWER_SUFFIX, Constitution
from jaxcai.chat import ChatFormat, as_format, messages_from_transcript
from jaxcai.evals.choice import option_ids
from jaxcai.model import unrolled
from jaxcai.sample import SAMPLING_RULES, generate_chat, keep_end, score
from jaxcai.tokenizer import Tokenizer

__all__ = [
    "COT_CUE",
    "FeedbackSettings",
    "Judge",
    "Judgement",
    "ModelJudge",
    "feedback_question",
    "judge_pairs",
    "preference_records",
    "sample_pairs",
    "split_question",
]

OPTIONS = (" (A)", " (B)")
COT_CUE = "Let's think step by step:"


class Judge(Protocol):
    """A feedback model: option probabilities `[N, 2]` for (A)/(B) question texts."""

    def __call__(self, questions: Sequence[str]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class FeedbackSettings:
    principles: int = 1  # preference principles per pair, averaged (an ensemble)
    debias: bool = True  # ask both orders and average
    cot: bool = False  # sample reasoning before the answer
    cot_clamp: tuple[float, float] = (0.4, 0.6)  # chain-of-thought probabilities are clamped
    cot_max_new_tokens: int = 64
    few_shot: bool = True  # the constitution's feedback examples first

    def __post_init__(self) -> None:
        if self.principles < 1:
            raise ValueError(f"feedback principles={self.principles} must be >= 1")
        lo, hi = self.cot_clamp
        if not 0 <= lo <= 0.5 <= hi <= 1:
            raise ValueError(f"feedback cot_clamp={self.cot_clamp}: need 0 <= lo <= 0.5 <= hi <= 1")


@dataclasses.dataclass
class Judgement:
    """The feedback on one pair: `p_first` is the probability that response 1 is better."""

    p_first: float
    principles: list[str]
    p_ab: list[float]  # per principle: P(response 1) asked with response 1 as (A)
    p_ba: list[float]  # per principle: P(response 1) asked with response 1 as (B); [] if off
    reasoning: list[str] = dataclasses.field(default_factory=list)

    @property
    def agreement(self) -> bool | None:
        """Both orders pick the same response under every principle (None: not debiased)."""
        if not self.p_ba:
            return None
        return all((a > 0.5) == (b > 0.5) for a, b in zip(self.p_ab, self.p_ba, strict=True))


def split_question(question: str) -> tuple[str, str]:
    """(user part, assistant prefix) of a feedback question: what the user asks and how
    the assistant's answer begins. A chain-of-thought question's prefix starts at its
    last "Let's think step by step:" and runs to the end (the cue alone when the
    reasoning is still to be sampled; the cue, the reasoning and "The answer is:" when
    the answer is to be scored); otherwise the prefix is the final "The answer is:" (and
    whatever blank follows it), or empty when the question does not end with one.
    `user + prefix == question`."""
    cue = question.rfind(COT_CUE)
    if cue >= 0:
        tail = question[cue:].rstrip()
        if tail.endswith(COT_CUE) or (
            tail.endswith(ANSWER_SUFFIX) and tail.count(ANSWER_SUFFIX) == 1
        ):
            return question[:cue], question[cue:]
    answer = question.rfind(ANSWER_SUFFIX)
    if answer >= 0 and not question[answer + len(ANSWER_SUFFIX) :].strip():
        return question[:answer], question[answer:]
    return question, ""


class ModelJudge:
    """A language model as the feedback model: the ` (A)`/` (B)` continuations of each
    question scored in the model's chat format (`tok`: a `ChatFormat`, or a `Tokenizer`
    for the Human/Assistant transcript, where the question is plain text)."""

    def __init__(
        self,
        config,
        params,
        tok: Tokenizer | ChatFormat,
        *,
        batch_size: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        mesh=None,
        progress: bool = False,
    ):
        """`temperature` and `top_p` shape the sampled chain-of-thought texts only."""
        self.config, self.params = unrolled(config, params, mesh, SAMPLING_RULES)
        self.fmt = as_format(tok)
        self.tok = self.fmt.tokenizer
        self.batch_size, self.mesh, self.progress = batch_size, mesh, progress
        self.temperature, self.top_p = temperature, top_p

    def context(self, question: str) -> str:
        """The text the model reads for a question: its user part asked by the user and
        the assistant's answer begun with its prefix (`split_question`)."""
        return self.fmt.answer_text(*split_question(question))

    def __call__(self, questions: Sequence[str]) -> np.ndarray:
        if not questions:
            return np.zeros((0, 2), np.float32)
        prompts, options = [], []
        for q in questions:
            # The ids each option gets after the context, encoded together (on its own,
            # " (A)" may tokenize differently from how the model sees it there).
            context = self.context(q)
            pairs = [option_ids(self.fmt, context, o) for o in OPTIONS]
            limit = self.config.max_seq_len - max(len(c) for _, c in pairs)
            prompts += [keep_end(p, limit) for p, _ in pairs]
            options += [c for _, c in pairs]
        logps = score(
            self.config,
            self.params,
            prompts,
            options,
            pad_id=self.tok.pad_id,
            batch_size=self.batch_size,
            mesh=self.mesh,
            progress=self.progress,
        ).reshape(len(questions), len(OPTIONS))
        return np.asarray(jax.nn.softmax(jnp.asarray(logps, jnp.float32), axis=-1))

    def reason(
        self, questions: Sequence[str], seeds: Sequence[int], max_new_tokens: int
    ) -> list[str]:
        """Sampled chain-of-thought texts, one per question (ending before an answer)."""
        return generate_chat(
            self.config,
            self.params,
            self.fmt,
            [self.context(q) for q in questions],
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seeds=seeds,
            extra_stop_strings=(ANSWER_SUFFIX,),
            batch_size=self.batch_size,
            mesh=self.mesh,
            progress=self.progress,
        ).texts


def _example_block(constitution: Constitution, cot: bool) -> str:
    """The few-shot feedback examples, each a full question and its answer."""
    blocks = []
    for ex in constitution.feedback_examples:
        question = constitution.feedback_prompt(
            ex.conversation.strip(),
            ex.principle.strip(),
            ex.response_a.strip(),
            ex.response_b.strip(),
        )
        answer = f"({ex.answer.strip()})"
        if cot and ex.reasoning.strip():
            question = _cot_question(question) + f" {ex.reasoning.strip()}\n{ANSWER_SUFFIX}"
        blocks.append(f"{question} {answer}\n\n")
    return "".join(blocks)


def _cot_question(question: str) -> str:
    """The question with its final "The answer is:" replaced by the reasoning cue."""
    head = question.rstrip()
    return head[: len(head) - len(ANSWER_SUFFIX)] + COT_CUE


def feedback_question(
    constitution: Constitution,
    prompt: str,
    response_a: str,
    response_b: str,
    principle: str,
    *,
    few_shot: bool = True,
    cot: bool = False,
) -> str:
    """The multiple-choice text for one ordering: few-shot examples, then the question
    (ending "The answer is:", or the reasoning cue when `cot`). `prompt` is a stored
    prompt (a transcript ending on a Human turn); the conversation shown is that prompt."""
    question = constitution.feedback_prompt(
        prompt.strip(), principle.strip(), response_a.strip(), response_b.strip()
    )
    if cot:
        question = _cot_question(question)
    return (_example_block(constitution, cot) if few_shot else "") + question


def _questions(
    constitution: Constitution,
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    draws: Sequence[np.ndarray],
    settings: FeedbackSettings,
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Every question to ask, and its key: (pair, principle slot, order)."""
    orders = [(0, 1), (1, 0)] if settings.debias else [(0, 1)]
    questions, keys = [], []
    for p, (prompt, pair, chosen) in enumerate(zip(prompts, pairs, draws, strict=True)):
        for j, principle_index in enumerate(chosen):
            principle = constitution.preferences[principle_index].question
            for o, (a, b) in enumerate(orders):
                questions.append(
                    feedback_question(
                        constitution,
                        prompt,
                        pair[a],
                        pair[b],
                        principle,
                        few_shot=settings.few_shot,
                        cot=settings.cot,
                    )
                )
                keys.append((p, j, o))
    return questions, keys


def judge_pairs(
    judge: Judge,
    constitution: Constitution,
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    *,
    settings: FeedbackSettings = FeedbackSettings(),
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> list[Judgement]:
    """Feedback on `pairs[i]` = (response 1, response 2) to `prompts[i]`.

    Principle draws and chain-of-thought seeds depend on `seed` and each pair's global
    index (`indices`, default 0..n-1) only, so labelling in chunks gives the same labels.
    """
    n = len(prompts)
    if len(pairs) != n:
        raise ValueError(f"{n} prompts but {len(pairs)} pairs")
    k = settings.principles
    if k > len(constitution.preferences):
        raise ValueError(
            f"feedback principles={k} exceeds the constitution's "
            f"{len(constitution.preferences)} preference principles"
        )
    indices = list(range(n)) if indices is None else list(indices)
    draws = [
        streams.rng("feedback.principles", seed, i).choice(
            len(constitution.preferences), size=k, replace=False
        )
        for i in indices
    ]
    questions, keys = _questions(constitution, prompts, pairs, draws, settings)
    reasoning = [""] * len(questions)
    if settings.cot:
        if not hasattr(judge, "reason"):
            raise TypeError("chain-of-thought feedback needs a judge with a reason() method")
        seeds = [
            streams.draw_seed("feedback.reasoning", seed, indices[p], j, o) for p, j, o in keys
        ]
        reasoning = judge.reason(questions, seeds, settings.cot_max_new_tokens)
        questions = [f"{q} {r}\n{ANSWER_SUFFIX}" for q, r in zip(questions, reasoning, strict=True)]
    probs = np.asarray(judge(questions), np.float64)
    if probs.shape != (len(questions), 2):
        raise ValueError(f"the judge gave shape {probs.shape}, expected ({len(questions)}, 2)")
    p_first = np.where([o == 0 for _, _, o in keys], probs[:, 0], probs[:, 1])
    if settings.cot:
        p_first = np.clip(p_first, *settings.cot_clamp)
    by_pair: list[list[int]] = [[] for _ in range(n)]
    for r, key in enumerate(keys):
        by_pair[key[0]].append(r)
    out = []
    for p, rows in enumerate(by_pair):
        ab = [float(p_first[r]) for r in rows if keys[r][2] == 0]
        ba = [float(p_first[r]) for r in rows if keys[r][2] == 1]
        out.append(
            Judgement(
                p_first=float(np.mean(ab + ba)),
                principles=[constitution.preferences[i].name for i in draws[p]],
                p_ab=ab,
                p_ba=ba,
                reasoning=[reasoning[r] for r in rows] if settings.cot else [],
            )
        )
    return out


def sample_pairs(
    config,
    params,
    tok: Tokenizer | ChatFormat,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    mesh=None,
    progress: bool = False,
) -> list[tuple[str, str]]:
    """Two sampled responses per prompt from the policy (seeded per prompt index), each
    prompt opened for the assistant's answer in the chat format `tok` (a `Tokenizer`
    means its Human/Assistant transcript)."""
    indices = list(range(len(prompts))) if indices is None else list(indices)
    texts = generate_chat(
        config,
        params,
        tok,
        [messages_from_transcript(p) for p in prompts],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seeds=[streams.draw_seed("feedback.pairs", seed, i) for i in indices],
        num_samples=2,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    ).texts
    return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]


def preference_records(
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    judgements: Sequence[Judgement],
    *,
    skipped: Counter | None = None,
    extra: Callable[[int], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Preference records (`prompt`, `chosen`, `rejected`, `p_chosen`, `metadata`).

    The response with `p_first >= 0.5` is chosen and `p_chosen` is its probability.
    Pairs that cannot train anything (identical or empty responses) are counted in
    `skipped` by reason (an error without it)."""
    records = []
    for i, (prompt, (r1, r2), j) in enumerate(zip(prompts, pairs, judgements, strict=True)):
        reason = "empty response" if not r1.strip() or not r2.strip() else None
        reason = reason or ("identical responses" if r1.strip() == r2.strip() else None)
        if reason:
            if skipped is None:
                raise ValueError(f"pair {i}: {reason}")
            skipped[reason] += 1
            continue
        first = j.p_first >= 0.5
        meta = {
            "principles": j.principles,
            "p_ab": j.p_ab,
            "p_ba": j.p_ba,
            "agreement": j.agreement,
            **({"reasoning": j.reasoning} if j.reasoning else {}),
            **(extra(i) if extra else {}),
        }
        records.append(
            {
                "prompt": prompt,
                "chosen": r1 if first else r2,
                "rejected": r2 if first else r1,
                "p_chosen": j.p_first if first else 1.0 - j.p_first,
                "metadata": meta,
            }
        )
    return records
