"""The `tokenizer.json` backend against `transformers.AutoTokenizer` on tokenizer
directories in the shapes of Qwen2, Llama-3, Llama-2/Mistral and Gemma (built by
`tests/hf_fixtures.py`, no downloads); the sentencepiece path of `load`; and the
errors a bad checkpoint directory gives."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
from hf_fixtures import CORPUS, FAMILIES, REPO, llama2_dir

import jaxcai.tokenizer as tokenizer_module
from jaxcai.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

# Every family's special-token strings (and near misses), embedded in each family's text.
SPECIAL_STRINGS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
]
NEAR_MISSES = ["<|im_end", "im_end|>", "<s", "</s >", "< s>", "<|eot_id|", "<end_of_turn"]

TEXTS = [
    "",
    "Hello world",
    "Hello world.",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "  both ends  ",
    "multiple     spaces   between words",
    "\ttab\tseparated\tvalues\t",
    "crlf line\r\nnext line\r\n",
    "\r",
    "mixed \t \n \r\n  \t whitespace runs \n\n  ",
    "日本語のテキストと中文文本",
    "한국어 텍스트와 日本語 mixed with English",
    "emoji 🌿🪴🙂 in a sentence",
    "🌿",
    "family 👨\u200d👩\u200d👧\u200d👦 and coder 👩🏽\u200d💻 (ZWJ sequences)",
    "flags 🇫🇷🇯🇵🇺🇳 and 🏳️\u200d🌈",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] >> 2; }",
    "1234567890 3.14159 2,718,281 1e-9 0x1F -42",
    "café naïve façade Ångström straße e\u0301 (combining)",
    "It's, we'RE, they'll, I'd. Don't!",
    "zero\u200bwidth \ufeffBOM \x00\x01\x7f controls",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<s>[INST] hi [/INST] ok</s>",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    *(f"a{s}b" for s in SPECIAL_STRINGS),
    *(f" {s} " for s in SPECIAL_STRINGS),
    *(f"{s}{s}\n{s}" for s in SPECIAL_STRINGS),
    *(f"x{s}" for s in NEAR_MISSES),
]

ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " .,;:!?'\"()[]{}<>|/\\-_+=*&^%$#@~`"
    "    \n\n\t\r"
    "éèêëàâäçñøåßÉÀÇ"
    "αβγδεζηθλμπσωΑΒΓΔΩ"
    "абвгдежзийклмнопАБВГД"
    "مرحبا بالعالم"
    "שלום עולם"
    "नमस्ते दुनिया"
    "日本語中文字漢字のはをにがで"
    "한국어텍스트"
    "🌿🪴🙂👍🏽🇫🇷🎉"
    "\u0301\u0308\u200d\ufe0f"
)


def _random_texts() -> list[str]:
    rng = random.Random(1234)
    short = ["".join(rng.choices(ALPHABET, k=rng.randrange(1, 40))) for _ in range(60)]
    return ["".join(rng.choices(ALPHABET, k=4000)), *short]


ALL_TEXTS = TEXTS + _random_texts() + CORPUS.read_text(encoding="utf-8").split("\n")

# Tokens `transformers` adds on top of tokenizer.json: GemmaTokenizer registers a
# `<mask>` token (id 800 here) that our Gemma-shaped fixture's tokenizer.json lacks
# (real Gemma checkpoints ship it in tokenizer.json, so ours then has it too).
ADDED_BY_TRANSFORMERS = {"gemma": {"<mask>"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {name: make(root / name) for name, make in FAMILIES.items()}


@pytest.fixture(scope="module")
def pairs(built) -> dict[str, tuple[HFTokenizer, object]]:
    """family -> (ours, transformers' AutoTokenizer), both loaded from one directory."""
    return {
        name: (tokenizer_module.load(d), transformers.AutoTokenizer.from_pretrained(str(d)))
        for name, d in built.items()
    }


def _mismatches(ours, ref, texts) -> list:
    bad = []
    for text in texts:
        plain = ref.encode(text, add_special_tokens=False)
        full = ref.encode(text)
        got_plain = ours.encode(text, add_bos=False)
        got_full = ours.encode(text, add_bos=True)
        if got_plain != plain:
            bad.append(("encode", text, got_plain, plain))
        if got_full != full:
            bad.append(("encode add_bos", text, got_full, full))
        for ids in (plain, full):
            if ours.decode(ids) != ref.decode(ids):
                bad.append(("decode", text, ours.decode(ids), ref.decode(ids)))
    return bad


# ----- parity with transformers ---------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loads_the_tokenizer_json_backend(pairs, family):
    ours, _ = pairs[family]
    assert isinstance(ours, HFTokenizer)
    assert Path(ours.source).name == "tokenizer.json"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_decode_match_transformers(pairs, family):
    ours, ref = pairs[family]
    assert _mismatches(ours, ref, ALL_TEXTS) == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_special_strings_become_special_ids(pairs, family):
    """The texts with special tokens embedded do exercise added-token splitting."""
    ours, ref = pairs[family]
    specials = {s for s in SPECIAL_STRINGS if ours.token_to_id(s) is not None}
    assert len(specials) >= 3
    for s in specials:
        assert ours.encode(f"a{s}b").count(ours.token_to_id(s)) == 1
        assert ours.token_to_id(s) == ref.convert_tokens_to_ids(s)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_of_random_ids_matches_transformers(pairs, family):
    """Arbitrary id sequences (special tokens, lone byte-fallback and byte-level pieces
    that are not valid UTF-8 on their own) decode as transformers decodes them."""
    ours, ref = pairs[family]
    rng = random.Random(7)
    rows = [
        [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(200)
    ]
    assert [ours.decode(r) for r in rows] == [ref.decode(r) for r in rows]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_forms_match_transformers(pairs, family):
    ours, ref = pairs[family]
    texts = TEXTS[:40]
    plain = [ref.encode(t, add_special_tokens=False) for t in texts]
    assert ours.encode(texts) == plain
    assert ours.encode(tuple(texts), add_bos=True) == ref(texts)["input_ids"]
    assert ours.decode(plain) == ref.batch_decode(plain)
    assert ours.decode(plain) == [ours.decode(row) for row in plain]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_special_ids_match_transformers(built, pairs, family):
    ours, ref = pairs[family]
    generation = transformers.GenerationConfig.from_pretrained(str(built[family]))
    assert ours.bos_id == ref.bos_token_id
    assert ours.eos_id == ref.eos_token_id
    # No pad token (Llama-3, Llama-2): ours pads with EOS (padding is always masked).
    assert ours.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    gen_eos = generation.eos_token_id
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    assert ours.stop_ids == tuple(dict.fromkeys([ref.eos_token_id, *gen_eos]))
    assert ours.adds_bos == (ref.encode("a") != ref.encode("a", add_special_tokens=False))
    # unk_token only where the config names one: Qwen2Tokenizer's class default
    # (`<|endoftext|>`) is not in the checkpoint's files, and ours has none there.
    config = json.loads((built[family] / "tokenizer_config.json").read_text())
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if name != "unk_token" or name in config:
            assert ours.special_tokens.get(name) == getattr(ref, name), name


def test_generation_config_eos_lists_are_in_stop_ids(pairs):
    """The fixtures' generation configs list a second EOS: it must be a stop id."""
    assert pairs["qwen2"][0].stop_ids == (2, 0)  # <|im_end|>, <|endoftext|>
    assert pairs["llama3"][0].stop_ids == (4, 1)  # <|eot_id|>, <|end_of_text|>
    assert pairs["gemma"][0].stop_ids == (1, 5)  # <eos>, <end_of_turn>
    assert pairs["llama2"][0].stop_ids == (2,)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vocab_size_matches_transformers(built, pairs, family):
    """`vocab_size` is one more than the largest id of tokenizer.json's vocabulary with
    its added tokens; transformers' `len(ref)` also counts tokens its tokenizer class
    adds itself (ADDED_BY_TRANSFORMERS), which ids from the file never use."""
    ours, ref = pairs[family]
    in_file = tokenizers.Tokenizer.from_file(str(built[family] / "tokenizer.json")).get_vocab(
        with_added_tokens=True
    )
    ref_vocab = ref.get_vocab()
    extra = set(ref_vocab) - set(in_file)
    assert extra == ADDED_BY_TRANSFORMERS.get(family, set())
    assert all(ref_vocab[t] == in_file[t] for t in in_file)
    assert ours.vocab_size == 1 + max(i for t, i in ref_vocab.items() if t not in extra)
    assert ours.vocab_size == len(ref) - len(extra)


# ----- pickling, saving -----------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pickle_round_trip(pairs, family):
    ours, _ = pairs[family]
    again = pickle.loads(pickle.dumps(ours))
    assert type(again) is HFTokenizer
    assert again.encode(ALL_TEXTS) == ours.encode(ALL_TEXTS)
    assert again.encode(TEXTS, add_bos=True) == ours.encode(TEXTS, add_bos=True)
    rows = ours.encode(TEXTS)
    assert again.decode(rows) == ours.decode(rows)
    for attr in ("bos_id", "eos_id", "pad_id", "stop_ids", "vocab_size", "adds_bos"):
        assert getattr(again, attr) == getattr(ours, attr), attr
    assert again.special_tokens == ours.special_tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_then_load(tmp_path, pairs, family):
    ours, ref = pairs[family]
    written = ours.save(tmp_path / "saved")
    assert "tokenizer.json" in written and "tokenizer_config.json" in written
    again = tokenizer_module.load(tmp_path / "saved")
    assert isinstance(again, HFTokenizer)
    assert again.encode(ALL_TEXTS) == ours.encode(ALL_TEXTS)
    assert again.encode(TEXTS, add_bos=True) == ours.encode(TEXTS, add_bos=True)
    for attr in ("bos_id", "eos_id", "pad_id", "stop_ids", "vocab_size", "adds_bos"):
        assert getattr(again, attr) == getattr(ours, attr), attr
    assert again.special_tokens == ours.special_tokens
    # transformers reads the saved directory as it read the original one.
    ref_again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert _mismatches(again, ref_again, TEXTS) == []
    assert [ref_again.encode(t) for t in TEXTS] == [ref.encode(t) for t in TEXTS]


def test_save_keeps_an_existing_generation_config(tmp_path, pairs):
    ours, _ = pairs["qwen2"]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert "generation_config.json" not in ours.save(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 7}


# ----- Llama-2 variants -----------------------------------------------------------------


def _llama2_variant(root: Path, **config) -> Path:
    d = llama2_dir(root)
    path = d / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return d


@pytest.mark.parametrize(
    "config",
    [{"legacy": True}, {"tokenizer_class": "PreTrainedTokenizerFast"}],
    ids=["legacy", "PreTrainedTokenizerFast"],
)
def test_llama2_variants_match_transformers(tmp_path, pairs, config):
    """`legacy: true` (a word prefix after special tokens too) and a plain
    `PreTrainedTokenizerFast` class (the file's Prepend normalizer used as is) each
    tokenize differently from the LlamaTokenizer default, and as transformers does."""
    d = _llama2_variant(tmp_path / "variant", **config)
    ours = tokenizer_module.load(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    base, _ = pairs["llama2"]
    probes = ["<s>b", "x</s> y", "a <s> b", "<unk>a"]
    assert ours.encode(probes) != base.encode(probes)  # the variant matters here
    assert _mismatches(ours, ref, ALL_TEXTS) == []


# ----- sentencepiece --------------------------------------------------------------------


def test_directory_with_only_a_sentencepiece_model(tmp_path):
    shutil.copyfile(REPO / "jaxcai" / "assets" / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [3, 9]}')
    tok = tokenizer_module.load(tmp_path)
    bundled = tokenizer_module.load()
    assert isinstance(tok, SentencePieceTokenizer)
    assert isinstance(bundled, SentencePieceTokenizer)
    assert tok.directory == str(tmp_path)
    assert tok.encode(ALL_TEXTS) == bundled.encode(ALL_TEXTS)
    assert tok.decode(tok.encode(TEXTS)) == bundled.decode(bundled.encode(TEXTS))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 3, 0, 1024)
    assert tok.stop_ids == (3, 9)
    assert bundled.stop_ids == (3,)


def test_bundled_tokenizer_pickles_and_round_trips():
    tok = tokenizer_module.load()
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(ALL_TEXTS) == tok.encode(ALL_TEXTS)
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    assert tok.decode(tok.encode(lines)) == lines


def test_tokenizer_json_wins_over_tokenizer_model(tmp_path, built):
    d = tmp_path / "both"
    shutil.copytree(built["qwen2"], d)
    shutil.copyfile(REPO / "jaxcai" / "assets" / "tokenizer.model", d / "tokenizer.model")
    assert isinstance(tokenizer_module.load(d), HFTokenizer)


# ----- bad input ------------------------------------------------------------------------


def test_directory_without_a_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        tokenizer_module.load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "tokenizer.json" in msg and "tokenizer.model" in msg
    assert "config.json" in msg  # what the directory does hold


def test_tiktoken_model_is_refused(tmp_path):
    lines = ["IQ== 0", "Ig== 1", "Iw== 2", "JA== 3", "aGVsbG8= 4"]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        tokenizer_module.load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "tokenizer.model") in msg
    assert "tiktoken" in msg and "tokenizer.json" in msg


@pytest.mark.parametrize(
    "text", ['{"version": "1.0", "model": ', '{"not": "a tokenizer"}', "[1, 2]"]
)
def test_malformed_tokenizer_json(tmp_path, text):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError) as e:
        tokenizer_module.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)
    assert "tokenizer.json" in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_malformed_side_file(tmp_path, built, name):
    d = tmp_path / "bad"
    shutil.copytree(built["llama3"], d)
    (d / name).write_text('{"bos_token": "<|begin_of_text|>",')
    with pytest.raises(ValueError) as e:
        tokenizer_module.load(d)
    assert str(d / name) in str(e.value)
    assert "invalid JSON" in str(e.value)


def test_eos_token_not_in_vocabulary(tmp_path, built):
    d = tmp_path / "bad"
    shutil.copytree(built["llama3"], d)
    path = d / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token": "<|no_such|>"}))
    with pytest.raises(ValueError) as e:
        tokenizer_module.load(d)
    msg = str(e.value)
    assert "eos_token" in msg and "'<|no_such|>'" in msg and "not in the vocabulary" in msg
    assert str(d / "tokenizer.json") in msg and "tokenizer_config.json" in msg


def test_special_token_from_special_tokens_map_not_in_vocabulary(tmp_path, built):
    d = tmp_path / "bad"
    shutil.copytree(built["llama2"], d)
    (d / "special_tokens_map.json").write_text('{"pad_token": "<no_pad>"}')
    with pytest.raises(ValueError) as e:
        tokenizer_module.load(d)
    assert "pad_token '<no_pad>' (special_tokens_map.json)" in str(e.value)
