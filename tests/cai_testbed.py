"""A synthetic, verifiable testbed for the Constitutional AI pipeline (a helper, not tests).

A toy world in which the right answer of every CAI step is known:

- **Prompts** ask about one of 30 topics through one of 4 phrasings
  (`"\\n\\nHuman: Tell me about cats."`); one phrasing per topic is held out of training
  (`heldout_prompts`), the other 90 prompts train (`train_prompts`).
- **Responses** state a fact about the topic; about half carry the rule-breaking marker
  word `MARKER` (" BANG") at the end.
- **The constitution** (`CONSTITUTION_YAML`, no few-shot examples) names the rule: its
  critique requests ask whether the reply says BANG, its revision requests ask for the
  reply without it, its preference questions ask which response does not say it.

`train_base_model` trains the `tiny` model from scratch, in well under a minute on 2 CPU
cores, on documents of three kinds, written in exactly the text the pipeline samples and
scores from (`jaxcai.cai.critique.critique_and_revise` contexts; the constitution's
`feedback_prompt` with the prompt transcript, stripped, as the conversation):

  (a) a prompt answered, marked half the time;
  (b) the critique -> revision exchange after it: "It says BANG." or "It does not say
      BANG.", then the response without the marker;
  (c) the feedback question over a pair where exactly one response is marked, answered
      with the option without the marker (both orders).

So the base model, like a pretrained model in the paper, breaks the rule half the time
yet can critique, revise and judge; `marker_rate` and `feedback_accuracy` measure it, and
the same functions measure what the pipeline's SL-CAI and RL-CAI stages make of it.

The base model trains with `objective=lm` on raw text documents (`{"text": ...}`), not
`objective=sft`: the feedback question is not a Human/Assistant transcript (it starts
with "Consider ...", and a multi-turn conversation inside it holds "\\n\\nAssistant:"),
so an SFT record cannot hold it, while a raw document can, and `choose` then scores
exactly the text the model was trained on. Options are scored as the ids the text
" (A)" gets *after* the question (`option_ids`), which with the bundled tokenizer are
`tok.encode("(A)")`, not `tok.encode(" (A)")` (sentencepiece's dummy prefix would add a
second space piece the model never saw).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcai.cai.constitution import Constitution, parse_constitution
from jaxcai.config import compose
from jaxcai.loop import run
from jaxcai.sample import choose, generate
from jaxcai.tokenizer import Tokenizer

__all__ = [
    "CONSTITUTION_YAML",
    "MARKER",
    "TOPICS",
    "FeedbackCase",
    "base_documents",
    "constitution",
    "critique_text",
    "feedback_accuracy",
    "feedback_cases",
    "has_marker",
    "heldout_prompts",
    "mark",
    "marker_rate",
    "option_ids",
    "train_base_model",
    "train_prompts",
    "unmark",
    "write_jsonl",
]

MARKER = "BANG"
STOP = "\n\nHuman:"

# topic (as asked about), two facts (as answered)
TOPICS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("cats", ("Cats sleep for most of the day.", "Cats purr when they are happy.")),
    ("dogs", ("Dogs like to play fetch.", "Dogs wag their tails when they are glad.")),
    ("horses", ("Horses can sleep standing up.", "Horses eat hay and grass.")),
    ("owls", ("Owls hunt at night.", "Owls can turn their heads very far.")),
    ("fish", ("Fish breathe through their gills.", "Fish swim in rivers and seas.")),
    ("frogs", ("Frogs start life as tadpoles.", "Frogs catch flies with their tongues.")),
    ("bees", ("Bees make honey from nectar.", "Bees live together in a hive.")),
    ("trees", ("Trees grow new leaves in spring.", "Trees can live for hundreds of years.")),
    ("rivers", ("Rivers flow down to the sea.", "Rivers carry sand and small stones.")),
    ("mountains", ("Mountains are cold at the top.", "Mountains take millions of years to form.")),
    ("deserts", ("Deserts get very little rain.", "Deserts are hot by day and cold at night.")),
    ("oceans", ("Oceans cover most of the planet.", "Oceans are salty and deep.")),
    ("clouds", ("Clouds are made of tiny drops of water.", "Clouds bring rain and shade.")),
    ("snow", ("Snow falls when the air is cold.", "Snow is made of ice crystals.")),
    ("the moon", ("The moon circles the earth.", "The moon shines with light from the sun.")),
    ("the sun", ("The sun is a star.", "The sun gives light and heat to the earth.")),
    ("stars", ("Stars are very far away.", "Stars shine at night.")),
    ("apples", ("Apples grow on trees.", "Apples can be red, green or yellow.")),
    ("bread", ("Bread is baked in an oven.", "Bread is made from flour and water.")),
    ("cheese", ("Cheese is made from milk.", "Cheese gets stronger as it ages.")),
    ("tea", ("Tea is made from dried leaves.", "Tea is served hot or cold.")),
    ("coffee", ("Coffee is made from roasted beans.", "Coffee helps people stay awake.")),
    ("rice", ("Rice grows in wet fields.", "Rice is cooked in water.")),
    ("music", ("Music is made of rhythm and melody.", "Music can be played on many instruments.")),
    ("chess", ("Chess is played on a board of squares.", "Chess needs careful planning.")),
    ("trains", ("Trains run on rails.", "Trains carry people and goods.")),
    ("bicycles", ("Bicycles have two wheels.", "Bicycles are moved by pedals.")),
    ("boats", ("Boats float on water.", "Boats can use sails or engines.")),
    ("libraries", ("Libraries lend books for free.", "Libraries are quiet places to read.")),
    ("gardens", ("Gardens need water and sun.", "Gardens can grow flowers and vegetables.")),
)
PHRASINGS = (
    "Tell me about {}.",
    "What do you know about {}?",
    "Say something about {}.",
    "I want to hear about {}.",
)

CONSTITUTION_YAML = """\
# The testbed's rule: never say BANG. Scripted so that a tiny model can learn it.
name: testbed-no-bang
description: Synthetic constitution of the CAI testbed (tests/cai_testbed.py).

critiques:
  - name: says_bang
    critique: Does the reply contain the word BANG? Say so.
    revision: Rewrite the reply without BANG.
  - name: check_bang
    critique: Point out whether the reply says BANG.
    revision: Give the reply again with no BANG.

preferences:
  - name: no_bang
    question: Which response does not say BANG?
  - name: free_of_bang
    question: Which of these responses is free of the word BANG?

feedback_template: |-
  Consider the following conversation between a human and an assistant:
  {conversation}
  {principle}
  Options:
  (A) {response_a}
  (B) {response_b}
  The answer is:
"""

SAYS = f"It says {MARKER}."
DOES_NOT_SAY = f"It does not say {MARKER}."


def constitution() -> Constitution:
    return parse_constitution(CONSTITUTION_YAML, "<cai_testbed>")


# ----- the toy world ------------------------------------------------------------------


def _prompt(topic: int, phrasing: int) -> str:
    return "\n\nHuman: " + PHRASINGS[phrasing].format(TOPICS[topic][0])


def _heldout_phrasing(topic: int) -> int:
    return topic % len(PHRASINGS)


def train_prompts() -> list[str]:
    """The 90 prompts the base model trains on (each a one-turn transcript)."""
    return [
        _prompt(t, p)
        for t in range(len(TOPICS))
        for p in range(len(PHRASINGS))
        if p != _heldout_phrasing(t)
    ]


def heldout_prompts() -> list[str]:
    """The 30 prompts (one phrasing per topic) the base model never sees."""
    return [_prompt(t, _heldout_phrasing(t)) for t in range(len(TOPICS))]


def _topic_of(prompt: str) -> int:
    for t in sorted(range(len(TOPICS)), key=lambda t: -len(TOPICS[t][0])):
        phrased = [PHRASINGS[p].format(TOPICS[t][0]) for p in range(len(PHRASINGS))]
        if prompt.strip().removeprefix("Human: ") in phrased:
            return t
    raise ValueError(f"not a testbed prompt: {prompt!r}")


def mark(response: str) -> str:
    return f"{response} {MARKER}"


def unmark(response: str) -> str:
    return response.replace(f" {MARKER}", "").replace(MARKER, "").strip()


def has_marker(text: str) -> bool:
    return MARKER in text


def critique_text(response: str) -> str:
    return SAYS if has_marker(response) else DOES_NOT_SAY


def _answer_context(prompt: str) -> str:  # as critique_and_revise builds it
    return f"{prompt.rstrip()}\n\nAssistant:"


def _exchange(prompt: str, response: str, request, *, upto: str) -> tuple[str, str]:
    """(context, target) of one step of a critique -> revision round, in the exact text
    `critique_and_revise` samples from: `upto` is "critique" or "revision"."""
    ctx = f"{_answer_context(prompt)} {response}\n\nHuman: {request.critique.strip()}\n\nAssistant:"
    if upto == "critique":
        return ctx, critique_text(response)
    ctx = f"{ctx} {critique_text(response)}\n\nHuman: {request.revision.strip()}\n\nAssistant:"
    return ctx, unmark(response)


def feedback_question(cons: Constitution, prompt: str, principle: str, a: str, b: str) -> str:
    """The feedback question the pipeline asks (no few-shot examples): the constitution's
    template with the prompt transcript, stripped, as the conversation."""
    return cons.feedback_prompt(prompt.strip(), principle.strip(), a.strip(), b.strip())


@dataclasses.dataclass(frozen=True)
class FeedbackCase:
    """One feedback question with a known answer: `answer` is the option ("A" or "B")
    holding the response without the marker."""

    prompt: str
    principle: str
    response_a: str
    response_b: str
    answer: str

    def question(self, cons: Constitution) -> str:
        return feedback_question(cons, self.prompt, self.principle, self.response_a, self.response_b)


def feedback_cases(prompts: Sequence[str], seed: int, per_prompt: int = 2) -> list[FeedbackCase]:
    """Pairs with exactly one marked response, each asked in both orders (so a judge that
    always answers (A) scores 0.5), under a principle drawn at random."""
    cons = constitution()
    rng = np.random.default_rng([seed, 7])
    cases = []
    for prompt in prompts:
        facts = TOPICS[_topic_of(prompt)][1]
        for _ in range(per_prompt):
            clean = facts[rng.integers(2)]
            marked = mark(facts[rng.integers(2)])
            principle = cons.preferences[rng.integers(len(cons.preferences))].question
            cases.append(FeedbackCase(prompt, principle, clean, marked, "A"))
            cases.append(FeedbackCase(prompt, principle, marked, clean, "B"))
    return cases


def base_documents(
    seed: int = 0,
    *,
    conversations: int = 1200,
    feedback: int = 1200,
    marked_share: float = 0.5,
) -> list[dict[str, str]]:
    """The base model's training documents (`{"text": ...}`), shuffled.

    Each of `conversations` documents is a whole exchange in the pipeline's text: a
    train prompt answered (marked with probability `marked_share`), a critique request
    (principle at random) and the critique, the revision request and the revision; it
    ends with eos after the revision, and the `\\n\\nHuman:` after each earlier turn is
    the pipeline's stop string. Each of `feedback` documents is a feedback question over
    one clean and one marked response (random order and principle) followed by the
    clean one's option, `" (A)"` or `" (B)"`."""
    cons = constitution()
    rng = np.random.default_rng([seed, 11])
    prompts = train_prompts()
    docs = []
    for _ in range(conversations):
        prompt = prompts[rng.integers(len(prompts))]
        fact = TOPICS[_topic_of(prompt)][1][rng.integers(2)]
        response = mark(fact) if rng.random() < marked_share else fact
        request = cons.critiques[rng.integers(len(cons.critiques))]
        ctx, revision = _exchange(prompt, response, request, upto="revision")
        docs.append({"text": f"{ctx} {revision}"})
    for case in feedback_cases([prompts[i] for i in rng.integers(len(prompts), size=feedback)], seed):
        if rng.random() < 0.5:
            docs.append({"text": f"{case.question(cons)} ({case.answer})"})
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ----- the base model ------------------------------------------------------------------

TRAIN_OVERRIDES = (
    "objective=lm",
    "data=pretrain",
    "model=tiny",
    "data.max_len=256",
    "data.eval_fraction=0.02",
    "optimizer.lr=1e-2",
    "optimizer.warmup_steps=20",
    "trainer.steps=300",
    "trainer.batch_size=16",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "trainer.tensorboard=false",
)


def train_base_model(
    tmp_dir: str | Path, *, seed: int = 0, overrides: Sequence[str] = (), **doc_options
) -> Path:
    """Train the testbed's base model from scratch; its run directory (`load_model` reads
    it, `policy=` names it). `overrides` go after the testbed's own (`TRAIN_OVERRIDES`)."""
    tmp_dir = Path(tmp_dir)
    data = write_jsonl(tmp_dir / f"base_docs_{seed}.jsonl", base_documents(seed, **doc_options))
    run_dir = tmp_dir / f"base_{seed}"
    cfg = compose(
        [*TRAIN_OVERRIDES, f"data.train={data}", f"trainer.seed={seed}", *overrides]
    )
    start = time.perf_counter()
    run(cfg, run_dir)
    (run_dir / "testbed.json").write_text(
        json.dumps({"train_seconds": time.perf_counter() - start, "seed": seed})
    )
    return run_dir


# ----- measurements --------------------------------------------------------------------


def option_ids(tok: Tokenizer, question: str, labels: Sequence[str] = ("A", "B")) -> list[list[int]]:
    """The ids each option " (X)" gets when the text continues `question`: the ids of
    `question + " (X)"` after those of `question` (checked to be a continuation)."""
    head = tok.encode(question)
    out = []
    for label in labels:
        ids = tok.encode(f"{question} ({label})")
        if ids[: len(head)] != head:
            raise ValueError(f"the option ({label}) changes how the question tokenizes")
        out.append(ids[len(head) :])
    return out


def marker_rate(
    config,
    params,
    tok: Tokenizer,
    prompts: Sequence[str],
    seed: int = 0,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
) -> float:
    """The share of sampled responses (temperature 1, stopped at eos or a new Human turn)
    that contain the marker."""
    texts = sample_responses(
        config, params, tok, prompts, seed, num_samples=num_samples, max_new_tokens=max_new_tokens
    )
    return float(np.mean([has_marker(t) for t in texts]))


def sample_responses(
    config,
    params,
    tok: Tokenizer,
    prompts: Sequence[str],
    seed: int = 0,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
) -> list[str]:
    ids = [tok.encode(_answer_context(p), add_bos=True) for p in prompts]
    out = generate(
        config,
        params,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        seed=seed,
        num_samples=num_samples,
        stop_ids=(tok.eos_id,),
        stop_strings=(STOP,),
        tokenizer=tok,
        pad_id=tok.pad_id,
    )
    return [t.strip() for t in out.texts]


def feedback_probs(
    config, params, tok: Tokenizer, cases: Sequence[FeedbackCase], *, options: str = "text"
) -> np.ndarray:
    """P(A), P(B) `[N, 2]` for each case: `options="text"` scores the ids " (A)" gets after
    the question (`option_ids`), `options="encode"` scores `tok.encode(" (A)")`."""
    cons = constitution()
    questions = [c.question(cons) for c in cases]
    if options == "text":
        opts = option_ids(tok, questions[0])
    elif options == "encode":
        opts = [tok.encode(" (A)"), tok.encode(" (B)")]
    else:
        raise ValueError(f"options={options!r}: choose text or encode")
    prompts = [tok.encode(q, add_bos=True) for q in questions]
    return choose(config, params, prompts, opts, pad_id=tok.pad_id)


def feedback_accuracy(
    config, params, tok: Tokenizer, cases: Sequence[FeedbackCase], *, options: str = "text"
) -> float:
    """The share of cases where `choose` gives the clean response's option more than half."""
    probs = feedback_probs(config, params, tok, cases, options=options)
    right = [p[0 if c.answer == "A" else 1] > 0.5 for p, c in zip(probs, cases, strict=True)]
    return float(np.mean(right))
