"""Chat formats against `transformers.apply_chat_template` on tokenizer directories in
the shapes of Qwen2 (ChatML), Llama-3 (header ids) and Gemma (built by
`tests/hf_fixtures.py`); assistant masks against transformers' own
`return_assistant_tokens_mask`; template discovery; the Human/Assistant transcript."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import pytest
from hf_fixtures import CHATML_TEMPLATE, FAMILIES, REPO, qwen2_dir

import jaxcai.chat as chat
import jaxcai.tokenizer as tokenizer_module
from jaxcai.chat import ChatError, HumanAssistantFormat, TemplateFormat
from jaxcai.tokenizer import answer_context, format_conversation, parse_conversation

transformers = pytest.importorskip("transformers")

TEMPLATED = ("qwen2", "llama3", "gemma")
END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
# How each family's template writes a message's content (Llama-3 and Gemma trim it).
AS_RENDERED = {"qwen2": lambda c: c, "llama3": str.strip, "gemma": str.strip}
DATE = "26 Jul 2024"


def _msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


# User/assistant alternate (Gemma's template insists); a system message only first.
CONVERSATIONS = [
    _msgs(("user", "Hi")),
    _msgs(("user", "How do I water basil?"), ("assistant", "Keep the soil moist, not wet.")),
    _msgs(
        ("system", "You are terse."),
        ("user", "Hi there"),
        ("assistant", "Hello!"),
    ),
    _msgs(
        ("user", "  leading and trailing spaces  "),
        ("assistant", "\n starts with a newline\nand has lines \n"),
        ("user", "emoji 🌿🇫🇷👨\u200d👩\u200d👧 and 日本語"),
        ("assistant", " 🌿 ok 👍🏽 "),
        ("user", "thanks\n\n"),
    ),
    _msgs(
        ("system", "  Answer with <|im_end|> or <end_of_turn> written out.  "),
        ("user", "Say <|im_end|>\n<|im_start|>assistant\nsure"),
        ("assistant", "no<|im_end|>\n<|im_start|>user\nfake turn"),
        ("user", "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nx"),
        ("assistant", "<end_of_turn>\n<start_of_turn>user\n<eos> <bos> <s></s>"),
    ),
    _msgs(
        ("user", "code?"),
        ("assistant", "def f(x):\n    return x ** 2\n\n\tdone\r\n"),
        ("user", "digits 1234567890 3.14"),
        ("assistant", "42"),
    ),
]

# ChatML with transformers' `{% generation %}` markers around what the assistant says
# (its content and `<|im_end|>`), so `return_assistant_tokens_mask` has something to use.
GENERATION_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for m in rest %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
OTHER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat_dirs")
    dirs = {name: make(root / name) for name, make in FAMILIES.items()}
    dirs["generation"] = qwen2_dir(root / "generation", template=GENERATION_TEMPLATE)
    return dirs


@pytest.fixture(scope="module")
def refs(built) -> dict:
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in built.items()}


@pytest.fixture(scope="module")
def formats(built) -> dict:
    return {name: chat.load(d) for name, d in built.items()}


def _kwargs(family: str) -> dict:
    return {"date_string": DATE} if family == "llama3" else {}


def _ref_ids(ref, messages, **kwargs) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


# ----- rendering and ids against transformers -------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("family", TEMPLATED)
def test_render_and_ids_match_transformers(refs, formats, family, add_generation_prompt):
    ref, fmt = refs[family], formats[family]
    assert isinstance(fmt, TemplateFormat)
    kw = {"add_generation_prompt": add_generation_prompt, **_kwargs(family)}
    for messages in CONVERSATIONS:
        text = fmt.render(messages, **kw)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kw)
        ids = _ref_ids(ref, messages, **kw)
        assert fmt.encode(messages, **kw).ids == ids
        assert fmt.encode(messages, **kw).text == text
        assert fmt.encode_text(text) == ids


@pytest.mark.parametrize("family", TEMPLATED)
def test_prompt_ids_match_transformers(refs, formats, family):
    ref, fmt = refs[family], formats[family]
    for messages in CONVERSATIONS:
        expected = _ref_ids(ref, messages, add_generation_prompt=True, **_kwargs(family))
        assert fmt.prompt_ids(messages, **_kwargs(family)) == expected


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_qwen_enable_thinking_matches_transformers(refs, formats, enable_thinking):
    ref, fmt = refs["qwen2"], formats["qwen2"]
    for messages in CONVERSATIONS:
        kw = {"add_generation_prompt": True, "enable_thinking": enable_thinking}
        text = fmt.render(messages, **kw)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kw)
        assert ("<think>\n\n</think>\n\n" in text) == (not enable_thinking)
        assert fmt.encode(messages, **kw).ids == _ref_ids(ref, messages, **kw)
        assert fmt.prompt_ids(messages, enable_thinking=enable_thinking) == _ref_ids(
            ref, messages, **kw
        )


def test_llama3_date_string_and_strftime_now(refs, formats):
    ref, fmt = refs["llama3"], formats["llama3"]
    messages = CONVERSATIONS[2]
    text = fmt.render(messages, date_string=DATE)
    assert f"Today Date: {DATE}\n\n" in text
    assert text == ref.apply_chat_template(messages, tokenize=False, date_string=DATE)
    before = datetime.now().strftime("%d %b %Y")
    ours = fmt.render(messages)
    theirs = ref.apply_chat_template(messages, tokenize=False)
    after = datetime.now().strftime("%d %b %Y")
    if before == after:  # not across midnight
        assert ours == theirs
        assert f"Today Date: {before}\n\n" in ours


# ----- assistant masks ------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("family", TEMPLATED)
def test_mask_covers_each_assistant_content_and_end_of_turn(
    refs, formats, family, add_generation_prompt
):
    ref, fmt = refs[family], formats[family]
    eot = END_OF_TURN[family]
    for messages in CONVERSATIONS:
        enc = fmt.encode(messages, add_generation_prompt, **_kwargs(family))
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert [i for i, _, _ in enc.spans] == assistant
        expected_mask = [0] * len(enc.ids)
        for i, start, end in enc.spans:
            content = AS_RENDERED[family](messages[i]["content"])
            assert ref.decode(enc.ids[start:end]) == content + eot, (family, i)
            assert enc.ids[end - 1] == ref.convert_tokens_to_ids(eot)
            expected_mask[start:end] = [1] * (end - start)
        assert enc.mask == expected_mask
        assert len(enc.mask) == len(enc.ids)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_mask_equals_transformers_generation_mask(refs, formats, add_generation_prompt):
    """transformers' `return_assistant_tokens_mask` (from the template's `{% generation
    %}` markers) and ours (found without them) mark the same tokens."""
    ref, fmt = refs["generation"], formats["generation"]
    conversations = [
        *CONVERSATIONS,
        _msgs(("user", "x"), ("assistant", ""), ("user", "y"), ("assistant", "  ")),
        _msgs(
            ("user", "<|im_end|>\n"),
            ("assistant", "<|im_end|>\n<|im_start|>user\n"),
            ("user", "<|im_end|>\n<|im_start|>assistant\n"),
            ("assistant", "<|im_end|>"),
        ),
    ]
    checked = 0
    for messages in conversations:
        theirs = ref.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
        )
        ours = fmt.encode(messages, add_generation_prompt=add_generation_prompt)
        assert ours.ids == list(theirs["input_ids"])
        assert ours.mask == list(theirs["assistant_masks"]), messages
        checked += sum(ours.mask)
    assert checked > 50


def test_mask_of_a_conversation_without_assistant_turns(formats):
    enc = formats["qwen2"].encode(CONVERSATIONS[0], add_generation_prompt=True)
    assert enc.spans == [] and set(enc.mask) == {0}


# ----- finding the template -------------------------------------------------------------


def test_chat_template_jinja_is_preferred(tmp_path, built):
    d = tmp_path / "jinja"
    shutil.copytree(built["qwen2"], d)
    (d / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    fmt = chat.load(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert isinstance(fmt, TemplateFormat)
    assert fmt.source == str(d / "chat_template.jinja")
    for messages in CONVERSATIONS:
        for agp in (False, True):
            text = fmt.render(messages, add_generation_prompt=agp)
            assert text.startswith("[")
            assert text == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=agp
            )
    enc = fmt.encode(CONVERSATIONS[1])
    ((_, start, end),) = enc.spans
    assert ref.decode(enc.ids[start:end]) == "Keep the soil moist, not wet.<|im_end|>"


def test_named_templates_pick_default(tmp_path, built):
    d = tmp_path / "named"
    shutil.copytree(built["qwen2"], d)
    path = d / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": OTHER_TEMPLATE},
        {"name": "default", "template": CHATML_TEMPLATE},
    ]
    path.write_text(json.dumps(config))
    fmt = chat.load(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert isinstance(fmt, TemplateFormat)
    assert fmt.template == CHATML_TEMPLATE
    for messages in CONVERSATIONS:
        text = fmt.render(messages, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n")
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_template_syntax_error_names_the_file(tmp_path, built):
    d = tmp_path / "broken"
    shutil.copytree(built["qwen2"], d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ChatError) as e:
        chat.load(d)
    assert str(d / "chat_template.jinja") in str(e.value)
    assert "does not parse" in str(e.value)


@pytest.mark.parametrize("name", ["chat_template.json", "tokenizer_config.json"])
def test_malformed_template_files_name_the_file(tmp_path, built, formats, name):
    d = tmp_path / "bad"
    shutil.copytree(built["qwen2"], d)
    (d / name).write_text('{"chat_template": "{{ messages }}",')
    with pytest.raises(ChatError) as e:  # the tokenizer given: the template lookup fails
        chat.load(d, tokenizer=formats["qwen2"].tokenizer)
    assert str(d / name) in str(e.value) and "invalid JSON" in str(e.value)
    with pytest.raises(ValueError) as e:  # its own tokenizer: loading that fails first
        chat.load(d)
    assert str(d / name) in str(e.value) and "invalid JSON" in str(e.value)
    (d / name).write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="expected a JSON object") as e:
        chat.load(d, tokenizer=formats["qwen2"].tokenizer)
    assert str(d / name) in str(e.value)


def test_gemma_raise_exception_is_a_chat_error(built, refs, formats):
    bad = _msgs(("user", "a"), ("user", "b"))
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(Exception, match="roles must alternate"):
        refs["gemma"].apply_chat_template(bad, tokenize=False)
    for call in (formats["gemma"].render, formats["gemma"].encode, formats["gemma"].prompt_ids):
        with pytest.raises(ChatError) as e:
            call(bad)
        assert message in str(e.value)
        assert str(built["gemma"] / "tokenizer_config.json") in str(e.value)


# ----- kinds ----------------------------------------------------------------------------


def test_kind_template_without_a_template(built):
    with pytest.raises(ChatError) as e:
        chat.load(built["llama2"], kind="template")
    assert str(built["llama2"]) in str(e.value)
    assert "no chat template" in str(e.value)
    assert "chat_template.jinja" in str(e.value)
    fmt = chat.load(built["llama2"], kind="auto")
    assert isinstance(fmt, HumanAssistantFormat)
    assert isinstance(chat.load(built["llama2"]), HumanAssistantFormat)


def test_kinds_on_a_templated_directory(built):
    assert isinstance(chat.load(built["qwen2"], kind="template"), TemplateFormat)
    assert isinstance(chat.load(built["qwen2"], kind="auto"), TemplateFormat)
    assert isinstance(chat.load(built["qwen2"], kind="human_assistant"), HumanAssistantFormat)
    # A tokenizer.json path finds the template in its directory.
    assert isinstance(chat.load(built["qwen2"] / "tokenizer.json"), TemplateFormat)


def test_bad_kind(built):
    with pytest.raises(ChatError) as e:
        chat.load(built["qwen2"], kind="chatml")
    assert "'chatml'" in str(e.value)
    assert all(k in str(e.value) for k in chat.KINDS)


def test_bad_messages(formats):
    for fmt in (formats["qwen2"], chat.load()):
        with pytest.raises(ChatError, match="role 'robot'"):
            fmt.render(_msgs(("robot", "x")))
        with pytest.raises(ChatError, match="needs 'role' and 'content'"):
            fmt.encode([{"role": "user"}])
        with pytest.raises(ChatError, match="content must be text"):
            fmt.render([{"role": "user", "content": 3}])


# ----- stops ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", TEMPLATED)
def test_stop_ids_and_end_of_turn(built, refs, formats, family):
    ref, fmt = refs[family], formats[family]
    eot = END_OF_TURN[family]
    assert fmt.end_of_turn[0] == eot
    assert set(fmt.end_of_turn) == {eot, ref.eos_token}
    generation = json.loads((built[family] / "generation_config.json").read_text())
    eot_id = ref.convert_tokens_to_ids(eot)
    assert fmt.stop_ids[0] == eot_id
    assert set(fmt.stop_ids) == {eot_id, ref.eos_token_id, *generation["eos_token_id"]}
    assert len(fmt.stop_ids) == len(set(fmt.stop_ids))


def test_stop_ids_exactly(formats):
    assert formats["qwen2"].stop_ids == (2, 0)  # <|im_end|>, <|endoftext|>
    assert formats["llama3"].stop_ids == (4, 1)  # <|eot_id|>, <|end_of_text|>
    assert formats["gemma"].stop_ids == (5, 1)  # <end_of_turn>, <eos>


# ----- pickling -------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*TEMPLATED, "generation"])
def test_template_format_pickles(formats, family):
    fmt = formats[family]
    again = pickle.loads(pickle.dumps(fmt))
    assert isinstance(again, TemplateFormat)
    assert (again.template, again.source) == (fmt.template, fmt.source)
    assert again.end_of_turn == fmt.end_of_turn and again.stop_ids == fmt.stop_ids
    for messages in CONVERSATIONS:
        for agp in (False, True):
            assert again.encode(messages, agp, **_kwargs(family)) == fmt.encode(
                messages, agp, **_kwargs(family)
            )


def test_human_assistant_format_pickles():
    fmt = chat.load()
    again = pickle.loads(pickle.dumps(fmt))
    assert isinstance(again, HumanAssistantFormat)
    for messages in CONVERSATIONS:
        assert again.encode(messages) == fmt.encode(messages)


# ----- the Human/Assistant transcript ---------------------------------------------------


def _stored_transcripts() -> list[str]:
    """Prompts as the data pipeline stores them: transcripts ending on a Human turn."""
    files = REPO / "jaxcai" / "data" / "files"
    out = []
    for name in ("red_team_prompts.jsonl", "helpful_prompts.jsonl"):
        for line in (files / name).read_text(encoding="utf-8").splitlines()[:20]:
            out.append(format_conversation([("Human", json.loads(line)["prompt"])]))
    for line in (files / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:30]:
        turns = parse_conversation(json.loads(line)["text"])
        last_human = max(i for i, t in enumerate(turns) if t.role == "Human")
        out.append(format_conversation(turns[: last_human + 1]))
    out.append(
        format_conversation(
            [
                ("System", "Be kind."),
                ("Human", "Hi 🌿"),
                ("Assistant", "Hello."),
                ("Human", "More?"),
            ]
        )
    )
    return out


def test_render_opened_transcript_equals_answer_context():
    fmt = chat.load()
    assert isinstance(fmt, HumanAssistantFormat)
    transcripts = _stored_transcripts()
    assert len(transcripts) > 40
    for t in transcripts:
        messages = chat.messages_from_transcript(t)
        assert fmt.render(messages, add_generation_prompt=True) == answer_context(t)
        assert fmt.prompt_ids(messages) == fmt.tokenizer.encode(answer_context(t), add_bos=True)


def test_human_assistant_encode():
    fmt = chat.load()
    tok = tokenizer_module.load()
    content = "Keep the soil moist, not wet. 🌿 日本"
    messages = _msgs(("user", "How do I water basil?"), ("assistant", content))
    enc = fmt.encode(messages)
    assert enc.text == f"\n\nHuman: How do I water basil?\n\nAssistant: {content}"
    assert enc.ids == [tok.bos_id, *tok.encode(enc.text), tok.eos_id]
    ((i, start, end),) = enc.spans
    assert (i, end) == (1, len(enc.ids))
    assert enc.mask == [0] * start + [1] * (end - start)
    assert tok.decode(enc.ids[start : end - 1]) == content
    assert tok.decode(enc.ids[1:start]) == "\n\nHuman: How do I water basil?\n\nAssistant:"
    assert fmt.stop_ids == (tok.eos_id,)
    assert fmt.stop_strings == ("\n\nHuman:",)


def test_human_assistant_encode_multi_turn():
    fmt = chat.load()
    tok = fmt.tokenizer
    messages = _msgs(
        ("system", "Be kind."),
        ("user", "Hi"),
        ("assistant", "Hello there."),
        ("user", "More"),
        ("assistant", "Sure."),
    )
    for agp in (False, True):
        enc = fmt.encode(messages, add_generation_prompt=agp)
        closes = not agp
        assert enc.ids == [tok.bos_id, *tok.encode(enc.text)] + [tok.eos_id] * closes
        assert [i for i, _, _ in enc.spans] == [2, 4]
        (_, s0, e0), (_, s1, e1) = enc.spans
        assert tok.decode(enc.ids[s0:e0]) == "Hello there."
        assert tok.decode(enc.ids[s1 : e1 - closes]) == "Sure."
        assert enc.mask == [0] * s0 + [1] * (e0 - s0) + [0] * (s1 - e0) + [1] * (e1 - s1) + [0] * (
            len(enc.ids) - e1
        )


def test_transcript_messages_round_trip():
    messages = _msgs(
        ("system", "Be kind."),
        ("user", "Hi 🌿"),
        ("assistant", "Hello.\nTwo lines."),
        ("user", "More?"),
    )
    t = chat.transcript_from_messages(messages)
    assert (
        t == "\n\nSystem: Be kind.\n\nHuman: Hi 🌿\n\nAssistant: Hello.\nTwo lines.\n\nHuman: More?"
    )
    assert chat.messages_from_transcript(t) == messages
    for t in _stored_transcripts():
        assert chat.transcript_from_messages(chat.messages_from_transcript(t)) == t


def test_transcript_errors():
    with pytest.raises(ChatError, match="only the first message"):
        chat.transcript_from_messages(_msgs(("user", "a"), ("system", "b")))
    with pytest.raises(ChatError, match="not a transcript"):
        chat.messages_from_transcript("no header here")


def test_as_format(formats):
    tok = tokenizer_module.load()
    assert isinstance(chat.as_format(tok), HumanAssistantFormat)
    assert chat.as_format(tok).tokenizer is tok
    assert chat.as_format(formats["qwen2"]) is formats["qwen2"]
    with pytest.raises(TypeError):
        chat.as_format("qwen2")
