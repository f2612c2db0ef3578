"""The named random streams: the integers each one seeds numpy with (the pipeline's
outputs depend on them), and no two streams meeting within a run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxcai import streams


def test_streams_keep_the_integers_the_pipeline_used():
    assert streams.entropy("critique.principles", 5, 3) == [5, 0, 3]
    assert streams.entropy("critique.samples", 5, 2, 3) == [5, 1, 2, 3]
    assert streams.entropy("feedback.principles", 5, 3) == [5, 2, 3]
    assert streams.entropy("feedback.reasoning", 5, 3, 1, 0) == [5, 3, 3, 1, 0]
    assert streams.entropy("feedback.pairs", 5, 3) == [5, 4, 3]
    assert streams.entropy("prompts.split", 5) == [5, 7]
    assert [streams.seed(n, 5) for n in ("critique.red_team", "critique.helpful")] == [5, 6]
    assert streams.seed("eval.responses", 5) == 7 and streams.seed("initial.params", 5) == 5
    want = int(np.random.default_rng([5, 1, 2, 3]).integers(0, 2**31))
    assert streams.draw_seed("critique.samples", 5, 2, 3) == want
    with pytest.raises(TypeError, match=r"keyed by \('step', 'prompt'\)"):
        streams.rng("critique.samples", 5, 2)
    with pytest.raises(KeyError, match="unknown stream"):
        streams.rng("nope", 0)
    with pytest.raises(KeyError, match="unknown seed"):
        streams.seed("nope", 0)


def test_tags_are_distinct_and_never_bare():
    """Within one base seed, a stream's first tag integer tells it apart (numpy drops
    trailing zeros, so only distinct leading tags keep draws apart for every key)."""
    firsts = [s.tag[0] for s in streams.STREAMS.values()]
    assert all(s.tag for s in streams.STREAMS.values())  # no stream is the bare seed
    assert len(set(firsts)) == len(firsts)
    assert sum(1 for t in firsts if t == 0) <= 1  # tag 0 aliases the bare seed at key 0
    for seed in streams.SEEDS.values():
        assert set(seed.streams) <= set(streams.STREAMS)
        assert seed.shares is None or seed.shares in streams.SEEDS
    # Seeds at the same offset draw from disjoint streams (unless they declare a sharing).
    for (a, x), (b, y) in itertools.combinations(streams.SEEDS.items(), 2):
        if x.offset == y.offset and b != x.shares and a != y.shares:
            assert not set(x.streams) & set(y.streams), (a, b)


def test_no_two_streams_meet_within_a_run():
    for run_seed in range(4):
        assert streams.overlaps([run_seed]) == set()


def test_across_runs_only_the_documented_offsets_meet():
    """`seed + 1` / `seed + 2` are kept for byte-identical outputs: a run's helpful
    answers draw what the next seed's red-team critique draws. The meetings found are
    exactly those the offsets predict."""
    found = {(a[1], a[0], b[1], b[0]) for a, b in streams.overlaps(range(4))}
    found |= {(c, d, a, b) for a, b, c, d in found}
    predicted = set()
    for (x, s), (y, t) in itertools.product(itertools.product(streams.SEEDS, range(4)), repeat=2):
        sx, sy = streams.SEEDS[x], streams.SEEDS[y]
        same_base = s + sx.offset == t + sy.offset
        meet = (x, s) != (y, t) and same_base and set(sx.streams) & set(sy.streams)
        if meet and not (sx.shares or sy.shares):
            predicted.add((x, s, y, t))
    assert found == predicted
    assert ("critique.helpful", 0, "critique.red_team", 1) in found
