"""TFDS builders: `prepare`, `load`, metadata, the cache, bundled files, `jaxcai-data`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxcai
from jaxcai.data import builders
from jaxcai.data.builders import BUNDLED, bundled_path, decode_record, load, prepare
from jaxcai.data.records import DataError, conversation_text
from jaxcai.data.training import open_dataset
from jaxcai.tokenizer import Tokenizer

HH_CHOSEN = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
HH_REJECTED = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"
HH_PROMPT = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"


def write_jsonl(path: Path, lines) -> Path:
    """One line per item: dicts and lists as JSON, strings written as they are."""
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


# Per kind: the lines of a small input file and the records `load(...).records()` gives
# back, with `{src}` standing for the file's path.
CASES = {
    "text": (
        [{"text": "first doc"}, "", {"text": "  second\ndoc 🌿 "}],
        [
            {"text": "first doc", "source": "{src}:1"},
            {"text": "  second\ndoc 🌿 ", "source": "{src}:3"},
        ],
    ),
    "prompts": (
        [
            {"prompt": "Water basil?", "tags": ["garden", "plants"], "metadata": {"id": 1}},
            {"prompt": HH_PROMPT + "\n\nAssistant:"},
            {"prompt": "café", "tags": [], "metadata": {"note": "naïve", "n": [1, 2]}},
        ],
        [
            {
                "prompt": "\n\nHuman: Water basil?",
                "tags": ["garden", "plants"],
                "metadata": {"id": 1},
                "source": "{src}:1",
            },
            {"prompt": HH_PROMPT, "tags": [], "metadata": {}, "source": "{src}:2"},
            {
                "prompt": "\n\nHuman: café",
                "tags": [],
                "metadata": {"n": [1, 2], "note": "naïve"},
                "source": "{src}:3",
            },
        ],
    ),
    "sft": (
        [
            {"prompt": "q1", "response": " r1 "},
            {"prompt": HH_PROMPT, "response": "two\nlines", "metadata": {"k": "v"}},
        ],
        [
            {"prompt": "\n\nHuman: q1", "response": "r1", "metadata": {}, "source": "{src}:1"},
            {
                "prompt": HH_PROMPT,
                "response": "two\nlines",
                "metadata": {"k": "v"},
                "source": "{src}:2",
            },
        ],
    ),
    "preference": (
        [
            {"prompt": "q1", "chosen": "a1", "rejected": "b1", "p_chosen": 0.75},
            {"prompt": "q2", "chosen": "a2", "rejected": "b2"},
            {"prompt": "q3", "chosen": "a3", "rejected": "b3", "p_chosen": 0, "metadata": {"x": 1}},
        ],
        [
            {
                "prompt": "\n\nHuman: q1",
                "chosen": "a1",
                "rejected": "b1",
                "p_chosen": 0.75,
                "metadata": {},
                "source": "{src}:1",
            },
            {
                "prompt": "\n\nHuman: q2",
                "chosen": "a2",
                "rejected": "b2",
                "p_chosen": 1.0,
                "metadata": {},
                "source": "{src}:2",
            },
            {
                "prompt": "\n\nHuman: q3",
                "chosen": "a3",
                "rejected": "b3",
                "p_chosen": 0.0,
                "metadata": {"x": 1},
                "source": "{src}:3",
            },
        ],
    ),
}


def expected(kind: str, src: Path) -> list[dict]:
    return [
        {k: (v.format(src=src) if k == "source" else v) for k, v in rec.items()}
        for rec in CASES[kind][1]
    ]


PREF_GOOD = [
    {"prompt": "q1", "chosen": "a1", "rejected": "b1", "p_chosen": 0.25},
    {"prompt": "q2", "chosen": "a2", "rejected": "b2"},
]
PREF_MIXED = [
    PREF_GOOD[0],
    "{broken",
    {"prompt": "q", "chosen": "a"},
    {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 7},
    "",
    {"prompt": "q", "chosen": "a", "rejected": "b", "tags_are_ignored": 1, "metadata": [1]},
    PREF_GOOD[1],
    {"prompt": "   ", "chosen": "a", "rejected": "b"},
]


# ----- prepare and load -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CASES))
def test_prepare_and_load_each_kind(tmp_path, kind):
    src = write_jsonl(tmp_path / f"{kind}.jsonl", CASES[kind][0])
    out = tmp_path / "out"
    prepared = prepare(kind, str(src), out)
    assert prepared.path == out
    ds = load(out)
    assert ds.kind == kind
    assert ds.splits == ["train"]
    assert ds.num_examples() == len(CASES[kind][1])
    records = list(ds.records())
    assert records == expected(kind, src)
    assert list(prepared.records()) == records
    if kind == "preference":
        assert all(type(r["p_chosen"]) is float for r in records)


def test_output_directory_is_a_tfds_array_record_dataset(tmp_path):
    src = write_jsonl(tmp_path / "prefs.jsonl", CASES["preference"][0])
    out = tmp_path / "data" / "prefs"
    prepare("preference", str(src), out)
    assert sorted(os.listdir(out)) == [
        "dataset_info.json",
        "features.json",
        "jaxcai_preference-train.array_record-00000-of-00001",
        "metadata.json",
    ]
    source = load(out).source("train")
    assert len(source) == 3
    raw = source[0]
    assert raw["prompt"] == b"\n\nHuman: q1"
    assert raw["chosen"] == b"a1"
    assert raw["rejected"] == b"b1"
    assert raw["p_chosen"] == np.float32(0.75)
    assert raw["metadata"] == b"{}"
    assert raw["source"] == f"{src}:1".encode()
    # Plain TFDS reads it without jaxcai.
    plain = tfds.builder_from_directory(str(out)).as_data_source(split="train")
    assert len(plain) == 3
    assert plain[2]["chosen"] == b"a3"
    assert plain[2]["metadata"] == b'{"x": 1}'


def test_records_of_several_files_keep_file_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    ds = prepare("text", str(tmp_path / "*.jsonl"), tmp_path / "out")
    assert [(r["text"], r["source"]) for r in ds.records()] == [
        ("a1", f"{tmp_path / 'a.jsonl'}:1"),
        ("b1", f"{tmp_path / 'b.jsonl'}:1"),
        ("b2", f"{tmp_path / 'b.jsonl'}:2"),
    ]


def test_prepare_hh(tmp_path):
    src = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"},
        ],
    )
    ds = prepare("preference", str(src), tmp_path / "out", fmt="hh")
    assert [(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in ds.records()] == [
        (HH_PROMPT, "d", "e", f"{src}:1"),
        ("\n\nHuman: x", "y", "z", f"{src}:2"),
    ]
    assert ds.metadata["format"] == "hh"


def test_metadata(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", PREF_MIXED)
    evaluation = write_jsonl(
        tmp_path / "eval.jsonl", [PREF_GOOD[1], {"prompt": "q", "chosen": 1, "rejected": "b"}]
    )
    provenance = {"pipeline": "cai", "settings": {"rounds": 2, "seed": [1, 2]}}
    ds = prepare(
        "preference",
        str(train),
        tmp_path / "out",
        eval_inputs=[str(evaluation)],
        skip_invalid=True,
        provenance=provenance,
    )
    meta = load(tmp_path / "out").metadata
    assert meta["kind"] == "preference"
    assert meta["format"] == "jsonl"
    assert meta["fields"] == {}
    assert meta["skip_invalid"] is True
    assert meta["max_tokens"] is None
    assert meta["jaxcai_version"] == jaxcai.__version__
    assert meta["provenance"] == provenance
    assert meta["inputs"] == {
        "train": [
            {"path": str(train.resolve()), "sha256": hashlib.sha256(train.read_bytes()).hexdigest()}
        ],
        "eval": [
            {
                "path": str(evaluation.resolve()),
                "sha256": hashlib.sha256(evaluation.read_bytes()).hexdigest(),
            }
        ],
    }
    assert meta["skipped"] == {
        "train": {"bad_value": 2, "empty_field": 1, "malformed": 1, "missing_field": 1},
        "eval": {"not_text": 1},
    }
    assert ds.num_examples("train") == 2
    assert ds.num_examples("eval") == 1
    assert [r["source"] for r in ds.records()] == [f"{train}:1", f"{train}:7"]


def test_metadata_without_skips(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PREF_GOOD)
    meta = prepare("preference", str(src), tmp_path / "out", fields={"prompt": "prompt"}).metadata
    assert meta["skipped"] == {"train": {}}
    assert meta["skip_invalid"] is False
    assert meta["fields"] == {"prompt": "prompt"}
    assert meta["provenance"] == {}


def test_eval_inputs_make_an_eval_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", CASES["sft"][0])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "response": "f"}])
    ds = prepare("sft", str(train), tmp_path / "out", eval_inputs=str(evaluation))
    assert ds.splits == ["eval", "train"]
    assert (ds.num_examples("train"), ds.num_examples("eval")) == (2, 1)
    assert list(ds.records("eval")) == [
        {"prompt": "\n\nHuman: e", "response": "f", "metadata": {}, "source": f"{evaluation}:1"}
    ]
    assert list(ds.records("train")) == expected("sft", train)


def test_missing_split_is_a_data_error(tmp_path):
    ds = prepare("text", str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])), tmp_path / "o")
    with pytest.raises(DataError, match=r"no split 'eval' \(splits: \['train'\]\)"):
        ds.source("eval")


def test_decode_record():
    raw = {
        "prompt": "\n\nHuman: é".encode(),
        "tags": np.array([b"a", b"b"], dtype=object),
        "p_chosen": np.float32(0.5),
        "metadata": b'{"k": [1]}',
    }
    out = decode_record(raw)
    assert out == {
        "prompt": "\n\nHuman: é",
        "tags": ["a", "b"],
        "p_chosen": 0.5,
        "metadata": {"k": [1]},
    }
    assert type(out["p_chosen"]) is float


# ----- failures leave nothing behind ----------------------------------------------------


def test_bad_file_raises_and_leaves_nothing_behind(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", PREF_MIXED)
    parent = tmp_path / "datasets"
    parent.mkdir()
    with pytest.raises(DataError) as info:
        prepare("preference", str(src), parent / "out")
    assert str(info.value).startswith(f"{src}:2: invalid JSON (")
    assert info.value.reason == "malformed"
    assert os.listdir(parent) == []


def test_only_invalid_records_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", ["{", {"prompt": ""}])
    with pytest.raises(DataError, match=r"split 'train': no usable records") as info:
        prepare("prompts", str(src), tmp_path / "out", skip_invalid=True)
    assert info.value.reason == "empty"
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match="input file not found") as info:
        prepare("text", str(tmp_path / "nope.jsonl"), tmp_path / "out", skip_invalid=True)
    assert info.value.reason == "missing_file"
    assert os.listdir(tmp_path) == []


def test_prepare_rejects_unknown_kind_and_format(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="kind='docs'"):
        prepare("docs", str(src), tmp_path / "out")
    with pytest.raises(DataError, match="format='csv'"):
        prepare("text", str(src), tmp_path / "out", fmt="csv")
    with pytest.raises(DataError, match="format=hh holds conversations"):
        prepare("text", str(src), tmp_path / "out", fmt="hh")
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"]


# ----- max_tokens -----------------------------------------------------------------------


def test_max_tokens(tmp_path):
    long = {"prompt": "Tell me a story.", "response": "once upon a time " * 20}
    short = {"prompt": "Hi", "response": "Hello."}
    src = write_jsonl(tmp_path / "sft.jsonl", [short, long, short])
    tok = Tokenizer.load()
    n = len(tok.encode(conversation_text("\n\nHuman: Tell me a story.", long["response"]))) + 2
    assert n > 40
    with pytest.raises(DataError) as info:
        prepare("sft", str(src), tmp_path / "out", max_tokens=40)
    assert str(info.value) == f"{src}:2: {n} tokens exceed max_tokens=40"
    assert info.value.reason == "too_long"
    assert sorted(os.listdir(tmp_path)) == ["sft.jsonl"]

    ds = prepare("sft", str(src), tmp_path / "out", max_tokens=40, skip_invalid=True)
    assert [r["source"] for r in ds.records()] == [f"{src}:1", f"{src}:3"]
    assert ds.metadata["skipped"] == {"train": {"too_long": 1}}
    assert ds.metadata["max_tokens"] == 40
    # A limit that exactly fits keeps the record; one token less does not.
    ds = prepare("sft", str(src), tmp_path / "exact", max_tokens=n)
    assert ds.num_examples() == 3
    with pytest.raises(DataError, match=f"^{src}:2: {n} tokens exceed max_tokens={n - 1}$"):
        prepare("sft", str(src), tmp_path / "one_less", max_tokens=n - 1)


def test_max_tokens_below_two(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="max_tokens=1: must be at least 2"):
        prepare("text", str(src), tmp_path / "out", max_tokens=1)


# ----- overwrite ------------------------------------------------------------------------


def test_overwrite(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": "old"}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": "new1"}, {"text": "new2"}])
    out = tmp_path / "out"
    prepare("text", str(first), out)
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare("text", str(second), out)
    assert [r["text"] for r in load(out).records()] == ["old"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": 1}])
    with pytest.raises(DataError, match=f"{bad}:1"):
        prepare("text", str(bad), out, overwrite=True)
    assert [r["text"] for r in load(out).records()] == ["old"]  # kept when the new one fails

    ds = prepare("text", str(second), out, overwrite=True)
    assert [r["text"] for r in load(out).records()] == ["new1", "new2"]
    assert ds.metadata["inputs"]["train"][0]["path"] == str(second.resolve())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_output_that_is_not_a_dataset_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="is not a dataset directory"):
            prepare("text", str(src), out, overwrite=overwrite)
    assert os.listdir(out) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare("text", str(src), empty).num_examples() == 1


# ----- load errors ----------------------------------------------------------------------


def test_load_missing_directory(tmp_path):
    with pytest.raises(DataError, match="no prepared dataset here"):
        load(tmp_path / "missing")


def test_load_plain_file_suggests_jaxcai_data(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as info:
        load(src)
    assert str(info.value) == (
        f"{src} is a file, not a prepared dataset; prepare it with "
        f"`jaxcai-data kind=... input={src} output=DIR`"
    )


def test_load_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(DataError, match=r"dataset_info\.json is missing"):
        load(tmp_path)


def test_load_tfds_directory_without_jaxcai_metadata(tmp_path):
    out = tmp_path / "out"
    prepare("text", str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])), out)
    (out / "metadata.json").unlink()
    with pytest.raises(DataError, match="not a jaxcai dataset"):
        load(out)


# ----- open_dataset and the cache -------------------------------------------------------


def test_open_dataset_kind_mismatch_names_the_key(tmp_path):
    out = tmp_path / "sft_data"
    prepare("sft", str(write_jsonl(tmp_path / "s.jsonl", CASES["sft"][0])), out)
    with pytest.raises(DataError) as info:
        open_dataset(str(out), "preference", key="data.train")
    assert str(info.value) == (
        f"data.train={str(out)!r} holds a 'sft' dataset; this run needs 'preference'"
    )
    assert open_dataset(str(out), "sft").path == out


def test_open_dataset_prepares_raw_files_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXCAI_CACHE", str(cache))
    src = write_jsonl(tmp_path / "prefs.jsonl", CASES["preference"][0])
    ds = open_dataset(str(src), "preference")
    assert ds.path.parent == cache / "datasets"
    assert ds.path.name.startswith("prefs-preference-")
    assert list(ds.records()) == expected("preference", src)
    info = ds.path / "dataset_info.json"
    mtime = info.stat().st_mtime_ns
    again = open_dataset(str(src), "preference")
    assert again.path == ds.path
    assert info.stat().st_mtime_ns == mtime
    assert os.listdir(cache / "datasets") == [ds.path.name]
    # Other content or options get their own entry.
    src.write_text(src.read_text() + json.dumps(PREF_GOOD[1]) + "\n")
    changed = open_dataset(str(src), "preference")
    assert changed.path != ds.path
    assert changed.num_examples() == 4
    skipping = open_dataset(str(src), "preference", skip_invalid=True)
    assert skipping.path not in (ds.path, changed.path)
    assert len(os.listdir(cache / "datasets")) == 3


def test_open_dataset_hh_raw_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCAI_CACHE", str(tmp_path / "cache"))
    src = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    ds = open_dataset(str(src), "sft", fmt="hh")
    assert list(ds.records()) == [
        {"prompt": HH_PROMPT, "response": "d", "metadata": {}, "source": f"{src}:1"}
    ]


def test_open_dataset_raw_file_errors_name_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCAI_CACHE", str(tmp_path / "cache"))
    src = write_jsonl(tmp_path / "bad.jsonl", PREF_MIXED)
    with pytest.raises(DataError, match=f"^{src}:2: invalid JSON"):
        open_dataset(str(src), "preference")
    ds = open_dataset(str(src), "preference", skip_invalid=True)
    assert ds.num_examples() == 2


def test_damaged_cache_entry_is_prepared_again(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCAI_CACHE", str(tmp_path / "cache"))
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}, {"text": "y"}])
    ds = open_dataset(str(src), "text")
    (ds.path / "metadata.json").unlink()
    again = open_dataset(str(src), "text")
    assert again.path == ds.path
    assert [r["text"] for r in again.records()] == ["x", "y"]


# ----- bundled files --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_files_load(name):
    ds = load(f"bundled:{name}")
    assert ds.kind == BUNDLED[name]
    lines = [x for x in bundled_path(name).read_text(encoding="utf-8").splitlines() if x.strip()]
    assert ds.num_examples() == len(lines)
    assert ds.metadata["skipped"] == {"train": {}}
    assert ds.path.parent == builders.cache_dir()
    first = next(ds.records())
    assert first["source"] == f"{bundled_path(name)}:1"
    assert open_dataset(f"bundled:{name}", BUNDLED[name]).path == ds.path


@pytest.mark.parametrize("name", ["red_team_prompts.jsonl", "helpful_prompts.jsonl"])
def test_bundled_prompt_sets(name):
    ds = load(f"bundled:{name}")
    assert ds.num_examples() == 200
    records = list(ds.records())
    assert all(r["tags"] and all(isinstance(t, str) and t for t in r["tags"]) for r in records)
    assert all(r["prompt"].startswith("\n\nHuman: ") for r in records)
    assert len({r["prompt"] for r in records}) == 200


def test_bundled_unknown_name():
    with pytest.raises(DataError) as info:
        load("bundled:nope.jsonl")
    assert str(info.value) == (
        f"bundled:nope.jsonl: no such bundled file (choose one of {sorted(BUNDLED)})"
    )


# ----- the jaxcai-data command ----------------------------------------------------------


def _jaxcai_data(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxcai.main.data", *overrides],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_jaxcai_data_command(tmp_path):
    good = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    train = write_jsonl(tmp_path / "train.jsonl", [good, good])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [good])
    args = ["kind=preference", "format=hh", f"input={train}", f"eval_input={evaluation}"]
    result = _jaxcai_data(tmp_path, *args, "output=out")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "output": str(tmp_path / "out"),
        "kind": "preference",
        "examples": {"eval": 1, "train": 2},
        "skipped": {"train": {}, "eval": {}},
    }
    assert [r["prompt"] for r in load(tmp_path / "out").records()] == [HH_PROMPT] * 2

    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [good, {"chosen": HH_CHOSEN}, {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "[]"],
    )
    args = ["kind=preference", "format=hh", f"input={bad}", "output=bad_out"]
    result = _jaxcai_data(tmp_path, *args)
    assert result.returncode != 0
    assert f"jaxcai-data: {bad}:2: missing field 'rejected'" in result.stderr
    assert not (tmp_path / "bad_out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    result = _jaxcai_data(tmp_path, *args, "skip_invalid=true")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["examples"] == {"train": 1}
    assert summary["skipped"] == {"train": {"identical": 1, "malformed": 1, "missing_field": 1}}
    assert load(tmp_path / "bad_out").metadata["skipped"] == summary["skipped"]
