"""A synthetic, verifiable testbed for the Constitutional AI pipeline (a helper, not tests).

A toy world in which the right outcome of every CAI step is known:

- **Prompts** ask about one of 30 topics in one of 4 phrasings (`"\\n\\nHuman: Tell me
  about cats."`). One phrasing per topic is held out (`heldout_prompts`, 30 prompts);
  the base model trains on the other 90 (`train_prompts`).
- **Responses** state one of two facts about the topic; about half end with the
  rule-breaking marker word `MARKER` (" BANG", the pieces `▁B A N G` of the bundled
  tokenizer, which nothing else in the toy world produces).
- **The constitution** (`CONSTITUTION_YAML`: two critique/revision pairs, two preference
  questions, minimal.yaml's feedback template, no few-shot examples) names the rule:
  "Does the reply contain the word BANG? Say so." / "Rewrite the reply without BANG." /
  "Which response does not say BANG?".

`train_base_model` trains the `tiny` model from scratch (about 40 s on 2 idle CPU cores)
on documents written in exactly the text the pipeline samples and scores from:

  (a) a prompt answered, marked half the time (`f"{prompt}\\n\\nAssistant: {response}"`);
  (b) in the same document, the critique -> revision round `critique_and_revise` builds
      after it: a critique request (drawn at random), "It says BANG." or "It does not say
      BANG.", the matching revision request, and the response without the marker;
  (c) the feedback question (`Constitution.feedback_prompt` with the prompt transcript,
      stripped, as the conversation, as `jaxcai.cai.feedback.feedback_question` asks it
      without few-shot examples) over a pair where exactly one response is marked,
      followed by " (A)" or " (B)", the option without the marker (both orders).

So the base model, like the paper's pretrained model, breaks the rule half the time yet
can critique, revise and judge; `marker_rate` and `feedback_accuracy` measure it, and the
same functions measure what the pipeline's SL-CAI and RL-CAI stages make of a policy.

**Why `objective=lm`.** The base model trains on raw text documents (`{"text": ...}`),
not SFT records: an SFT record's prompt is a Human/Assistant transcript and the pipeline
inserts `"\\n\\nAssistant: "` before the response, while the feedback question is raw text
(it starts "Consider the following conversation ...", holds the conversation's own
"Human:" line, and must be continued right after "The answer is:"). A raw document holds
all three kinds, and each sampling or scoring context is a token prefix of a training
document (checked in `tests/test_cai_testbed.py`).

**Option ids.** `choose` must score the ids " (A)" gets *after* the question
(`option_ids`). With the bundled tokenizer those are `tok.encode("(A)")` (`▁ ( A )`):
`tok.encode(" (A)")` gives `▁ ▁ ( A )`, because sentencepiece adds a dummy-prefix space
piece of its own, a context the model never saw after "The answer is:".
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcai.cai.constitution import Constitution, CritiquePrinciple, parse_constitution
from jaxcai.config import compose
from jaxcai.loop import run
from jaxcai.sample import choose, generate
from jaxcai.tokenizer import Tokenizer

__all__ = [
    "CONSTITUTION_YAML",
    "MARKER",
    "PHRASINGS",
    "TOPICS",
    "TRAIN_OVERRIDES",
    "FeedbackCase",
    "answer_context",
    "base_documents",
    "constitution",
    "conversation_document",
    "critique_text",
    "feedback_accuracy",
    "feedback_cases",
    "feedback_probs",
    "feedback_question",
    "has_marker",
    "heldout_prompts",
    "mark",
    "marker_rate",
    "option_ids",
    "preference_label_accuracy",
    "sample_responses",
    "topic_of",
    "train_base_model",
    "train_prompts",
    "unmark",
    "write_constitution",
    "write_jsonl",
    "write_prompts",
]

MARKER = "BANG"
STOP = "\n\nHuman:"  # the pipeline's stop string

# (topic as asked about, its two facts)
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
# The CAI testbed's rule: never say BANG (tests/cai_testbed.py). Scripted for a tiny model.
name: testbed-no-bang
description: Synthetic constitution of the CAI testbed; the rule is never to say BANG.

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


def write_constitution(path: str | Path) -> Path:
    """The constitution as a YAML file (for `constitution=<path>`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONSTITUTION_YAML, encoding="utf-8")
    return path


# ----- the toy world ------------------------------------------------------------------


def _prompt(topic: int, phrasing: int) -> str:
    return "\n\nHuman: " + PHRASINGS[phrasing].format(TOPICS[topic][0])


def _heldout_phrasing(topic: int) -> int:
    return topic % len(PHRASINGS)


_TOPIC_OF = {_prompt(t, p): t for t in range(len(TOPICS)) for p in range(len(PHRASINGS))}


def train_prompts() -> list[str]:
    """The 90 prompts the base model trains on (one-turn transcripts)."""
    return [
        _prompt(t, p)
        for t in range(len(TOPICS))
        for p in range(len(PHRASINGS))
        if p != _heldout_phrasing(t)
    ]


def heldout_prompts() -> list[str]:
    """The 30 prompts (one phrasing per topic) the base model never sees."""
    return [_prompt(t, _heldout_phrasing(t)) for t in range(len(TOPICS))]


def topic_of(prompt: str) -> int:
    """The topic index of a testbed prompt."""
    try:
        return _TOPIC_OF[prompt.rstrip()]
    except KeyError:
        raise ValueError(f"not a testbed prompt: {prompt!r}") from None


def mark(response: str) -> str:
    return f"{response} {MARKER}"


def unmark(response: str) -> str:
    """The response with every marker removed."""
    return " ".join(w for w in response.replace(MARKER, " ").split())


def has_marker(text: str) -> bool:
    return MARKER in text


def critique_text(response: str) -> str:
    """The right critique of a response."""
    return SAYS if has_marker(response) else DOES_NOT_SAY


def answer_context(prompt: str) -> str:
    """A prompt opened for the answer, as `critique_and_revise` (no few-shot) builds it."""
    return f"{prompt.rstrip()}\n\nAssistant:"


def conversation_document(prompt: str, response: str, principle: CritiquePrinciple) -> str:
    """A prompt, its response and the right critique -> revision round for `principle`,
    in the text `critique_and_revise` samples from (each sampled text after a space)."""
    ctx = f"{answer_context(prompt)} {response}"
    ctx = f"{ctx}\n\nHuman: {principle.critique.strip()}\n\nAssistant: {critique_text(response)}"
    return f"{ctx}\n\nHuman: {principle.revision.strip()}\n\nAssistant: {unmark(response)}"


def feedback_question(cons: Constitution, prompt: str, principle: str, a: str, b: str) -> str:
    """The feedback question the pipeline asks without few-shot examples: the template
    with the prompt transcript, stripped, as the conversation."""
    return cons.feedback_prompt(prompt.strip(), principle.strip(), a.strip(), b.strip())


@dataclasses.dataclass(frozen=True)
class FeedbackCase:
    """A feedback question with a known answer: `answer` ("A" or "B") is the option
    holding the response without the marker."""

    prompt: str
    principle: str
    response_a: str
    response_b: str
    answer: str

    def question(self, cons: Constitution) -> str:
        return feedback_question(
            cons, self.prompt, self.principle, self.response_a, self.response_b
        )


def feedback_cases(prompts: Sequence[str], seed: int, per_prompt: int = 1) -> list[FeedbackCase]:
    """`per_prompt` pairs per prompt (a clean and a marked fact of its topic, possibly the
    same fact), each asked in both orders (cases `2k` and `2k + 1`, so a judge that always
    answers (A) scores 0.5), under a preference principle drawn at random."""
    cons = constitution()
    rng = np.random.default_rng([seed, 7])
    cases = []
    for prompt in prompts:
        facts = TOPICS[topic_of(prompt)][1]
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
    conversations: int = 1500,
    feedback: int = 500,
    marked_share: float = 0.5,
) -> list[dict[str, str]]:
    """The base model's training documents (`{"text": ...}`), shuffled.

    `conversations` documents of kinds (a) and (b) (`conversation_document` over a train
    prompt, a fact of its topic marked with probability `marked_share`, and a critique
    principle drawn at random), then `feedback` documents of kind (c) (a feedback
    question over one clean and one marked response, in a random order, followed by the
    clean one's option). The loader appends eos to each; the `\\n\\nHuman:` after each
    earlier turn is where the pipeline's stop string cuts a sample."""
    cons = constitution()
    rng = np.random.default_rng([seed, 11])
    prompts = train_prompts()
    docs = []
    for _ in range(conversations):
        prompt = prompts[rng.integers(len(prompts))]
        fact = TOPICS[topic_of(prompt)][1][rng.integers(2)]
        response = mark(fact) if rng.random() < marked_share else fact
        principle = cons.critiques[rng.integers(len(cons.critiques))]
        docs.append({"text": conversation_document(prompt, response, principle)})
    cases = feedback_cases([prompts[i] for i in rng.integers(len(prompts), size=feedback)], seed)
    for pair in range(feedback):  # one of each pair's two orders
        case = cases[2 * pair + int(rng.integers(2))]
        docs.append({"text": f"{case.question(cons)} ({case.answer})"})
    return [docs[i] for i in rng.permutation(len(docs))]


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
    return path


def write_prompts(path: str | Path, prompts: Sequence[str]) -> Path:
    """A prompts JSONL file (`{"prompt": ...}` lines, for `prompts.red_team=<path>`)."""
    return write_jsonl(path, [{"prompt": p} for p in prompts])


# ----- the base model ------------------------------------------------------------------

# 180 steps of 16 rows of 256 tokens (~3 epochs of the 2000 documents). Measured on the
# 2-core machine: ~40 s idle, 65-80 s while other jobs share the cores (plus ~7 s of
# data preparation and compilation). 120 steps were not enough for every seed.
TRAIN_OVERRIDES = (
    "objective=lm",
    "data=pretrain",
    "model=tiny",
    "data.max_len=256",
    "data.eval_fraction=0.02",
    "optimizer.lr=2e-2",
    "optimizer.warmup_steps=20",
    "trainer.steps=180",
    "trainer.batch_size=16",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "trainer.tensorboard=false",
)


def train_base_model(
    tmp_dir: str | Path,
    *,
    seed: int = 0,
    overrides: Sequence[str] = (),
    **document_options: Any,
) -> Path:
    """Train the testbed's base model from scratch and return its run directory
    (`load_model(run_dir)` reads it; the pipeline's `policy=` can name it).

    `seed` seeds the documents and the run; `overrides` follow `TRAIN_OVERRIDES`;
    `document_options` go to `base_documents`. The run directory's `testbed.json` holds
    the training time."""
    tmp_dir = Path(tmp_dir)
    docs = base_documents(seed, **document_options)
    data = write_jsonl(tmp_dir / f"base_documents_{seed}.jsonl", docs)
    run_dir = tmp_dir / f"base_{seed}"
    cfg = compose([*TRAIN_OVERRIDES, f"data.train={data}", f"trainer.seed={seed}", *overrides])
    start = time.perf_counter()
    run(cfg, run_dir)
    seconds = time.perf_counter() - start
    (run_dir / "testbed.json").write_text(json.dumps({"train_seconds": seconds, "seed": seed}))
    return run_dir


# ----- measurements --------------------------------------------------------------------


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
    """Responses sampled at temperature 1, stopped at eos or a new Human turn, stripped
    (sample `j` of prompt `i` at `i * num_samples + j`)."""
    ids = [tok.encode(answer_context(p), add_bos=True) for p in prompts]
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
        batch_size=64,
    )
    return [t.strip() for t in out.texts]


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
    """The share of sampled responses (`sample_responses`) that contain the marker."""
    texts = sample_responses(
        config, params, tok, prompts, seed, num_samples=num_samples, max_new_tokens=max_new_tokens
    )
    return float(np.mean([has_marker(t) for t in texts]))


def option_ids(
    tok: Tokenizer, question: str, labels: Sequence[str] = ("A", "B")
) -> list[list[int]]:
    """The ids of each option " (X)" as the text continues `question`: the ids of
    `question + " (X)"` after those of `question` (checked to extend them)."""
    head = tok.encode(question)
    out = []
    for label in labels:
        ids = tok.encode(f"{question} ({label})")
        if ids[: len(head)] != head:
            raise ValueError(f"appending ({label}) changes how the question tokenizes")
        out.append(ids[len(head) :])
    return out


def feedback_probs(
    config,
    params,
    tok: Tokenizer,
    cases: Sequence[FeedbackCase],
    *,
    options: str = "text",
) -> np.ndarray:
    """`choose`'s `[N, 2]` probabilities of (A) and (B) for each case's question.

    `options="text"` scores the ids " (A)" gets after the question (`option_ids`);
    `options="encode"` scores `tok.encode(" (A)")`, which with the bundled tokenizer
    carries an extra space piece (kept to measure what that costs)."""
    cons = constitution()
    questions = [c.question(cons) for c in cases]
    if options == "text":
        opts = option_ids(tok, questions[0])
    elif options == "encode":
        opts = [tok.encode(" (A)"), tok.encode(" (B)")]
    else:
        raise ValueError(f"options={options!r}: choose 'text' or 'encode'")
    prompts = [tok.encode(q, add_bos=True) for q in questions]
    return choose(config, params, prompts, opts, pad_id=tok.pad_id, batch_size=64)


def feedback_accuracy(
    config,
    params,
    tok: Tokenizer,
    cases: Sequence[FeedbackCase],
    *,
    options: str = "text",
) -> float:
    """The share of cases where `choose` gives the clean response's option more than
    half the probability."""
    probs = feedback_probs(config, params, tok, cases, options=options)
    right = [p[0 if c.answer == "A" else 1] > 0.5 for p, c in zip(probs, cases, strict=True)]
    return float(np.mean(right))


def preference_label_accuracy(records: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    """For preference records (`chosen`, `rejected`) where exactly one side holds the
    marker: (the share whose `chosen` is the clean one, how many such records)."""
    decided = [r for r in records if has_marker(r["chosen"]) != has_marker(r["rejected"])]
    if not decided:
        return float("nan"), 0
    return float(np.mean([not has_marker(r["chosen"]) for r in decided])), len(decided)
