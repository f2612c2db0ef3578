"""Raw JSONL and hh-rlhf files -> validated records: parsing, errors, skip counting."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from jaxcai.data.records import (
    DataError,
    conversation_text,
    expand_inputs,
    normalise_prompt,
    read_records,
    split_hh,
)
from jaxcai.tokenizer import parse_conversation

# A two-exchange hh-rlhf pair that differs only in the final Assistant answer.
HH_CHOSEN = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
HH_REJECTED = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"
HH_PROMPT = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"


def write_jsonl(path: Path, lines) -> Path:
    """One line per item: dicts and lists as JSON, strings written as they are."""
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read(path, kind, fmt="jsonl", **kwargs) -> list[dict]:
    return list(read_records(str(path), kind, fmt, **kwargs))


def one(tmp_path, record, kind, fmt="jsonl", **kwargs) -> dict:
    (rec,) = read(write_jsonl(tmp_path / "one.jsonl", [record]), kind, fmt, **kwargs)
    return rec


def error(tmp_path, lines, kind, fmt="jsonl", **kwargs) -> tuple[Path, DataError]:
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        read(path, kind, fmt, **kwargs)
    return path, info.value


# ----- hh-rlhf split -------------------------------------------------------------------


def test_split_hh_single_turn():
    prompt, chosen, rejected = split_hh(
        "\n\nHuman: hi there\n\nAssistant:  hello! ",
        "\n\nHuman: hi there\n\nAssistant: go away\n",
        "f:1",
    )
    assert (prompt, chosen, rejected) == ("\n\nHuman: hi there", "hello!", "go away")


def test_split_hh_multi_turn_prompt_is_shared_prefix():
    prompt, chosen, rejected = split_hh(HH_CHOSEN, HH_REJECTED, "f:1")
    assert prompt == HH_PROMPT
    assert (chosen, rejected) == ("d", "e")


def test_split_hh_keeps_newlines_inside_the_response():
    _, chosen, _ = split_hh(HH_PROMPT + "\n\nAssistant: one\ntwo\n\nthree  ", HH_REJECTED, "f:1")
    assert chosen == "one\ntwo\n\nthree"


def test_read_hh_preference(tmp_path):
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"},
        ],
    )
    records = read(path, "preference", "hh")
    assert records == [
        {
            "source": f"{path}:1",
            "prompt": HH_PROMPT,
            "chosen": "d",
            "rejected": "e",
            "p_chosen": 1.0,
            "metadata": {},
        },
        {
            "source": f"{path}:2",
            "prompt": "\n\nHuman: x",
            "chosen": "y",
            "rejected": "z",
            "p_chosen": 1.0,
            "metadata": {},
        },
    ]


def test_read_hh_sft_keeps_the_chosen_response(tmp_path):
    rec = one(tmp_path, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "sft", "hh")
    assert rec == {
        "source": f"{tmp_path / 'one.jsonl'}:1",
        "prompt": HH_PROMPT,
        "response": "d",
        "metadata": {},
    }


def test_read_hh_sft_allows_identical_sides(tmp_path):
    rec = one(tmp_path, {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "sft", "hh")
    assert (rec["prompt"], rec["response"]) == (HH_PROMPT, "d")


def test_read_hh_prompts_keeps_the_prefix(tmp_path):
    rec = one(tmp_path, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "prompts", "hh")
    assert rec == {
        "source": f"{tmp_path / 'one.jsonl'}:1",
        "prompt": HH_PROMPT,
        "tags": [],
        "metadata": {},
    }


def test_read_hh_with_fields_and_soft_label(tmp_path):
    rec = one(
        tmp_path,
        {"good": HH_CHOSEN, "bad": HH_REJECTED, "p": 0.25},
        "preference",
        "hh",
        fields={"chosen": "good", "rejected": "bad", "p_chosen": "p"},
    )
    assert (rec["prompt"], rec["chosen"], rec["rejected"], rec["p_chosen"]) == (
        HH_PROMPT,
        "d",
        "e",
        0.25,
    )


# ----- hh-rlhf errors ------------------------------------------------------------------


def test_hh_prompt_mismatch():
    other = "\n\nHuman: a\n\nAssistant: DIFFERENT\n\nHuman: c\n\nAssistant: e"
    with pytest.raises(DataError, match=r"^f:7: chosen and rejected differ") as info:
        split_hh(HH_CHOSEN, other, "f:7")
    assert info.value.reason == "prompt_mismatch"


def test_hh_no_assistant_turn():
    with pytest.raises(DataError, match=r"^f:1: the rejected transcript has no") as info:
        split_hh(HH_CHOSEN, "\n\nHuman: a", "f:1")
    assert info.value.reason == "malformed"


def test_hh_empty_final_response():
    with pytest.raises(DataError, match=r"^f:1: the chosen response is empty") as info:
        split_hh(HH_PROMPT + "\n\nAssistant:   \n", HH_REJECTED, "f:1")
    assert info.value.reason == "empty_field"


def test_hh_human_turn_after_the_last_assistant_turn():
    with pytest.raises(DataError, match=r"^f:1: the chosen transcript does not end") as info:
        split_hh(HH_CHOSEN + "\n\nHuman: more?", HH_REJECTED, "f:1")
    assert info.value.reason == "malformed"


def test_hh_identical_preference_pair(tmp_path):
    path, e = error(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}], "preference", "hh")
    assert str(e).startswith(f"{path}:1: ")
    assert "identical" in str(e)
    assert e.reason == "identical"


def test_hh_errors_name_file_and_line(tmp_path):
    good = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    bad = {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: zzz\n\nAssistant: e"}
    path, e = error(tmp_path, [good, "", bad], "preference", "hh")
    assert str(e).startswith(f"{path}:3: ")
    assert e.reason == "prompt_mismatch"


def test_hh_missing_side(tmp_path):
    path, e = error(tmp_path, [{"chosen": HH_CHOSEN}], "sft", "hh")
    assert str(e) == f"{path}:1: missing field 'rejected'"
    assert e.reason == "missing_field"


def test_hh_without_a_human_turn_is_an_error(tmp_path):
    record = {"chosen": "\n\nAssistant: b", "rejected": "\n\nAssistant: c"}
    path, e = error(tmp_path, [record], "preference", "hh")
    assert str(e).startswith(f"{path}:1: ")


# ----- JSONL records -------------------------------------------------------------------


def test_plain_prompt_becomes_one_human_turn(tmp_path):
    rec = one(tmp_path, {"prompt": "  How do I water basil?\n"}, "prompts")
    assert rec["prompt"] == "\n\nHuman: How do I water basil?"


def test_transcript_prompt_is_kept(tmp_path):
    rec = one(tmp_path, {"prompt": HH_PROMPT}, "prompts")
    assert rec["prompt"] == HH_PROMPT
    rec = one(tmp_path, {"prompt": "Human: a\n\nAssistant: b\n\nHuman: c"}, "prompts")
    assert rec["prompt"] == HH_PROMPT


def test_transcript_prompt_loses_a_trailing_open_assistant_header(tmp_path):
    rec = one(tmp_path, {"prompt": HH_PROMPT + "\n\nAssistant:"}, "prompts")
    assert rec["prompt"] == HH_PROMPT
    rec = one(tmp_path, {"prompt": HH_PROMPT + "\n\nAssistant: \n"}, "prompts")
    assert rec["prompt"] == HH_PROMPT


def test_transcript_prompt_ending_on_assistant_turn_is_an_error(tmp_path):
    path, e = error(tmp_path, [{"prompt": "\n\nHuman: a\n\nAssistant: b"}], "prompts")
    assert str(e) == f"{path}:1: a prompt transcript must end with a Human turn"
    assert e.reason == "malformed"


def test_transcript_prompt_with_an_empty_turn_is_an_error(tmp_path):
    path, e = error(tmp_path, [{"prompt": "\n\nHuman: a\n\nAssistant:\n\nHuman: c"}], "prompts")
    assert str(e) == f"{path}:1: prompt transcript has an empty turn"
    assert e.reason == "empty_field"


def test_plain_prompt_with_an_assistant_header_still_ends_on_a_human_turn():
    try:
        prompt = normalise_prompt("Hello\n\nAssistant: hi there", "f:1")
    except DataError:
        return
    assert parse_conversation(prompt)[-1].role == "Human"


def test_normalise_prompt_directly():
    assert normalise_prompt("plain", "f:1") == "\n\nHuman: plain"
    assert normalise_prompt("\n\nHuman: x\n\nAssistant:", "f:1") == "\n\nHuman: x"


def test_conversation_text():
    assert conversation_text(HH_PROMPT, "  d \n") == HH_CHOSEN


def test_fields_mapping(tmp_path):
    rec = one(
        tmp_path,
        {"question": "Why?", "answer": " Because. ", "prompt": "ignored", "response": "ignored"},
        "sft",
        fields={"prompt": "question", "response": "answer"},
    )
    assert rec == {
        "source": f"{tmp_path / 'one.jsonl'}:1",
        "prompt": "\n\nHuman: Why?",
        "response": "Because.",
        "metadata": {},
    }


def test_fields_mapping_missing_key_names_the_file_key(tmp_path):
    path, e = error(tmp_path, [{"prompt": "x"}], "prompts", fields={"prompt": "question"})
    assert str(e) == f"{path}:1: missing field 'question'"
    assert e.reason == "missing_field"


def test_optional_field_defaults(tmp_path):
    pref = one(tmp_path, {"prompt": "q", "chosen": " a ", "rejected": "b\n"}, "preference")
    assert pref == {
        "source": f"{tmp_path / 'one.jsonl'}:1",
        "prompt": "\n\nHuman: q",
        "chosen": "a",
        "rejected": "b",
        "p_chosen": 1.0,
        "metadata": {},
    }
    assert one(tmp_path, {"prompt": "q"}, "prompts") == {
        "source": f"{tmp_path / 'one.jsonl'}:1",
        "prompt": "\n\nHuman: q",
        "tags": [],
        "metadata": {},
    }
    nulls = one(tmp_path, {"prompt": "q", "tags": None, "metadata": None}, "prompts")
    assert (nulls["tags"], nulls["metadata"]) == ([], {})


def test_optional_fields_given(tmp_path):
    rec = one(
        tmp_path,
        {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0, "metadata": {"k": [1]}},
        "preference",
    )
    assert rec["p_chosen"] == 0.0 and isinstance(rec["p_chosen"], float)
    assert rec["metadata"] == {"k": [1]}
    rec = one(tmp_path, {"prompt": "q", "tags": ["a", "b"], "metadata": {"x": "y"}}, "prompts")
    assert (rec["tags"], rec["metadata"]) == (["a", "b"], {"x": "y"})


def test_text_kind_keeps_text_verbatim(tmp_path):
    rec = one(tmp_path, {"text": "  line one\nline two  ", "other": 1}, "text")
    assert rec == {"source": f"{tmp_path / 'one.jsonl'}:1", "text": "  line one\nline two  "}


def test_unicode_text(tmp_path):
    rec = one(tmp_path, {"prompt": "café 🌿 日本", "response": "naïve"}, "sft")
    assert (rec["prompt"], rec["response"]) == ("\n\nHuman: café 🌿 日本", "naïve")


def test_blank_lines_are_ignored_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", ["", {"text": "one"}, "   ", "", {"text": "two"}])
    records = read(path, "text")
    assert [(r["text"], r["source"]) for r in records] == [
        ("one", f"{path}:2"),
        ("two", f"{path}:5"),
    ]


# ----- bad input: one case each ---------------------------------------------------------

PREF = {"prompt": "q", "chosen": "a", "rejected": "b"}
BAD_CASES = {
    # name: (kind, bad line, reason, message fragment)
    "malformed_json": ("prompts", '{"prompt": "x",', "malformed", "invalid JSON"),
    "json_array": ("prompts", '["x"]', "malformed", "expected a JSON object, got list"),
    "json_string": ("prompts", '"x"', "malformed", "expected a JSON object, got str"),
    "missing_field": ("preference", {"prompt": "q", "chosen": "a"}, "missing_field", "'rejected'"),
    "empty_field": ("sft", {"prompt": "", "response": "r"}, "empty_field", "'prompt' is empty"),
    "whitespace_field": (
        "sft",
        {"prompt": "q", "response": " \n\t"},
        "empty_field",
        "'response' is empty",
    ),
    "number_text": ("text", {"text": 5}, "not_text", "'text' must be text, got int"),
    "list_text": (
        "prompts",
        {"prompt": ["a"]},
        "bad_value",
        "message 0 needs 'role' and 'content'",
    ),
    "dict_text": ("prompts", {"prompt": {"a": 1}}, "not_text", "'prompt' must be text, got dict"),
    "messages_end_assistant": (
        "prompts",
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "malformed",
        "must end with a user message",
    ),
    "messages_bad_role": (
        "sft",
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "bad_value",
        "role 'robot'",
    ),
    "messages_empty": (
        "sft",
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
        "empty_field",
        "message 0 is empty",
    ),
    "messages_no_answer": (
        "sft",
        {"messages": [{"role": "user", "content": "q"}]},
        "malformed",
        "must end with the assistant message",
    ),
    "late_system": (
        "sft",
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "bad_value",
        "only the first message may be a system message",
    ),
    "chosen_two_messages": (
        "preference",
        {
            "prompt": "q",
            "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "rejected": "b",
        },
        "malformed",
        "one assistant message",
    ),
    "null_text": ("prompts", {"prompt": None}, "not_text", "got NoneType"),
    "p_chosen_above_1": ("preference", PREF | {"p_chosen": 1.5}, "bad_value", "got 1.5"),
    "p_chosen_below_0": ("preference", PREF | {"p_chosen": -0.1}, "bad_value", "got -0.1"),
    "p_chosen_bool": ("preference", PREF | {"p_chosen": True}, "bad_value", "got True"),
    "p_chosen_string": ("preference", PREF | {"p_chosen": "0.5"}, "bad_value", "got '0.5'"),
    "p_chosen_nan": (
        "preference",
        json.dumps(PREF)[:-1] + ', "p_chosen": NaN}',
        "bad_value",
        "got nan",
    ),
    "tags_string": ("prompts", {"prompt": "q", "tags": "a"}, "bad_value", "list of strings"),
    "tags_numbers": ("prompts", {"prompt": "q", "tags": ["a", 1]}, "bad_value", "list of strings"),
    "metadata_list": (
        "sft",
        {"prompt": "q", "response": "r", "metadata": []},
        "bad_value",
        "JSON object",
    ),
    "metadata_text": ("prompts", {"prompt": "q", "metadata": "x"}, "bad_value", "JSON object"),
}
GOOD = {
    "text": {"text": "t"},
    "prompts": {"prompt": "q"},
    "sft": {"prompt": "q", "response": "r"},
    "preference": PREF,
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record(tmp_path, case):
    kind, bad, reason, fragment = BAD_CASES[case]
    path, e = error(tmp_path, [GOOD[kind], "", bad, GOOD[kind]], kind)
    assert str(e).startswith(f"{path}:3: ")
    assert fragment in str(e)
    assert e.reason == reason


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_is_skipped_and_counted(tmp_path, case):
    kind, bad, reason, _ = BAD_CASES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[kind], "", bad, GOOD[kind]])
    skipped = collections.Counter()
    records = read(path, kind, skipped=skipped)
    assert [r["source"] for r in records] == [f"{path}:1", f"{path}:4"]
    assert skipped == {reason: 1}


def test_skip_counting_mixed_file(tmp_path):
    lines = [
        {"prompt": "q1", "chosen": "a1", "rejected": "b1"},
        "not json",
        {"prompt": "q2", "chosen": "a2"},
        "",
        {"prompt": "q3", "chosen": "a3", "rejected": "b3", "p_chosen": 0.5},
        {"prompt": " ", "chosen": "a", "rejected": "b"},
        [1, 2],
        {"prompt": "q", "chosen": 3, "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 2},
        {"prompt": "q", "chosen": "a", "rejected": "b", "metadata": 7},
        {"prompt": "q", "rejected": "b"},
        {"prompt": "q4", "chosen": "a4", "rejected": "b4", "metadata": {"i": 4}},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    skipped = collections.Counter()
    records = read(path, "preference", skipped=skipped)
    assert [(r["prompt"], r["chosen"], r["source"]) for r in records] == [
        ("\n\nHuman: q1", "a1", f"{path}:1"),
        ("\n\nHuman: q3", "a3", f"{path}:5"),
        ("\n\nHuman: q4", "a4", f"{path}:12"),
    ]
    assert records[1]["p_chosen"] == 0.5
    assert records[2]["metadata"] == {"i": 4}
    assert skipped == collections.Counter(
        {"malformed": 2, "missing_field": 2, "empty_field": 1, "not_text": 1, "bad_value": 2}
    )


def test_chat_message_fields(tmp_path):
    """`messages` conversations and message-list fields become the text forms."""
    sys_user = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    lines = [
        {"messages": [*sys_user, {"role": "assistant", "content": " Hello! "}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
        {"prompt": sys_user, "response": [{"role": "assistant", "content": "Hey"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", lines)
    records = read(path, "sft")
    assert [(r["prompt"], r["response"]) for r in records] == [
        ("\n\nSystem: Be kind.\n\nHuman: Hi?", "Hello!"),
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "d"),
        ("\n\nSystem: Be kind.\n\nHuman: Hi?", "Hey"),
    ]
    prefs = [
        {"prompt": sys_user, "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}
    ]
    (rec,) = read(write_jsonl(tmp_path / "p.jsonl", prefs), "preference")
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (
        "\n\nSystem: Be kind.\n\nHuman: Hi?",
        "x",
        "y",
    )


def test_skip_counting_hh(tmp_path):
    good = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    lines = [
        good,
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},
        {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: z\n\nAssistant: e"},
        {"chosen": HH_CHOSEN, "rejected": HH_PROMPT + "\n\nAssistant:"},
        {"chosen": "\n\nHuman: a", "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN},
        good,
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", lines)
    skipped = collections.Counter()
    records = read(path, "preference", "hh", skipped=skipped)
    assert [r["source"] for r in records] == [f"{path}:1", f"{path}:7"]
    assert skipped == {
        "identical": 1,
        "prompt_mismatch": 1,
        "empty_field": 1,
        "malformed": 1,
        "missing_field": 1,
    }


def test_records_across_files_keep_file_and_line_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    records = read(tmp_path / "*.jsonl", "text")
    assert [(r["text"], r["source"]) for r in records] == [
        ("a1", f"{tmp_path / 'a.jsonl'}:1"),
        ("b1", f"{tmp_path / 'b.jsonl'}:1"),
        ("b2", f"{tmp_path / 'b.jsonl'}:2"),
    ]


def test_invalid_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read(path, "text")
    assert str(info.value).startswith(f"{path}:2")


def test_huge_integer_p_chosen_is_a_data_error(tmp_path):
    line = json.dumps(PREF)[:-1] + ', "p_chosen": 1' + "0" * 400 + "}"
    path, e = error(tmp_path, [line], "preference")
    assert e.reason == "bad_value"


def test_jsonl_identical_preference_pair_is_rejected(tmp_path):
    path, e = error(
        tmp_path, [{"prompt": "q", "chosen": "same", "rejected": " same "}], "preference"
    )
    assert e.reason == "identical"


# ----- inputs, kinds and formats --------------------------------------------------------


def test_expand_inputs_glob_sorted_and_deduplicated(tmp_path):
    for name in ("c.jsonl", "a.jsonl", "b.jsonl", "notes.txt"):
        (tmp_path / name).write_text("")
    assert expand_inputs(str(tmp_path / "*.jsonl")) == [
        tmp_path / "a.jsonl",
        tmp_path / "b.jsonl",
        tmp_path / "c.jsonl",
    ]
    assert expand_inputs([str(tmp_path / "notes.txt"), str(tmp_path / "[ab].jsonl")]) == [
        tmp_path / "notes.txt",
        tmp_path / "a.jsonl",
        tmp_path / "b.jsonl",
    ]
    assert expand_inputs([str(tmp_path / "b.jsonl"), str(tmp_path / "*.jsonl")]) == [
        tmp_path / "b.jsonl",
        tmp_path / "a.jsonl",
        tmp_path / "c.jsonl",
    ]


def test_expand_inputs_missing_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="input file not found") as info:
        expand_inputs(str(missing))
    assert str(missing) in str(info.value)
    assert info.value.reason == "missing_file"


def test_expand_inputs_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(DataError, match="no file matches") as info:
        expand_inputs(pattern)
    assert repr(pattern) in str(info.value)
    assert info.value.reason == "missing_file"


def test_expand_inputs_empty_list():
    with pytest.raises(DataError, match="no input files"):
        expand_inputs([])


def test_missing_file_is_never_skipped(tmp_path):
    skipped = collections.Counter()
    with pytest.raises(DataError, match="input file not found"):
        read(tmp_path / "missing.jsonl", "text", skipped=skipped)
    assert skipped == {}


def test_unknown_kind(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match="unknown dataset kind 'documents'"):
        read(path, "documents")


def test_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match="unknown input format 'csv'"):
        read(path, "text", "csv")


def test_hh_format_with_text_kind(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    with pytest.raises(DataError, match="format=hh holds conversations"):
        read(path, "text", "hh")
