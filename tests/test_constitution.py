"""The constitution loader: the bundled files, and bad files named by file, line and field."""

from __future__ import annotations

import textwrap

import pytest

from jaxcai.cai.constitution import (
    ConstitutionError,
    load_constitution,
    parse_constitution,
)

GOOD = textwrap.dedent(
    """\
    name: test
    description: a constitution for tests
    critiques:
      - name: harmful
        critique: Point out anything harmful in the last answer.
        revision: Rewrite the answer without the harmful parts.
    preferences:
      - name: kinder
        question: Which answer is kinder?
    feedback_template: TEMPLATE
    feedback_examples:
      - conversation: "Human: hi"
        principle: Which answer is kinder?
        response_a: Hello!
        response_b: Go away.
        answer: A
    """
).replace(
    "TEMPLATE",
    '"Conversation:\\n{conversation}\\n{principle}\\n(A) {response_a}\\n(B) {response_b}'
    '\\nThe answer is:"',
)


def test_bundled_constitutions_load():
    default = load_constitution("default")
    assert default.name == "jaxcai-default"
    assert len(default.critiques) == 16 and len(default.preferences) == 16
    assert len({c.name for c in default.critiques}) == 16
    assert default.critique_examples and default.feedback_examples
    minimal = load_constitution("minimal")
    assert len(minimal.critiques) == 2 and len(minimal.preferences) == 2
    assert default.sha256 != minimal.sha256


def test_feedback_prompt_and_hash():
    c = parse_constitution(GOOD, "good.yaml")
    prompt = c.feedback_prompt("Human: hi", "Which is kinder?", "Hello!", "Go away.")
    assert prompt == (
        "Conversation:\nHuman: hi\nWhich is kinder?\n(A) Hello!\n(B) Go away.\nThe answer is:"
    )
    # The hash follows the content, not the formatting or the file name.
    reformatted = parse_constitution(GOOD.replace("name: test\n", "name:   test\n"), "x.yaml")
    assert reformatted.sha256 == c.sha256
    changed = parse_constitution(GOOD.replace("kinder?\nfeedback", "nicer?\nfeedback"))
    assert changed.sha256 != c.sha256


@pytest.mark.parametrize(
    "old, new, line, field, why",
    [
        ("  - name: harmful\n", "  - nme: harmful\n", 4, "critiques[0].nme", "unknown key"),
        (
            "    revision: Rewrite the answer without the harmful parts.\n",
            "",
            4,
            "critiques[0].revision",
            "missing",
        ),
        (
            "    question: Which answer is kinder?",
            "    question: 42",
            9,
            "preferences[0].question",
            "must be text",
        ),
        (
            "    question: Which answer is kinder?",
            "    question: ''",
            9,
            "preferences[0].question",
            "is empty",
        ),
        ("{response_b}", "{response_a}", 10, "feedback_template", "{response_a} exactly once"),
        ('The answer is:"', 'Answer:"', 10, "feedback_template", "must end with"),
        ("{principle}", "{principle} {extra}", 10, "feedback_template", "placeholder other than"),
        ("    answer: A", "    answer: C", 12, "feedback_examples[0].answer", "must be A or B"),
        (
            "preferences:\n  - name: kinder",
            "preferences:\n  - name: kinder\n    question: Kind?\n  - name: kinder",
            10,
            "preferences[1].name",
            "repeats preferences[0]",
        ),
        ("critiques:\n", "critiques: []\nold_critiques:\n", 4, "old_critiques", "unknown key"),
    ],
)
def test_bad_files_name_line_and_field(tmp_path, old, new, line, field, why):
    assert old in GOOD
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    message = str(e.value)
    assert message.startswith(f"{path}:"), message
    assert f"{field}:" in message and why in message, message
    assert f":{line}:" in message, message


def test_missing_empty_and_invalid_files(tmp_path):
    with pytest.raises(ConstitutionError, match="no such constitution"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(ConstitutionError, match="no such constitution"):
        load_constitution("no_such_name")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConstitutionError, match="empty"):
        load_constitution(tmp_path / "empty.yaml")
    (tmp_path / "broken.yaml").write_text("name: x\ncritiques: [\n")
    with pytest.raises(ConstitutionError, match=r"broken.yaml:\d+: not valid YAML"):
        load_constitution(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConstitutionError, match="expected a mapping"):
        load_constitution(tmp_path / "list.yaml")
    (tmp_path / "none.yaml").write_text(GOOD.replace("critiques:\n", "critiques: []\nx:\n"))
    with pytest.raises(ConstitutionError):
        load_constitution(tmp_path / "none.yaml")
