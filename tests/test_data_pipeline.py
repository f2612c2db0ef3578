"""The grain input pipeline: per-example encoding, truncation, packing, padding, the
checkpointable train iterator, sharding, random-access rows and global batches.

Expected token ids are computed here from the tokenizer (`encode`, `encode_conversation`)
and the documented layout, not from the pipeline's own helpers; the packing check runs the
tiny model on packed rows and on each example alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from omegaconf import OmegaConf

from jaxcai.data import builders
from jaxcai.data.batches import EMPTY, data_shard, eval_index_batches
from jaxcai.data.pipeline import (
    IndexedSource,
    Layout,
    encode_example,
    pad_rows,
    repad,
    train_iterator,
)
from jaxcai.data.records import DataError
from jaxcai.data.rows import ArrayRows, MapRows, eval_rows
from jaxcai.data.training import training_data
from jaxcai.losses import sequence_logps, token_logps
from jaxcai.model import forward, init_params
from jaxcai.model_config import preset
from jaxcai.sharding import MeshConfig, make_mesh
from jaxcai.tokenizer import Tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "data_shards.py"
ASSISTANT = "\n\nAssistant:"

# Short sft examples (19-31 tokens, a few longer) with unique responses, so that two or
# three share a 64-token row and a row's text names its example.
# fmt: off
WORDS = [
    "apple", "river", "stone", "cloud", "lamp", "violin", "garden", "copper", "winter",
    "ladder", "meadow", "pencil", "harbor", "candle", "water", "sun", "tree", "book", "cat",
    "dog", "red", "blue", "green", "house",
]
# fmt: on
SFT_EXTRA = [
    {"prompt": "Human: Hi\n\nAssistant: Hello!\n\nHuman: Say one.", "response": "One and only."},
    {"prompt": "Quote the café sign, please.", "response": "Café naïve — déjà vu 😀."},
    {"prompt": "Human: Count.\n\nAssistant: To what?\n\nHuman: To three.", "response": "1, 2, 3."},
    {
        "prompt": "Tell me a long story about a lighthouse keeper and the sea, in detail.",
        "response": "Every night the keeper climbed the stairs, lit the lamp, and watched "
        "the dark water for ships that never came, until one winter morning a small boat "
        "drifted in with a letter addressed to him.",
    },
]
PREF_RECORDS = [
    {"prompt": "Hi", "chosen": "Yo.", "rejected": "No.", "p_chosen": 0.5},
    {"prompt": "Say sun.", "chosen": "Sun.", "rejected": "Moon.", "p_chosen": 0.75},
    {
        "prompt": "Name a fruit.",
        "chosen": "An apple, crisp and sweet.",
        "rejected": "A rock.",
        "p_chosen": 1.0,
    },
    {"prompt": "Say cat.", "chosen": "Cat.", "rejected": "Dog and more.", "p_chosen": 0.9},
    {
        "prompt": "How do I boil an egg?",
        "chosen": "Put it in boiling water for nine minutes, then cool it in cold water "
        "so the shell comes off easily.",
        "rejected": "Figure it out yourself.",
        "p_chosen": 0.6,
    },
    {"prompt": "Say red.", "chosen": "Red.", "rejected": "Blue.", "p_chosen": 0.8},
]


# ----- helpers ------------------------------------------------------------------------


def sft_records() -> list[dict]:
    out = [
        {"prompt": f"Say {w}.", "response": w.capitalize() + " and more" * (i % 3) + "."}
        for i, w in enumerate(WORDS)
    ]
    return out + SFT_EXTRA


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def transcript(prompt: str) -> str:
    """The stored form of a JSONL prompt (what `records.normalise_prompt` documents)."""
    prompt = prompt.strip()
    return "\n\n" + prompt if prompt.startswith("Human:") else f"\n\nHuman: {prompt}"


def conversation_ids(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """bos + conversation + eos ids, and where the response's tokens start."""
    enc = tok.encode_conversation(f"{prompt}{ASSISTANT} {response}", add_bos=True, add_eos=True)
    assert enc.spans[-1].role == "Assistant"
    return enc.ids, enc.spans[-1].start


def as_str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def trees_equal(a, b) -> bool:
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def json_round_trip(state):
    """The iterator state as a checkpoint stores it (grain writes it as JSON)."""
    return json.loads(json.dumps(state))


def segments(row: dict) -> list[dict[str, np.ndarray]]:
    """The segments of one packed row: tokens/targets/mask/positions per segment id."""
    ids = row["segment_ids"]
    return [
        {k: row[k][ids == s] for k in ("tokens", "targets", "mask", "positions")}
        for s in range(1, int(ids.max()) + 1)
    ]


def identify(tokens: np.ndarray, encoded: list[dict]) -> int:
    """The index of the one encoded example whose tokens these are."""
    hits = [i for i, e in enumerate(encoded) if np.array_equal(e["tokens"], tokens)]
    assert len(hits) == 1, (tokens, hits)
    return hits[0]


# ----- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_pipeline")


@pytest.fixture(scope="module")
def sft_source(data_dir) -> IndexedSource:
    path = write_jsonl(data_dir / "sft.jsonl", sft_records())
    ds = builders.prepare("sft", path, data_dir / "sft")
    return IndexedSource(ds.source("train"))


@pytest.fixture(scope="module")
def pref_source(data_dir) -> IndexedSource:
    path = write_jsonl(data_dir / "pref.jsonl", PREF_RECORDS)
    ds = builders.prepare("preference", path, data_dir / "pref")
    return IndexedSource(ds.source("train"))


@pytest.fixture(scope="module")
def text_source() -> IndexedSource:
    return IndexedSource(builders.load("bundled:pretrain.jsonl").source("train"))


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny")
    assert config.dtype == "float32" and config.param_dtype == "float32"
    params = init_params(config, jax.random.key(0))
    return config, params, jax.jit(forward, static_argnums=0)


# ----- one example --------------------------------------------------------------------

LOSS_MASK_CASES = [
    ("\n\nHuman: How do I cook dried beans?", "Soak them overnight, then simmer."),
    (
        "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.",
        "Blue, like the sky.",
    ),
    ("\n\nHuman: Quote the sign.", "Café naïve — déjà vu 😀 at 12:30."),
    ("\n\nHuman: Start with a space?", "Assistant: no, just text."),
]


@pytest.mark.parametrize("prompt,response", LOSS_MASK_CASES)
def test_sft_loss_mask_covers_exactly_response_and_eos(tok, prompt, response):
    text = f"{prompt}{ASSISTANT} {response}"
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    enc = tok.encode_conversation(text, add_bos=True, add_eos=True)
    assert enc.ids == ids
    start = enc.spans[-1].start  # first token of the response
    assert enc.spans[-1].role == "Assistant" and enc.spans[-1].end == len(ids) - 1

    raw = {"prompt": prompt.encode(), "response": response.encode(), "source": b"t.jsonl:1"}
    out = encode_example(raw, tok, Layout(kind="sft", max_len=256))
    assert set(out) == {"tokens", "targets", "mask"}
    for key in ("tokens", "targets", "mask"):
        assert out[key].dtype == np.int32 and out[key].shape == (len(ids) - 1,), key
    np.testing.assert_array_equal(out["tokens"], ids[:-1])
    np.testing.assert_array_equal(out["targets"], ids[1:])
    np.testing.assert_array_equal(out["tokens"][1:], out["targets"][:-1])

    # Target t is ids[t + 1]: the prompt's targets (ids[1:start]) are all out of the loss.
    np.testing.assert_array_equal(out["mask"][: start - 1], 0)
    np.testing.assert_array_equal(out["mask"][start - 1 :], 1)
    learned = out["targets"][out["mask"] == 1]
    assert learned.tolist() == ids[start:]
    assert learned[-1] == tok.eos_id
    assert tok.decode(learned[:-1].tolist()) == response
    assert learned[:-1].tolist() == tok.encode(response)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    from hf_fixtures import qwen2_dir

    from jaxcai import chat

    return chat.load(qwen2_dir(tmp_path_factory.mktemp("chatml")))


def test_template_sft_example_masks_only_the_response_and_its_end_of_turn(chatml):
    """With a checkpoint's template, an SFT row is its rendering up to the response's
    `<|im_end|>`; only the response and that token are learned."""
    tok = chatml.tokenizer
    prompt = "\n\nSystem: Be brief.\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: A joke?"
    response = "Why did the 日本 cross? 🌿"
    raw = {"prompt": prompt, "response": response, "source": "t.jsonl:1"}
    out = encode_example(raw, chatml, Layout(kind="sft", max_len=256))
    ids = [*out["tokens"].tolist(), int(out["targets"][-1])]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A joke?"},
        {"role": "assistant", "content": response},
    ]
    rendered = chatml.render(messages)
    assert rendered.endswith("<|im_end|>\n")
    assert tok.decode(ids) == rendered[: -len("\n")]  # ends at the end-of-turn token
    learned = out["targets"][out["mask"] == 1].tolist()
    assert tok.decode(learned) == response + "<|im_end|>"
    first = int(np.argmax(out["mask"]))
    assert out["mask"][first:].all() and not out["mask"][:first].any()
    # Truncation keeps the prompt's end and never a BOS the format does not use.
    short = encode_example(raw, chatml, Layout(kind="sft", max_len=24, max_prompt_len=8))
    kept = [*short["tokens"].tolist(), int(short["targets"][-1])]
    start = first + 1  # ids[start:] is the response and its end-of-turn
    keep = min(start, max(25 - (len(ids) - start), 8))
    assert len(kept) == 25 and kept == ids[start - keep : start] + ids[start:][: 25 - keep]


# ----- truncation ---------------------------------------------------------------------

LONG_PROMPT = "\n\nHuman: " + " ".join(f"{w} {i}" for i, w in enumerate(WORDS * 2))
SHORT_PROMPT = "\n\nHuman: Tell me more."
SHORT_RESPONSE = "Sure, here it is."
LONG_RESPONSE = " ".join(f"{w}-{i}" for i, w in enumerate(reversed(WORDS * 2))) + "."


def truncated(tok, prompt, response, layout) -> tuple[list[int], dict]:
    """The example's full ids (tokens + last target) and its encoding."""
    raw = {"prompt": prompt, "response": response, "source": "long.jsonl:7"}
    out = encode_example(raw, tok, layout)
    np.testing.assert_array_equal(out["tokens"][1:], out["targets"][:-1])
    return [*out["tokens"].tolist(), int(out["targets"][-1])], out


def test_truncation_keeps_prompt_end_when_response_fits(tok):
    layout = Layout(kind="sft", max_len=64)
    ids, start = conversation_ids(tok, LONG_PROMPT, SHORT_RESPONSE)
    prompt_ids, response_ids = ids[:start], ids[start:]
    assert len(prompt_ids) > 100 and len(response_ids) < 10  # premise
    kept = 65 - len(response_ids) - 1  # prompt tokens after bos
    got, out = truncated(tok, LONG_PROMPT, SHORT_RESPONSE, layout)
    assert got == [tok.bos_id, *prompt_ids[-kept:], *response_ids]
    assert len(got) == 65 and got[-1] == tok.eos_id
    assert out["targets"][out["mask"] == 1].tolist() == response_ids
    assert tok.decode(out["targets"][out["mask"] == 1][:-1].tolist()) == SHORT_RESPONSE


def test_truncation_keeps_response_start_when_prompt_is_short(tok):
    layout = Layout(kind="sft", max_len=64)
    ids, start = conversation_ids(tok, SHORT_PROMPT, LONG_RESPONSE)
    prompt_ids, response_ids = ids[:start], ids[start:]
    assert len(prompt_ids) < 32 and len(response_ids) > 100  # premise
    got, out = truncated(tok, SHORT_PROMPT, LONG_RESPONSE, layout)
    assert got == prompt_ids + response_ids[: 65 - len(prompt_ids)]
    assert len(got) == 65 and tok.eos_id not in got
    np.testing.assert_array_equal(out["mask"][: len(prompt_ids) - 1], 0)
    np.testing.assert_array_equal(out["mask"][len(prompt_ids) - 1 :], 1)


@pytest.mark.parametrize("max_prompt_len,budget", [(20, 20), (None, 32)])
def test_truncation_of_both_keeps_max_prompt_len(tok, max_prompt_len, budget):
    layout = Layout(kind="sft", max_len=64, max_prompt_len=max_prompt_len)
    ids, start = conversation_ids(tok, LONG_PROMPT, LONG_RESPONSE)
    prompt_ids, response_ids = ids[:start], ids[start:]
    got, out = truncated(tok, LONG_PROMPT, LONG_RESPONSE, layout)
    assert len(got) == 65
    assert got[:budget] == [tok.bos_id, *prompt_ids[-(budget - 1) :]]
    assert got[budget:] == response_ids[: 65 - budget]
    # The loss starts at the first response token (target index budget - 1).
    assert int(np.argmax(out["mask"])) == budget - 1 and out["mask"][budget - 1 :].all()


def test_fitting_example_is_never_truncated(tok):
    ids, _ = conversation_ids(tok, LONG_PROMPT, SHORT_RESPONSE)
    for truncate in (True, False):
        exact = Layout(kind="sft", max_len=len(ids) - 1, truncate=truncate)  # fits exactly
        got, _ = truncated(tok, LONG_PROMPT, SHORT_RESPONSE, exact)
        assert got == ids
    with pytest.raises(DataError) as info:
        encode_example(
            {"prompt": LONG_PROMPT, "response": SHORT_RESPONSE, "source": "long.jsonl:7"},
            tok,
            Layout(kind="sft", max_len=len(ids) - 2, truncate=False),
        )
    assert "long.jsonl:7" in str(info.value) and info.value.reason == "too_long"


def test_over_long_example_without_truncation_names_its_source(tok):
    layout = Layout(kind="preference", max_len=64, truncate=False)
    raw = {
        "prompt": SHORT_PROMPT.encode(),
        "chosen": SHORT_RESPONSE.encode(),
        "rejected": LONG_RESPONSE.encode(),
        "source": b"/data/prefs.jsonl:42",
        "p_chosen": np.float32(0.7),
    }
    with pytest.raises(DataError, match="too_long|max_len") as info:
        encode_example(raw, tok, layout)
    assert "/data/prefs.jsonl:42" in str(info.value)
    assert info.value.reason == "too_long"


# ----- packing ------------------------------------------------------------------------


def test_packed_rows_equal_examples_run_alone(tok, sft_source, tiny):
    """The key check: in a packed batch every example gets the log-probs it gets alone,
    so packing changes nothing but speed."""
    config, params, fwd = tiny
    layout = Layout(kind="sft", max_len=64, pack=True)
    encoded = [encode_example(sft_source[i], tok, layout) for i in range(len(sft_source))]
    it = train_iterator(sft_source, tok, layout, rows_per_batch=4, seed=0, shuffle=False)

    seen, packed_logps, per_row = [], [], []
    for batch in take(it, 2):
        assert {k: v.shape for k, v in batch.items()} == {
            **{k: (4, 64) for k in ("tokens", "targets", "mask", "segment_ids", "positions")},
            "weight": (4,),
        }
        np.testing.assert_array_equal(batch["weight"], 1.0)
        logits = fwd(
            config,
            params,
            jnp.asarray(batch["tokens"]),
            segment_ids_BT=jnp.asarray(batch["segment_ids"]),
            positions_BT=jnp.asarray(batch["positions"]),
        )
        logps = np.asarray(token_logps(logits, jnp.asarray(batch["targets"])))
        in_batch = []
        for r in range(4):
            row = {k: v[r] for k, v in batch.items() if k != "weight"}
            pad = row["segment_ids"] == 0
            n = int((~pad).sum())
            assert not pad[:n].any()  # padding only at the end of a row
            np.testing.assert_array_equal(row["mask"][pad], 0)
            ids = row["segment_ids"][:n]
            assert ids[0] == 1 and set(np.diff(ids).tolist()) <= {0, 1}  # 1, 2, ... in order
            per_row.append(int(ids.max()))
            for s, seg in enumerate(segments(row), start=1):
                j = identify(seg["tokens"], encoded)
                for key in ("targets", "mask"):
                    np.testing.assert_array_equal(seg[key], encoded[j][key])
                np.testing.assert_array_equal(seg["positions"], np.arange(len(seg["tokens"])))
                in_batch.append(j)
                packed_logps.append(logps[r][(row["segment_ids"] == s) & (row["mask"] == 1)])
        assert batch["mask"].sum() == sum(int(encoded[j]["mask"].sum()) for j in in_batch)
        seen += in_batch

    assert max(per_row) > 1, per_row  # packing happened
    assert len(seen) > 8
    # First-fit packing of an in-order stream: the two batches hold a prefix of the
    # examples, each exactly once (none dropped, none repeated).
    assert sorted(seen) == list(range(len(seen)))

    alone = pad_rows([encoded[j] for j in seen], layout, tok.pad_id, length=64)
    np.testing.assert_array_equal(alone["segment_ids"].max(axis=1), 1)
    logits = fwd(config, params, jnp.asarray(alone["tokens"]))  # no segment ids: one each
    targets = jnp.asarray(alone["targets"])
    alone_logps = np.asarray(token_logps(logits, targets))
    sums, counts = sequence_logps(logits, targets, jnp.asarray(alone["mask"]))
    for i, j in enumerate(seen):
        want = alone_logps[i][alone["mask"][i] == 1]
        assert len(want) == len(packed_logps[i]) == int(counts[i])
        np.testing.assert_allclose(packed_logps[i], want, rtol=0, atol=2e-5, err_msg=f"ex {j}")
        np.testing.assert_allclose(packed_logps[i].sum(), float(sums[i]), rtol=1e-5, atol=1e-5)


def test_unpacked_sft_rows_hold_one_example_each(tok, sft_source):
    layout = Layout(kind="sft", max_len=64, pack=False)
    it = train_iterator(sft_source, tok, layout, rows_per_batch=4, seed=0, shuffle=False)
    batch = next(it)
    for r in range(4):
        want = encode_example(sft_source[r], tok, layout)
        n = len(want["tokens"])
        for key in ("tokens", "targets", "mask"):
            np.testing.assert_array_equal(batch[key][r, :n], want[key])
        np.testing.assert_array_equal(batch["tokens"][r, n:], tok.pad_id)
        np.testing.assert_array_equal(batch["mask"][r, n:], 0)
        np.testing.assert_array_equal(batch["segment_ids"][r], np.arange(64) < n)
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))


# ----- preference rows and padding ----------------------------------------------------


def pair_lengths(tok, record: dict) -> tuple[int, int]:
    """Row tokens (ids - 1) of the chosen and rejected sequences, at most 64."""
    prompt = transcript(record["prompt"])
    return tuple(
        min(64, len(tok.encode(f"{prompt}{ASSISTANT} {record[side]}")) + 1)
        for side in ("chosen", "rejected")
    )


@pytest.mark.parametrize("pad", ["bucket", "fixed"])
def test_preference_rows_share_a_length_and_carry_p_chosen(tok, pref_source, pad):
    layout = Layout(kind="preference", max_len=64, pad=pad, buckets=(16, 32, 64))
    it = train_iterator(pref_source, tok, layout, rows_per_batch=2, seed=0, shuffle=False)
    lengths = set()
    for b, batch in enumerate(take(it, 3)):
        records = PREF_RECORDS[2 * b : 2 * b + 2]
        assert set(batch) == {"chosen", "rejected", "p_chosen", "weight"}
        np.testing.assert_array_equal(
            batch["p_chosen"], np.asarray([r["p_chosen"] for r in records], np.float32)
        )
        assert batch["p_chosen"].dtype == np.float32
        np.testing.assert_array_equal(batch["weight"], 1.0)
        longest = max(max(pair_lengths(tok, r)) for r in records)
        want = 64 if pad == "fixed" else min(x for x in (16, 32, 64) if x >= longest)
        lengths.add(want)
        for side in ("chosen", "rejected"):
            rows = batch[side]
            assert set(rows) == {"tokens", "targets", "mask", "segment_ids", "positions"}
            assert all(v.shape == (2, want) for v in rows.values()), (side, want)
            for i, record in enumerate(records):
                n = pair_lengths(tok, record)[side == "rejected"]
                prompt = transcript(record["prompt"])
                ids, start = conversation_ids(tok, prompt, record[side])
                np.testing.assert_array_equal(rows["tokens"][i, :n], ids[:n])
                np.testing.assert_array_equal(rows["tokens"][i, n:], tok.pad_id)
                np.testing.assert_array_equal(rows["segment_ids"][i], np.arange(want) < n)
                learned = rows["targets"][i][rows["mask"][i] == 1]
                assert learned.tolist() == ids[start : n + 1]
    if pad == "bucket":
        assert lengths == {32, 64}, lengths  # the data hits two buckets
    else:
        assert lengths == {64}


def fake_example(n: int) -> dict[str, np.ndarray]:
    ids = np.arange(10, 11 + n, dtype=np.int32)
    return {"tokens": ids[:-1], "targets": ids[1:], "mask": np.ones(n, np.int32)}


def test_bucket_padding_picks_the_smallest_bucket_that_fits(tok):
    bucket = Layout(kind="sft", max_len=64, pad="bucket", buckets=(16, 32, 64))
    fixed = Layout(kind="sft", max_len=64, pad="fixed", buckets=(16, 32, 64))
    assert bucket.bucket_lengths() == (16, 32, 64) and fixed.bucket_lengths() == (64,)
    expected = {1: 16, 15: 16, 16: 16, 17: 32, 32: 32, 33: 64, 64: 64}
    for longest, want in expected.items():
        rows = pad_rows([fake_example(3), fake_example(longest)], bucket, tok.pad_id)
        assert rows["tokens"].shape == (2, want), longest
        assert pad_rows([fake_example(longest)], fixed, tok.pad_id)["tokens"].shape == (1, 64)
    # Buckets past max_len are dropped and max_len is always one; default: powers of two.
    assert Layout("sft", 48, pad="bucket", buckets=(8, 64, 16)).bucket_lengths() == (8, 16, 48)
    assert Layout("sft", 300, pad="bucket").bucket_lengths() == (64, 128, 256, 300)


def test_repad_extends_rows_with_padding(tok):
    layout = Layout(kind="preference", max_len=64, pad="bucket", buckets=(16, 32, 64))
    pair = {"chosen": fake_example(5), "rejected": fake_example(12), "p_chosen": np.float32(1)}
    rows = pad_rows([pair], layout, pad_id=0)
    assert rows["chosen"]["tokens"].shape == (1, 16)
    longer = repad(rows, 32, pad_id=7)
    for side in ("chosen", "rejected"):
        for key, value in longer[side].items():
            assert value.shape == (1, 32)
            np.testing.assert_array_equal(value[:, :16], rows[side][key])
            np.testing.assert_array_equal(value[:, 16:], 7 if key in ("tokens", "targets") else 0)
    np.testing.assert_array_equal(longer["p_chosen"], rows["p_chosen"])
    np.testing.assert_array_equal(longer["weight"], rows["weight"])


# ----- text ---------------------------------------------------------------------------


def test_text_rows_are_full_and_lose_no_token(tok, text_source):
    layout = Layout(kind="text", max_len=64)
    it = train_iterator(text_source, tok, layout, rows_per_batch=2, seed=0, shuffle=False)
    batches = take(it, 4)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k != "weight"}
    assert rows["tokens"].shape == (8, 64)
    assert (rows["segment_ids"] > 0).all()  # full rows, no padding
    np.testing.assert_array_equal(rows["mask"], 1)

    # The documents' bos + text ids, concatenated, in order.
    docs = [tok.encode(as_str(text_source[i]["text"]), add_bos=True) for i in range(12)]
    stream = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    next_ids = np.concatenate([[*d[1:], tok.eos_id] for d in docs])
    assert len(stream) > 8 * 64  # premise: the rows come from these documents
    np.testing.assert_array_equal(rows["tokens"].reshape(-1), stream[: 8 * 64])
    np.testing.assert_array_equal(rows["targets"].reshape(-1), next_ids[: 8 * 64])

    for r in range(8):
        docs_here = doc_of[r * 64 : (r + 1) * 64]
        want_ids = docs_here - docs_here[0] + 1  # segments restart at 1 in every row
        np.testing.assert_array_equal(rows["segment_ids"][r], want_ids, err_msg=f"row {r}")
        starts = np.r_[0, np.flatnonzero(np.diff(docs_here)) + 1]
        want_pos = np.arange(64) - starts[np.searchsorted(starts, np.arange(64), "right") - 1]
        np.testing.assert_array_equal(rows["positions"][r], want_pos, err_msg=f"row {r}")
    assert rows["segment_ids"].max() > 1  # some row holds a document boundary


# ----- determinism and resume ---------------------------------------------------------

KIND_LAYOUTS = {
    "sft_packed": Layout(kind="sft", max_len=64, pack=True),
    "preference": Layout(kind="preference", max_len=64, pad="bucket", buckets=(16, 32, 64)),
    "text": Layout(kind="text", max_len=64),
}


@pytest.fixture
def kind_source(sft_source, pref_source, text_source):
    return {"sft_packed": sft_source, "preference": pref_source, "text": text_source}


@pytest.mark.parametrize("kind", list(KIND_LAYOUTS))
def test_iterator_is_deterministic_and_resumes_on_the_next_batch(tok, kind_source, kind):
    source, layout = kind_source[kind], KIND_LAYOUTS[kind]
    make = lambda seed: train_iterator(source, tok, layout, rows_per_batch=4, seed=seed)

    first, again, other = take(make(3), 5), take(make(3), 5), take(make(4), 5)
    assert all(trees_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(trees_equal(a, b) for a, b in zip(first, other, strict=True))

    it = make(3)
    take(it, 3)
    state = it.get_state()
    expected = next(it)
    assert trees_equal(expected, first[3])
    for saved in (state, json_round_trip(state)):
        fresh = make(3)
        fresh.set_state(saved)
        assert trees_equal(next(fresh), expected)
        assert trees_equal(next(fresh), first[4])


def test_text_iterator_resumes_from_json_state_at_every_row(tok, text_source):
    """A checkpoint stores the state as JSON; resuming must give the exact next row
    wherever the run stopped (including rows that start a fresh document)."""
    layout = Layout(kind="text", max_len=64)
    make = lambda: train_iterator(text_source, tok, layout, rows_per_batch=1, seed=0, shuffle=False)
    it = make()
    states, rows = [], []
    for _ in range(160):
        states.append(it.get_state())
        rows.append(next(it))
    wrong = []
    for k, state in enumerate(states):
        fresh = make()
        fresh.set_state(json_round_trip(state))
        if not trees_equal(next(fresh), rows[k]):
            wrong.append(k)
    assert wrong == []


# ----- sharding -----------------------------------------------------------------------


def test_shards_are_disjoint_and_cover_each_epoch(tok, sft_source):
    n = len(sft_source)
    assert n % 2 == 0
    layout = Layout(kind="sft", max_len=64, pack=False)
    encoded = [encode_example(sft_source[i], tok, layout) for i in range(n)]

    def examples(shard: int, count: int) -> list[int]:
        it = train_iterator(
            sft_source, tok, layout, rows_per_batch=1, seed=5, shard_index=shard, shard_count=2
        )
        out = []
        for batch in take(it, count):
            assert batch["tokens"].shape == (1, 64)
            out.append(identify(batch["tokens"][0][batch["segment_ids"][0] > 0], encoded))
        return out

    zero, one = examples(0, n), examples(1, n)
    half = n // 2
    for epoch in (slice(0, half), slice(half, n)):
        assert not set(zero[epoch]) & set(one[epoch])
        assert sorted(zero[epoch] + one[epoch]) == list(range(n))
    assert zero[:half] != zero[half:]  # every epoch its own permutation
    assert sorted(zero[:half] + one[:half]) != zero[:half] + one[:half]  # shuffled

    with pytest.raises(DataError, match="cannot feed"):
        train_iterator(sft_source, tok, layout, rows_per_batch=1, seed=0, shard_count=n + 1)


def test_data_shard_on_one_device():
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    assert data_shard(8, 2, mesh) == (0, 1)
    assert data_shard(4, 1, mesh) == (0, 1)


# ----- random access rows -------------------------------------------------------------


def test_eval_index_batches_pad_the_last_batch():
    got = [b.tolist() for b in eval_index_batches(10, 4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, EMPTY, EMPTY]]
    assert [b.tolist() for b in eval_index_batches(8, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [b.tolist() for b in eval_index_batches(10, 4, limit=2)] == got[:2]
    assert [b.tolist() for b in eval_index_batches(3, 4)] == [[0, 1, 2, EMPTY]]


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_rows_take_empty_indices_as_zero_weight(tok, sft_source, pref_source, kind):
    source = sft_source if kind == "sft" else pref_source
    layout = Layout(kind=kind, max_len=64, pad="bucket", buckets=(16, 32, 64))
    mapped = MapRows(source, tok, layout)
    in_memory = eval_rows(source, tok, layout)
    assert isinstance(in_memory, ArrayRows)
    assert len(mapped) == len(in_memory) == len(source)
    indices = np.array([[2, EMPTY, 0], [EMPTY, 1, EMPTY]])
    for rows in (mapped, in_memory):
        got = rows.take(indices)
        np.testing.assert_array_equal(got["weight"], indices != EMPTY)
        sides = [got] if kind == "sft" else [got["chosen"], got["rejected"]]
        for side_i, side in enumerate(sides):
            for key in ("tokens", "targets", "mask", "segment_ids", "positions"):
                assert side[key].shape == (2, 3, 64), key  # eval rows: max_len, unbucketed
            assert not side["mask"][indices == EMPTY].any()
            for (a, b), i in np.ndenumerate(indices):
                if i == EMPTY:
                    continue
                want = encode_example(source[int(i)], tok, layout)
                if kind == "preference":
                    want = want[("chosen", "rejected")[side_i]]
                n = len(want["tokens"])
                for key in ("tokens", "targets", "mask"):
                    np.testing.assert_array_equal(side[key][a, b, :n], want[key])
                assert side["mask"][a, b].sum() > 0
        if kind == "preference":
            p = np.asarray([r["p_chosen"] for r in PREF_RECORDS], np.float32)
            valid = indices != EMPTY
            np.testing.assert_array_equal(got["p_chosen"][valid], p[indices[valid]])


def test_text_eval_rows_hold_every_token_once(tok, text_source):
    source = IndexedSource(text_source.source, np.arange(20))
    rows = eval_rows(source, tok, Layout(kind="text", max_len=64))
    docs = [tok.encode(as_str(source[i]["text"]), add_bos=True) for i in range(20)]
    total = sum(len(d) for d in docs)
    assert len(rows) == -(-total // 64)
    arrays = rows.take(np.arange(len(rows)))
    assert arrays["mask"].sum() == total  # one loss term per token, bos..last, none twice
    real = arrays["segment_ids"] > 0
    np.testing.assert_array_equal(arrays["tokens"][real], np.concatenate(docs))
    np.testing.assert_array_equal(arrays["mask"], real)
    empty = rows.take(np.array([0, EMPTY]))
    assert empty["weight"].tolist() == [1.0, 0.0] and not empty["mask"][1].any()


def test_indexed_source_views_a_subset(sft_source):
    view = IndexedSource(sft_source.source, np.array([5, 2, 9]))
    assert len(view) == 3
    assert [view[i]["index"] for i in range(3)] == [0, 1, 2]
    assert [as_str(view[i]["response"]) for i in range(3)] == [
        as_str(sft_source[j]["response"]) for j in (5, 2, 9)
    ]


# ----- training_data ------------------------------------------------------------------


def data_config(**overrides):
    cfg = {
        "train": "bundled:sft.jsonl",
        "eval": None,
        "eval_fraction": 0.1,
        "format": "jsonl",
        "max_len": 64,
        "max_prompt_len": None,
        "truncate": True,
        "pack": True,
        "pad": "fixed",
        "buckets": [],
        "skip_invalid": False,
    }
    return OmegaConf.create({**cfg, **overrides})


@pytest.fixture(scope="module")
def bundled_sft(tok):
    """(source strings, full token counts) of every bundled sft record, in file order."""
    ds = builders.load("bundled:sft.jsonl")
    records = list(ds.records())
    lengths = [len(tok.encode(f"{r['prompt']}{ASSISTANT} {r['response']}")) + 2 for r in records]
    return [r["source"] for r in records], lengths


def test_training_data_holds_out_a_disjoint_eval_split(tok, bundled_sft):
    sources, _ = bundled_sft
    n = len(sources)
    data = training_data(data_config(), "sft", tok, seed=0)
    assert data.layout == Layout(kind="sft", max_len=64, pack=True, pad="fixed")
    assert len(data.eval) == round(0.1 * n) and len(data.train) == n - len(data.eval)
    train = [as_str(data.train[i]["source"]) for i in range(len(data.train))]
    held = [as_str(data.eval[i]["source"]) for i in range(len(data.eval))]
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(sources) and len(set(sources)) == n
    assert [data.train[i]["index"] for i in range(3)] == [0, 1, 2]  # view positions
    other = training_data(data_config(), "sft", tok, seed=1)
    assert sorted(other.eval.indices.tolist()) != sorted(data.eval.indices.tolist())
    with pytest.raises(DataError, match="'sft' dataset"):
        training_data(data_config(), "dpo", tok, seed=0)


def test_training_data_skips_or_rejects_over_long_examples(tok, bundled_sft):
    sources, lengths = bundled_sft
    max_len = 88
    too_long = [s for s, n in zip(sources, lengths, strict=True) if n > max_len + 1]
    assert 0 < len(too_long) < len(sources)  # premise

    cfg = data_config(max_len=max_len, truncate=False, skip_invalid=True)
    data = training_data(cfg, "sft", tok, seed=0)
    assert dict(data.skipped) == {"too_long": len(too_long)}
    kept = [as_str(view[i]["source"]) for view in (data.train, data.eval) for i in range(len(view))]
    assert sorted(kept) == sorted(set(sources) - set(too_long))

    # Without skipping: the first over-long example in train order is named by file:line.
    split = training_data(data_config(), "sft", tok, seed=0)  # same seed, same split
    order = [sources[i] for i in split.train.indices]
    first = next(s for s in order if s in set(too_long))
    line = int(first.rsplit(":", 1)[1])
    with pytest.raises(DataError) as info:
        training_data(data_config(max_len=max_len, truncate=False), "sft", tok, seed=0)
    assert info.value.reason == "too_long"
    assert re.search(rf"sft\.jsonl:{line}\b", str(info.value)), (str(info.value), line)


# ----- global batches on a mesh -------------------------------------------------------


def test_global_batches_on_eight_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["mesh"] for r in results] == ["d4f2", "data8"]
    leaves = {
        "['chosen']['tokens']": ([2, 8, 8], "int32"),
        "['chosen']['mask']": ([2, 8, 8], "int32"),
        "['rejected']['tokens']": ([2, 8, 8], "int32"),
        "['rejected']['mask']": ([2, 8, 8], "int32"),
        "['p_chosen']": ([2, 8], "float32"),
        "['weight']": ([2, 8], "float32"),
    }
    for r in results:
        assert r["data_shard"] == [0, 1], r["mesh"]
        for what in ("from_local_rows", "global_batch"):
            assert r[what].keys() == leaves.keys()
            for path, (shape, dtype) in leaves.items():
                leaf = r[what][path]
                assert leaf["equal"], (r["mesh"], what, path)
                assert (leaf["shape"], leaf["dtype"]) == (shape, dtype)
                batch_spec = "None, ('data', 'fsdp')" + (", None" if len(shape) == 3 else "")
                assert leaf["spec"] == f"P({batch_spec})", (r["mesh"], what, path)
                # 8 devices, 8 rows per micro-batch: each holds its own one, correctly.
                assert [s["rows"] for s in leaf["shards"]] == [[i, i + 1] for i in range(8)]
                assert all(s["holds"] for s in leaf["shards"])


# ----- worker processes ---------------------------------------------------------------


@contextlib.contextmanager
def absl_flags(parsed: bool):
    """absl flags parsed (or not) for the block, as they were afterwards."""
    was = flags.FLAGS.is_parsed()
    if parsed and not was:
        flags.FLAGS.mark_as_parsed()
    elif not parsed and was:
        flags.FLAGS.unparse_flags()
    try:
        yield
    finally:
        if was and not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        elif not was and flags.FLAGS.is_parsed():
            flags.FLAGS.unparse_flags()


def close(it) -> None:
    if hasattr(it, "close"):
        it.close()


@pytest.mark.parametrize("kind", ["sft_packed", "text"])
def test_worker_processes_yield_the_same_batches(tok, kind_source, kind):
    source, layout = kind_source[kind], KIND_LAYOUTS[kind]
    make = lambda workers: train_iterator(
        source, tok, layout, rows_per_batch=4, seed=2, workers=workers
    )
    expected = take(make(0), 3)
    with absl_flags(parsed=True):  # see the xfail below: grain reads an absl flag
        it = make(1)
        try:
            got = take(it, 3)
        finally:
            close(it)
    assert all(trees_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_worker_processes_work_without_absl_flags(tok, sft_source):
    layout = KIND_LAYOUTS["sft_packed"]
    with absl_flags(parsed=False):
        it = train_iterator(sft_source, tok, layout, rows_per_batch=4, seed=2, workers=1)
        try:
            got = next(it)
        finally:
            close(it)
    expected = next(train_iterator(sft_source, tok, layout, rows_per_batch=4, seed=2))
    assert trees_equal(got, expected)


def test_indexed_source_fingerprint_names_the_records():
    """DPO's cached reference log-probs are keyed by this: same records, same key."""
    src = list(range(10))
    a = IndexedSource(src, np.array([1, 2, 3]), "data/x:train")
    assert a.fingerprint == IndexedSource(src, np.array([1, 2, 3]), "data/x:train").fingerprint
    assert a.fingerprint != IndexedSource(src, np.array([1, 2, 4]), "data/x:train").fingerprint
    assert a.fingerprint != IndexedSource(src, np.array([1, 2, 3]), "data/y:train").fingerprint
    assert IndexedSource(src).fingerprint != IndexedSource(src[:9]).fingerprint
