"""JSONL records -> token arrays, bad-record reporting, splits and global batches."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcai.data.batches import EMPTY, epoch_stream_indices, eval_index_batches, global_batch
from jaxcai.data.jsonl import DataError, Dataset, load_dataset
from jaxcai.sharding import MeshConfig, make_mesh
from jaxcai.tokenizer import Tokenizer, format_conversation

ROW_KEYS = {"tokens", "targets", "mask", "segment_ids"}
SFT = [
    {"prompt": "What is two plus two?", "response": "Four, I think."},
    {"prompt": "Name a color.", "response": "Blue."},
    {"prompt": "Say hi.", "response": "Hello there, nice to meet you!"},
]
PREFS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
    {"prompt": "Help me?", "chosen": "Of course, what do you need?", "rejected": "Go away."},
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Short one.",
    "A third document that is a little longer than the others, to cross rows.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def check_row_layout(row: dict, ids: list[int], pad_id: int) -> None:
    """One unpacked sequence: inputs ids[:-1], targets ids[1:], then padding."""
    n = len(ids) - 1
    np.testing.assert_array_equal(row["tokens"][:n], ids[:-1])
    np.testing.assert_array_equal(row["targets"][:n], ids[1:])
    assert (row["tokens"][n:] == pad_id).all() and (row["targets"][n:] == pad_id).all()
    assert (row["segment_ids"][:n] == 1).all() and (row["segment_ids"][n:] == 0).all()
    assert (row["mask"][n:] == 0).all()


def masked_response(tok: Tokenizer, row: dict) -> tuple[str, int]:
    """The text of the loss-masked targets (without the final id) and that final id."""
    ids = row["targets"][row["mask"] == 1].tolist()
    return tok.decode(ids[:-1]), ids[-1]


# ----- shapes, dtypes, masks ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, objective, n",
    [
        ("bundled:sft.jsonl", "sft", 240),
        ("bundled:preferences.jsonl", "rm", 400),
        ("bundled:preferences.jsonl", "dpo", 400),
        ("bundled:pretrain.jsonl", "lm", None),
    ],
)
def test_bundled_shapes_and_dtypes(tok, spec, objective, n):
    ds = load_dataset(spec, objective, tok, 128)
    assert ds.skipped == collections.Counter()
    assert ds.source.endswith(spec.split(":")[1])
    if objective in ("rm", "dpo"):
        assert set(ds.arrays) == {"chosen", "rejected", "p_chosen"}
        rows = [ds.arrays["chosen"], ds.arrays["rejected"]]
        assert ds.arrays["p_chosen"].shape == (n,) and ds.arrays["p_chosen"].dtype == np.float32
        p = ds.arrays["p_chosen"]
        assert ((p >= 0) & (p <= 1)).all()
    else:
        rows = [ds.arrays]
    for arrays in rows:
        assert set(arrays) == ROW_KEYS
        for key in ROW_KEYS:
            assert arrays[key].dtype == np.int32, key
            assert arrays[key].shape == (len(ds), 128), key
        assert set(np.unique(arrays["mask"])) <= {0, 1}
        assert (arrays["mask"] <= (arrays["segment_ids"] > 0)).all()  # no loss on padding
        assert (arrays["mask"].sum(-1) > 0).all()
    if n is not None:
        assert len(ds) == n


def test_sft_mask_covers_response_and_eos(tok, tmp_path):
    ds = load_dataset(str(write_jsonl(tmp_path / "sft.jsonl", SFT)), "sft", tok, 40)
    assert len(ds) == len(SFT)
    for i, record in enumerate(SFT):
        row = {k: v[i] for k, v in ds.arrays.items()}
        text = format_conversation([("Human", record["prompt"]), ("Assistant", record["response"])])
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        check_row_layout(row, ids, tok.pad_id)
        response, last = masked_response(tok, row)
        assert response == record["response"]
        assert last == tok.eos_id
        # The mask is one block that ends at the eos target.
        on = np.flatnonzero(row["mask"])
        np.testing.assert_array_equal(on, np.arange(on[0], len(ids) - 1))
        # The prompt part (up to "Assistant:") carries no loss.
        prompt_text = tok.decode(row["targets"][: on[0]].tolist())
        assert prompt_text.endswith("Assistant:")
        assert record["prompt"] in prompt_text


def test_preference_rows(tok, tmp_path):
    records = [dict(PREFS[0], p_chosen=0.75), PREFS[1]]
    path = write_jsonl(tmp_path / "prefs.jsonl", records)
    ds = load_dataset(str(path), "dpo", tok, 40)
    np.testing.assert_allclose(ds.arrays["p_chosen"], [0.75, 1.0])
    for i, record in enumerate(records):
        for side in ("chosen", "rejected"):
            row = {k: v[i] for k, v in ds.arrays[side].items()}
            text = format_conversation([("Human", record["prompt"]), ("Assistant", record[side])])
            check_row_layout(row, [tok.bos_id, *tok.encode(text), tok.eos_id], tok.pad_id)
            assert masked_response(tok, row) == (record[side], tok.eos_id)


def test_prompt_as_conversation_ending_with_human(tok, tmp_path):
    prompt = format_conversation(
        [("Human", "Hi there."), ("Assistant", "Hello! How can I help?"), ("Human", "Tell a joke.")]
    )
    assert prompt.endswith("\n\nHuman: Tell a joke.")
    record = {"prompt": prompt, "response": "Why did the chicken cross the road?"}
    ds = load_dataset(str(write_jsonl(tmp_path / "multi.jsonl", [record])), "sft", tok, 64)
    row = {k: v[0] for k, v in ds.arrays.items()}
    text = prompt + "\n\nAssistant: " + record["response"]
    check_row_layout(row, [tok.bos_id, *tok.encode(text), tok.eos_id], tok.pad_id)
    # Only the final Assistant turn is trained on, not the earlier one.
    assert masked_response(tok, row) == (record["response"], tok.eos_id)


def test_packed_text_keeps_documents_apart(tok, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    max_len = 16
    ds = load_dataset(str(path), "lm", tok, max_len)
    docs = [tok.encode(t, add_bos=True, add_eos=True) for t in TEXTS]
    stream = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    a = ds.arrays
    assert len(ds) == -(-(len(stream) - 1) // max_len)  # ceil: every (input, target) pair once
    for r in range(len(ds)):
        start = r * max_len
        n = min(max_len, len(stream) - 1 - start)
        np.testing.assert_array_equal(a["tokens"][r, :n], stream[start : start + n])
        np.testing.assert_array_equal(a["targets"][r, :n], stream[start + 1 : start + n + 1])
        assert (a["segment_ids"][r, n:] == 0).all() and (a["mask"][r, n:] == 0).all()
        same_doc = doc_of[start : start + n] == doc_of[start + 1 : start + n + 1]
        # Loss exactly on targets of the input token's own document...
        np.testing.assert_array_equal(a["mask"][r, :n], same_doc)
        # ...never on a document's first token (predicted from the previous one's eos).
        assert not (a["mask"][r] * (a["targets"][r] == tok.bos_id)).any()
        # Segments: 1, 2, ... per document in the row, so attention stays inside one.
        seg = a["segment_ids"][r, :n]
        assert seg[0] == 1 and (np.diff(seg) >= 0).all()
        np.testing.assert_array_equal(np.diff(seg) > 0, np.diff(doc_of[start : start + n]) > 0)
    assert a["mask"].sum() == len(stream) - len(docs)
    assert (a["segment_ids"] > 0).sum() == len(stream) - 1


# ----- bad input ------------------------------------------------------------------------

GOOD = json.dumps(SFT[0])
BAD_LINES = {
    "invalid_json": ('{"prompt": "hi", "response": ', "invalid JSON"),
    "missing_field": (json.dumps({"prompt": "hi"}), "missing field 'response'"),
    "empty_field": (json.dumps({"prompt": "hi", "response": "   "}), "'response' must be a non-"),
    "wrong_type": (json.dumps({"prompt": "hi", "response": 3}), "'response' must be a non-"),
    "not_object": (json.dumps(["hi", "there"]), "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_names_file_and_line(tok, tmp_path, case):
    line, message = BAD_LINES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])  # blank lines count
    with pytest.raises(DataError, match=f"{path}:3: .*{message}") as info:
        load_dataset(str(path), "sft", tok, 64)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("p", [1.5, -0.1, "high"])
def test_p_chosen_out_of_range(tok, tmp_path, p):
    path = write_jsonl(tmp_path / "prefs.jsonl", [PREFS[0], dict(PREFS[1], p_chosen=p)])
    with pytest.raises(DataError, match=f"{path}:2: p_chosen must be a number in"):
        load_dataset(str(path), "rm", tok, 64)


def test_prompt_that_is_not_a_conversation(tok, tmp_path):
    # Starts like a conversation ("\n\n") but has no Human/Assistant header.
    bad = {"prompt": "\n\nHello there", "response": "Hi."}
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=f"{path}:2: ") as info:
        load_dataset(str(path), "sft", tok, 64)
    assert info.value.reason == "malformed"
    ds = load_dataset(str(path), "sft", tok, 64, skip_bad=True)
    assert len(ds) == 2 and ds.skipped == collections.Counter(malformed=1)


def test_missing_preference_field(tok, tmp_path):
    record = {k: v for k, v in PREFS[0].items() if k != "rejected"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [record])
    with pytest.raises(DataError, match=f"{path}:1: missing field 'rejected'"):
        load_dataset(str(path), "dpo", tok, 64)


def test_record_too_long(tok, tmp_path):
    long = {"prompt": "Talk.", "response": "word " * 100}
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, long])
    with pytest.raises(DataError, match=f"{path}:2: .*data.max_len=32") as info:
        load_dataset(str(path), "sft", tok, 32)
    assert info.value.reason == "too_long"
    # The rejected side alone being too long is reported too.
    pref = dict(PREFS[0], rejected="no " * 100)
    path = write_jsonl(tmp_path / "long_pref.jsonl", [pref])
    with pytest.raises(DataError, match=f"{path}:1: .*data.max_len=32"):
        load_dataset(str(path), "rm", tok, 32)


def test_record_that_just_fits(tok, tmp_path):
    record = SFT[0]
    text = format_conversation([("Human", record["prompt"]), ("Assistant", record["response"])])
    n = len(tok.encode(text)) + 2  # bos and eos
    path = write_jsonl(tmp_path / "fit.jsonl", [record])
    ds = load_dataset(str(path), "sft", tok, n - 1)  # n ids make n - 1 (input, target) pairs
    assert (ds.arrays["segment_ids"] == 1).all()
    with pytest.raises(DataError, match="do not fit"):
        load_dataset(str(path), "sft", tok, n - 2)


def test_missing_file(tok, tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"not found: {path}"):
        load_dataset(str(path), "sft", tok, 64)


def test_file_without_usable_records(tok, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable records"):
        load_dataset(str(path), "sft", tok, 64)


def test_skip_bad_counts_reasons(tok, tmp_path):
    lines = [GOOD, *(line for line, _ in BAD_LINES.values())]
    lines += [json.dumps({"prompt": "Talk.", "response": "word " * 100}), json.dumps(SFT[1])]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with pytest.raises(DataError):
        load_dataset(str(path), "sft", tok, 32)
    ds = load_dataset(str(path), "sft", tok, 32, skip_bad=True)
    assert len(ds) == 2
    assert ds.skipped == collections.Counter(malformed=len(BAD_LINES), too_long=1)
    good = load_dataset(str(write_jsonl(tmp_path / "good.jsonl", [SFT[0], SFT[1]])), "sft", tok, 32)
    for key in ROW_KEYS:
        np.testing.assert_array_equal(ds.arrays[key], good.arrays[key])


def test_skip_bad_preferences(tok, tmp_path):
    lines = [PREFS[0], dict(PREFS[1], p_chosen=2), dict(PREFS[1], chosen="x " * 100), PREFS[1]]
    path = write_jsonl(tmp_path / "prefs.jsonl", lines)
    ds = load_dataset(str(path), "rm", tok, 40, skip_bad=True)
    assert len(ds) == 2
    assert ds.skipped == collections.Counter(malformed=1, too_long=1)


# ----- splits and index streams ---------------------------------------------------------


def _indexed_dataset(n: int) -> Dataset:
    """A dataset whose row i holds the value i everywhere (easy to identify)."""
    rows = np.repeat(np.arange(n, dtype=np.int32)[:, None], 6, axis=1)
    arrays = {
        "tokens": rows,
        "targets": rows + 1,
        "mask": np.ones_like(rows),
        "segment_ids": np.ones_like(rows),
    }
    return Dataset(arrays, collections.Counter(), "<test>")


def test_split_is_deterministic_and_disjoint():
    ds = _indexed_dataset(20)
    rest, held = ds.split(0.25, seed=3)
    assert len(held) == 5 and len(rest) == 15
    ids_rest, ids_held = set(rest.arrays["tokens"][:, 0]), set(held.arrays["tokens"][:, 0])
    assert not ids_rest & ids_held
    assert ids_rest | ids_held == set(range(20))
    again_rest, again_held = ds.split(0.25, seed=3)
    for a, b in ((rest, again_rest), (held, again_held)):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    # Rows stay whole (every array moves together).
    np.testing.assert_array_equal(held.arrays["targets"], held.arrays["tokens"] + 1)
    other = {seed: set(ds.split(0.25, seed=seed)[1].arrays["tokens"][:, 0]) for seed in range(5)}
    assert len({frozenset(v) for v in other.values()}) > 1  # the seed matters
    # At least one example is held out; holding out everything is an error.
    assert len(ds.split(0.01, seed=0)[1]) == 1
    with pytest.raises(DataError, match="too few"):
        _indexed_dataset(1).split(0.1, seed=0)


def test_split_of_preferences_keeps_pairs_together(tok):
    ds = load_dataset("bundled:preferences.jsonl", "rm", tok, 128)
    rest, held = ds.split(0.1, seed=0)
    assert len(held) == 40 and len(rest) == 360
    full = {
        (ds.arrays["chosen"]["tokens"][i].tobytes(), ds.arrays["rejected"]["tokens"][i].tobytes())
        for i in range(len(ds))
    }
    for part in (rest, held):
        for i in range(len(part)):
            pair = (
                part.arrays["chosen"]["tokens"][i].tobytes(),
                part.arrays["rejected"]["tokens"][i].tobytes(),
            )
            assert pair in full


def test_epoch_stream_covers_each_example_once_per_epoch():
    n, batch_size, seed = 10, 4, 7
    steps = [epoch_stream_indices(n, seed, s, batch_size) for s in range(15)]  # 6 epochs
    stream = np.concatenate(steps)
    for epoch in range(len(stream) // n):
        np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
    # Deterministic: a pure function of (seed, step).
    for s in (0, 3, 14):
        np.testing.assert_array_equal(epoch_stream_indices(n, seed, s, batch_size), steps[s])
    # Epochs are differently shuffled, and the seed matters.
    assert not np.array_equal(stream[:n], stream[n : 2 * n])
    other = np.concatenate([epoch_stream_indices(n, seed + 1, s, batch_size) for s in range(3)])
    assert not np.array_equal(other[:n], stream[:n])


def test_eval_index_batches_pad_with_empty():
    batches = list(eval_index_batches(10, 4))
    assert EMPTY == -1
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    np.testing.assert_array_equal(batches[-1], [8, 9, -1, -1])
    flat = np.concatenate(batches)
    np.testing.assert_array_equal(flat[flat >= 0], np.arange(10))
    assert len(list(eval_index_batches(10, 4, limit=2))) == 2
    assert len(list(eval_index_batches(8, 4))) == 2  # no padding batch when it divides
    assert not (np.concatenate(list(eval_index_batches(8, 4))) == EMPTY).any()


# ----- global batches -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(MeshConfig(), devices=jax.devices()[:1])


def test_global_batch_layout_and_empty_rows(mesh1):
    ds = _indexed_dataset(6)
    indices = np.array([0, 5, EMPTY, 2, 3, EMPTY, EMPTY, 1])
    batch = global_batch(ds, indices, 2, mesh1)
    assert set(batch) == ROW_KEYS | {"weight"}
    for key in ROW_KEYS:
        assert batch[key].shape == (2, 4, 6), key
    assert batch["weight"].shape == (2, 4)
    got = {k: np.asarray(v).reshape(8, *v.shape[2:]) for k, v in batch.items()}
    valid = indices != EMPTY
    np.testing.assert_array_equal(got["weight"], valid.astype(np.float32))
    assert (got["mask"][~valid] == 0).all()
    for key in ROW_KEYS:
        np.testing.assert_array_equal(got[key][valid], ds.arrays[key][indices[valid]])


def test_global_batch_of_preferences(tok, mesh1):
    ds = load_dataset("bundled:preferences.jsonl", "dpo", tok, 128)
    indices = np.array([3, 1, 4, EMPTY])
    batch = global_batch(ds, indices, 1, mesh1)
    assert set(batch) == {"chosen", "rejected", "p_chosen", "weight"}
    assert batch["p_chosen"].shape == (1, 4) and batch["weight"].shape == (1, 4)
    for side in ("chosen", "rejected"):
        for key in ROW_KEYS:
            assert batch[side][key].shape == (1, 4, 128)
        np.testing.assert_array_equal(
            np.asarray(batch[side]["tokens"][0, :3]), ds.arrays[side]["tokens"][[3, 1, 4]]
        )
        assert (np.asarray(batch[side]["mask"][0, 3]) == 0).all()
    np.testing.assert_array_equal(np.asarray(batch["weight"][0]), [1, 1, 1, 0])
