"""Named random streams: every seeded draw in the CAI pipeline, in one table.

A draw is `numpy.random.default_rng([base, *tag, *key])`: `base` is the run's `seed`
plus the offset of the *seed* it derives from (`SEEDS`), `tag` is the stream's fixed
integers (`STREAMS`) and `key` the indices that make each draw its own (a prompt's
index, a round's step, ...), so a draw depends on the seed and those indices only,
never on batching or chunking. Modules never write the integers themselves: they call
`rng(name, base, *key)` / `draw_seed(name, base, *key)` with a stream's name, and get
their base from `seed(name, run_seed)`.

The integers are the ones the pipeline used before it had this table, so outputs stay
byte-identical. Two of their encodings are odd, and kept on purpose:

- Derived seeds are offsets of the run's seed (`critique.helpful` is `seed + 1`,
  `eval.responses` is `seed + 2`), not tags. Within one run they cannot meet another
  stream (the first integer differs), but across runs they do: the helpful answers of
  a run with seed `s` draw exactly what the red-team critique of a run with seed
  `s + 1` draws. `overlaps` finds such meetings; the tests pin the ones listed here.
- numpy's `SeedSequence` ignores trailing zeros (`[s, 0, 0] == [s]`), and
  `critique.principles` has tag 0, so its draw for prompt 0 is `default_rng(seed)`
  itself. No stream may use a bare seed (an empty tag), and a new stream takes a fresh
  nonzero tag.

`eval.preference` reads the feedback streams at the run's seed, so the eval stage's
preference comparison of pair `i` draws the same principles as the feedback stage's
label of pair `i` (a sharing the table declares: `shares`). The initial policy's
weights come from `jax.random.key(seed)` (a JAX key, another generator family; see
`JAX_SEEDS`), and the critique and pair streams hand 31-bit integers to
`jaxcai.sample.generate` as per-prompt JAX seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

import numpy as np

__all__ = [
    "JAX_SEEDS",
    "SEEDS",
    "STREAMS",
    "Seed",
    "Stream",
    "draw_seed",
    "entropy",
    "overlaps",
    "rng",
    "seed",
]


@dataclasses.dataclass(frozen=True)
class Stream:
    """A numpy stream: its fixed tag after the base seed and the names of its key."""

    tag: tuple[int, ...]
    key: tuple[str, ...]
    doc: str


@dataclasses.dataclass(frozen=True)
class Seed:
    """A base seed derived from the run's seed, and the streams drawn from it."""

    offset: int
    streams: tuple[str, ...]
    doc: str
    shares: str | None = None  # another seed whose draws this one reuses on purpose


# name                            tag    key                            what it draws
STREAMS: dict[str, Stream] = {
    "critique.principles": Stream((0,), ("prompt",), "the principle of each revision round"),
    "critique.samples": Stream((1,), ("step", "prompt"), "each critique/revision sample"),
    "feedback.principles": Stream((2,), ("pair",), "the preference principles of a pair"),
    "feedback.reasoning": Stream((3,), ("pair", "slot", "order"), "each chain-of-thought sample"),
    "feedback.pairs": Stream((4,), ("prompt",), "the two responses of a pair"),
    "prompts.split": Stream((7,), (), "the held-out eval prompts of a set"),
    "rl.prompts": Stream((8,), ("epoch",), "the order of the RL prompts in each pass"),
    "rl.samples": Stream((9,), ("rollout", "prompt"), "the responses of a rollout's prompt"),
    "rl.minibatches": Stream((10,), ("rollout", "epoch"), "a rollout's update minibatches"),
}

_CRITIQUE = ("critique.principles", "critique.samples")
_FEEDBACK = ("feedback.principles", "feedback.reasoning")

# name                  offset   streams                  what it seeds
SEEDS: dict[str, Seed] = {
    "critique.red_team": Seed(0, _CRITIQUE, "critique -> revision of red-team prompts"),
    "critique.helpful": Seed(1, _CRITIQUE, "answers to helpfulness prompts (SFT mix)"),
    "eval.responses": Seed(2, _CRITIQUE, "the eval stage's responses of each policy"),
    "feedback.label": Seed(0, _FEEDBACK, "the feedback stage's AI labels"),
    "feedback.sample": Seed(0, ("feedback.pairs",), "the feedback stage's response pairs"),
    "eval.preference": Seed(
        0, _FEEDBACK, "the eval stage's preference comparison", shares="feedback.label"
    ),
    "prompts": Seed(0, ("prompts.split",), "the train/eval split of each prompt set"),
    "rl.rollouts": Seed(
        0, ("rl.prompts", "rl.samples", "rl.minibatches"), "online RL's rollouts and updates"
    ),
    "rl.judge": Seed(3, _FEEDBACK, "online RL's AI-judge labels of rollout responses"),
}

# JAX keys straight from the run's seed (another generator family than numpy's).
JAX_SEEDS: dict[str, int] = {
    "initial.params": 0,  # jax.random.key(seed + 0): a random initial policy's weights
}


def seed(name: str, run_seed: int) -> int:
    """The base seed `name` (a key of `SEEDS` or `JAX_SEEDS`) derives from the run's."""
    if name in SEEDS:
        return int(run_seed) + SEEDS[name].offset
    if name in JAX_SEEDS:
        return int(run_seed) + JAX_SEEDS[name]
    raise KeyError(f"unknown seed {name!r}; seeds are {sorted(SEEDS) + sorted(JAX_SEEDS)}")


def entropy(name: str, base: int, *key: int) -> list[int]:
    """The integers stream `name` seeds numpy with for `key` (its indices, in order)."""
    try:
        stream = STREAMS[name]
    except KeyError:
        raise KeyError(f"unknown stream {name!r}; streams are {sorted(STREAMS)}") from None
    if len(key) != len(stream.key):
        raise TypeError(f"stream {name} is keyed by {stream.key}, got {len(key)} indices")
    return [int(base), *stream.tag, *(int(k) for k in key)]


def rng(name: str, base: int, *key: int) -> np.random.Generator:
    """A numpy generator of stream `name` at base seed `base` and indices `key`."""
    return np.random.default_rng(entropy(name, base, *key))


def draw_seed(name: str, base: int, *key: int) -> int:
    """A 31-bit integer from stream `name` (a per-sequence seed for `generate`)."""
    return int(rng(name, base, *key).integers(0, 2**31))


def _normal(values: list[int]) -> tuple[int, ...]:
    """What numpy's `SeedSequence` sees: trailing zeros do not count."""
    while len(values) > 1 and values[-1] == 0:
        values = values[:-1]
    return tuple(values)


def overlaps(
    run_seeds: Iterable[int], span: int = 3
) -> set[tuple[tuple[int, str, str], tuple[int, str, str]]]:
    """Every pair of (run seed, seed name, stream) whose draws meet, over the given run
    seeds and key indices in `[0, span)`; seeds that declare a sharing are left out."""
    owners: dict[tuple[int, ...], set[tuple[int, str, str]]] = {}
    for s, (seed_name, spec) in itertools.product(list(run_seeds), SEEDS.items()):
        if spec.shares:
            continue
        for stream in spec.streams:
            arity = len(STREAMS[stream].key)
            for key in itertools.product(range(span), repeat=arity):
                k = _normal(entropy(stream, seed(seed_name, s), *key))
                owners.setdefault(k, set()).add((s, seed_name, stream))
    return {
        pair
        for where in owners.values()
        if len(where) > 1
        for pair in itertools.combinations(sorted(where), 2)
    }
