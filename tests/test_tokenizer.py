"""The bundled sentencepiece tokenizer, batch encode/decode and conversation spans."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxcai.tokenizer as tokenizer_module
from jaxcai.tokenizer import (
    ConversationError,
    Tokenizer,
    Turn,
    format_conversation,
    parse_conversation,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "jaxcai" / "assets" / "tokenizer_corpus.txt"

ODD_TEXTS = [
    "line one\nline two\n\nline four\n",
    "\n",
    "multiple   spaces  between   words",
    " leading space",
    "  two leading spaces and trailing  ",
    "\ttab and\r\ncarriage return",
    "café, naïve, façade, Ångström, straße",
    "日本語のテキストと中文文本",
    "emoji 🌿🪴🙂 and a flag 🇫🇷",
    "🌿",
    "mixed: 42 x 3.14 = 131.88; (ok?) [yes!] {no} <tag> \"quoted\" 'single'",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def _header(role: str) -> str:
    return f"\n\n{role}:"


# ----- round trips ----------------------------------------------------------------------


def test_module_load_is_the_bundled_tokenizer(tok):
    other = tokenizer_module.load()
    assert other.source == tok.source
    text = CORPUS.read_text(encoding="utf-8")[:2000]
    assert other.encode(text) == tok.encode(text)


def test_corpus_round_trips_whole(tok):
    text = CORPUS.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) < len(text)  # it actually merges characters
    assert tok.decode(ids) == text


def test_corpus_round_trips_line_by_line(tok):
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    assert len(lines) > 100
    bad = [line for line in lines if tok.decode(tok.encode(line)) != line]
    assert bad == []


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_strings_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unknown_characters_use_byte_fallback(tok):
    ids = tok.encode("日🌿")
    assert tok.sp.unk_id() not in ids
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert sum(bool(re.fullmatch(r"<0x[0-9A-F]{2}>", p)) for p in pieces) == 3 + 4


def test_newline_is_its_own_piece(tok):
    (nl,) = [i for i in tok.encode("a\nb") if tok.sp.id_to_piece(i) == "\n"]
    assert tok.encode("x\n\ny").count(nl) == 2


# ----- special ids ----------------------------------------------------------------------


def test_special_ids(tok):
    assert tok.pad_id == 0
    assert tok.sp.unk_id() == 1
    assert tok.bos_id == 2
    assert tok.eos_id == 3
    assert tok.vocab_size == 1024


@pytest.mark.parametrize(
    ("add_bos", "add_eos"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_add_bos_eos(tok, add_bos, add_eos):
    text = "Keep the soil moist."
    plain = tok.encode(text)
    ids = tok.encode(text, add_bos=add_bos, add_eos=add_eos)
    assert ids == [2] * add_bos + plain + [3] * add_eos
    assert tok.decode(ids) == text


def test_plain_encode_has_no_specials(tok):
    ids = tok.encode(CORPUS.read_text(encoding="utf-8")[:3000])
    assert not {0, 1, 2, 3} & set(ids)


# ----- batches --------------------------------------------------------------------------


def test_batch_encode_equals_per_string(tok):
    texts = ["Hello there.", "", "日本 🌿", "a\n\nb  c"]
    batch = tok.encode(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.encode(tuple(texts), add_bos=True, add_eos=True) == [
        tok.encode(t, add_bos=True, add_eos=True) for t in texts
    ]


def test_batch_decode_of_lists(tok):
    texts = ["Hello there.", "日本 🌿", "a\n\nb  c"]
    assert tok.decode(tok.encode(texts)) == texts


def test_decode_numpy_1d(tok):
    text = "Water basil in the morning."
    ids = np.asarray(tok.encode(text), dtype=np.int32)
    assert tok.decode(ids) == text


def test_decode_numpy_2d(tok):
    texts = ["the soil", "the pot", "basil"]
    rows = tok.encode(texts)
    width = max(map(len, rows))
    assert all(len(r) == width for r in rows), "pick texts of equal token length"
    out = tok.decode(np.asarray(rows, dtype=np.int64))
    assert out == texts


def test_decode_empty(tok):
    assert tok.decode([]) == ""


# ----- conversation format --------------------------------------------------------------


TURNS = [
    Turn("Human", "How do I keep basil alive?"),
    Turn("Assistant", "Give it sun.\nWater it when the top of the soil is dry."),
    Turn("Human", "Thanks! 🌿"),
]


def test_format_conversation_layout():
    text = format_conversation(TURNS)
    assert text == (
        "\n\nHuman: How do I keep basil alive?"
        "\n\nAssistant: Give it sun.\nWater it when the top of the soil is dry."
        "\n\nHuman: Thanks! 🌿"
    )


def test_format_accepts_tuples():
    assert format_conversation([(t.role, t.text) for t in TURNS]) == format_conversation(TURNS)


def test_format_parse_round_trip():
    text = format_conversation(TURNS)
    assert parse_conversation(text) == TURNS
    assert format_conversation(parse_conversation(text)) == text


def test_open_assistant():
    text = format_conversation(TURNS[:1], open_assistant=True)
    assert text.endswith("\n\nAssistant:")
    assert text == "\n\nHuman: How do I keep basil alive?\n\nAssistant:"
    assert parse_conversation(text) == [TURNS[0], Turn("Assistant", "")]


def test_unknown_role_raises():
    with pytest.raises(ConversationError, match="Narrator"):
        format_conversation([("Narrator", "be nice")])


def test_system_turn_only_first():
    text = format_conversation([("System", "be nice"), ("Human", "hi")])
    assert parse_conversation(text) == [Turn("System", "be nice"), Turn("Human", "hi")]
    with pytest.raises(ConversationError, match="first"):
        parse_conversation("\n\nHuman: hi\n\nSystem: be nice")


@pytest.mark.parametrize(
    "text", ["Human: hi", "hello\n\nHuman: hi", "", "\nHuman: hi", "\n\nhuman: hi"]
)
def test_text_without_leading_header_raises(text):
    with pytest.raises(ConversationError):
        parse_conversation(text)


def test_conversation_error_is_value_error():
    assert issubclass(ConversationError, ValueError)


# ----- conversation spans ---------------------------------------------------------------

_WORDS = [
    "basil", "water", "the", "soil", "is", "dry", "Python's", "don't", "e.g.", "Human",
    "Assistant", "note:", "café", "naïve", "straße", "Ångström", "日本語", "中文", "テキスト",
    "🌿", "🙂", "🇫🇷", "Ελληνικά", "42", "3.14", "2024-06-01", "100%", "$5", "(ok)",
    "[yes]", '"quoted"', "'single'", "?", "!", ",", ".", "...", "-", "#1", "x=y+1",
]  # fmt: skip
_SEPS = [" ", " ", " ", " ", "  ", "\n", "\n\n", ", ", "\t"]


def _random_text(rng: random.Random) -> str:
    n = rng.randint(1, 12)
    parts = [rng.choice(_WORDS)]
    for _ in range(n - 1):
        parts += [rng.choice(_SEPS), rng.choice(_WORDS)]
    return "".join(parts).strip()


def _random_conversation(rng: random.Random) -> list[Turn]:
    turns = []
    for i in range(rng.randint(1, 6)):
        # Mostly alternating, sometimes the same role twice in a row.
        role = (
            ("Human", "Assistant")[i % 2]
            if rng.random() < 0.8
            else rng.choice(("Human", "Assistant"))
        )
        turns.append(Turn(role, _random_text(rng)))
    return turns


def _check_spans(tok: Tokenizer, turns: list[Turn], *, add_bos=False, add_eos=False):
    enc = tok.encode_conversation(turns, add_bos=add_bos, add_eos=add_eos)
    text = format_conversation(turns)
    assert enc.text == text
    plain = tok.encode(text)
    assert enc.ids == [2] * add_bos + plain + [3] * add_eos
    assert [s.role for s in enc.spans] == [t.role for t in turns]
    prev_end = 1 if add_bos else 0
    for span, turn in zip(enc.spans, turns, strict=True):
        assert prev_end <= span.start <= span.end, (turns, enc.spans)
        # What lies between two spans is exactly the header of this turn.
        gap = tok.decode(enc.ids[prev_end : span.start])
        assert gap in (_header(turn.role), _header(turn.role) + " "), (
            turns,
            gap,
        )
        assert tok.decode(enc.ids[span.start : span.end]) == turn.text, (turns, span)
        prev_end = span.end
    assert prev_end == len(enc.ids) - add_eos


def test_spans_simple(tok):
    enc = tok.encode_conversation(TURNS)
    assert [tok.decode(enc.ids[s.start : s.end]) for s in enc.spans] == [t.text for t in TURNS]
    assert enc.ids == tok.encode(format_conversation(TURNS))


def test_spans_from_string_equal_spans_from_turns(tok):
    assert tok.encode_conversation(format_conversation(TURNS)) == tok.encode_conversation(TURNS)


def test_span_of_open_assistant_turn_is_empty_at_end(tok):
    enc = tok.encode_conversation(format_conversation(TURNS[:1], open_assistant=True))
    assert enc.spans[-1].role == "Assistant"
    assert enc.spans[-1].start == enc.spans[-1].end == len(enc.ids)


@pytest.mark.parametrize("text", ["🌿 basil", "日本語です", "Ελληνικά", "🙂"])
def test_span_of_turn_starting_with_byte_fallback_character(tok, text):
    turns = [Turn("Human", text), Turn("Assistant", text)]
    _check_spans(tok, turns)


@pytest.mark.parametrize("seed", range(10))
def test_spans_of_generated_conversations(tok, seed):
    rng = random.Random(seed)
    for _ in range(20):
        _check_spans(tok, _random_conversation(rng))


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, False), (False, True), (True, True)])
def test_spans_with_bos_eos(tok, add_bos, add_eos):
    rng = random.Random(1234)
    for _ in range(20):
        turns = _random_conversation(rng)
        plain = tok.encode_conversation(turns)
        enc = tok.encode_conversation(turns, add_bos=add_bos, add_eos=add_eos)
        shift = 1 if add_bos else 0
        assert [(s.start, s.end) for s in enc.spans] == [
            (s.start + shift, s.end + shift) for s in plain.spans
        ]
        if add_bos:
            assert enc.ids[0] == tok.bos_id
        if add_eos:
            assert enc.ids[-1] == tok.eos_id
        assert enc.ids == [2] * add_bos + plain.ids + [3] * add_eos


def test_spans_with_bos_eos_decode_to_turns(tok):
    _check_spans(tok, TURNS[:2], add_bos=True, add_eos=True)


# ----- training and loading -------------------------------------------------------------


def _write_training_text(path: Path) -> None:
    rng = random.Random(0)
    subjects = ["The basil", "My cat", "A small garden", "This recipe", "The old train", "We"]
    verbs = ["needs", "likes", "gets", "keeps", "makes", "wants", "finds"]
    objects = ["more light", "warm water", "a quiet room", "two cups of flour", "fresh soil"]
    tails = [".", "!", "?", " today.", " every morning.", " (maybe)."]
    lines = []
    for i in range(200):
        line = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        line += rng.choice(tails)
        if i % 7 == 0:
            line += f" It costs ${rng.randint(1, 99)}.{rng.randint(10, 99)}."
        if i % 11 == 0:
            line = "  " + line
        if i % 13 == 0:
            line += " Done, thanks"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_train_small_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    _write_training_text(corpus)
    model_path = tmp_path / "sub" / "small.model"
    trained = Tokenizer.train([corpus], model_path, vocab_size=350)
    assert model_path.is_file()
    loaded = Tokenizer.load(model_path)
    assert loaded.source == str(model_path)
    assert loaded.vocab_size == trained.vocab_size == 350
    assert (loaded.pad_id, loaded.sp.unk_id(), loaded.bos_id, loaded.eos_id) == (0, 1, 2, 3)
    texts = corpus.read_text(encoding="utf-8").split("\n") + ODD_TEXTS
    for text in texts:
        ids = loaded.encode(text)
        assert ids == trained.encode(text)
        assert loaded.decode(ids) == text


def test_train_missing_file_raises(tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(FileNotFoundError, match="no_such_corpus.txt"):
        Tokenizer.train([missing], tmp_path / "t.model", vocab_size=350)
    assert not (tmp_path / "t.model").exists()


def test_load_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")


def test_load_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "data", [b"this is not a model \x00\xff\xfe", random.Random(0).randbytes(512)]
)
def test_load_garbage_raises_value_error(tmp_path, data):
    path = tmp_path / "garbage.model"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Tokenizer.load(path)


def test_train_script_reproduces_bundled_tokenizer(tmp_path, tok):
    out = tmp_path / "t.model"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "1024 pieces" in result.stdout
    retrained = Tokenizer.load(out)
    assert retrained.vocab_size == tok.vocab_size
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert [retrained.sp.id_to_piece(i) for i in range(retrained.vocab_size)] == pieces
    text = CORPUS.read_text(encoding="utf-8")
    assert retrained.encode(text) == tok.encode(text)
    assert retrained.encode(ODD_TEXTS) == tok.encode(ODD_TEXTS)
