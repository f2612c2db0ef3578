"""Chat formats: how a conversation becomes the text and tokens a model reads.

A conversation is a list of messages `{"role": "system" | "user" | "assistant",
"content": str}`. A `ChatFormat` renders it (`render`), tokenizes it with a mask over
what the assistant says (`encode`), opens it for the model's answer (`prompt_ids`) and
knows where an answer ends (`stop_ids`, `stop_strings`). Two kinds:

- `template`: the checkpoint's own Jinja chat template (`chat_template` in
  `tokenizer_config.json`, or `chat_template.jinja` beside it), rendered the way
  `transformers` renders it: a sandboxed environment, `raise_exception`,
  `strftime_now`, the special tokens as variables, `add_generation_prompt` and any
  template keyword (Qwen3's `enable_thinking`, say). Generation stops at the template's
  end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...) and the
  checkpoint's EOS ids.
- `human_assistant`: the `\\n\\nHuman: ...\\n\\nAssistant: ...` transcript of the
  Constitutional AI paper, for base models and the bundled tiny model; BOS first, EOS
  after a final assistant turn, and a new `\\n\\nHuman:` ends an answer.

The assistant mask covers each assistant message's content and its end-of-turn token,
found without `{% generation %}` markers: the template is also rendered with a unique
marker in place of every message's content, which shows where each content begins
and ends in the real rendering.

The pieces live in `jaxcai.chat_format` (the interface, messages and the transcript) and
`jaxcai.chat_template` (templates); everything is importable from here, and `load` picks
a checkpoint's format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxcai.chat_format import (
    ChatError,
    ChatFormat,
    EncodedChat,
    HumanAssistantFormat,
    Message,
    check_messages,
    messages_from_transcript,
    transcript_from_messages,
)
from jaxcai.chat_template import TemplateFormat, find_template
from jaxcai.tokenizer import Tokenizer
from jaxcai.tokenizer import load as load_tokenizer

__all__ = [
    "KINDS",
    "ChatError",
    "ChatFormat",
    "EncodedChat",
    "HumanAssistantFormat",
    "TemplateFormat",
    "as_format",
    "find_template",
    "load",
    "messages_from_transcript",
    "transcript_from_messages",
    # re-exported from jaxcai.chat_format
    "Message",
    "check_messages",
]

KINDS = ("auto", "template", "human_assistant")


def load(
    path: str | Path | None = None,
    kind: str = "auto",
    *,
    tokenizer: Tokenizer | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> ChatFormat:
    """The chat format of a checkpoint directory (`kind="auto"`: its template when it
    has one, else `human_assistant`); `path=None` is the bundled tokenizer's transcript.
    `tokenizer` defaults to the directory's own (`jaxcai.tokenizer.load`);
    `template_kwargs` are the template's default keywords (ignored by the transcript)."""
    if kind not in KINDS:
        raise ChatError(f"chat={kind!r}: choose one of {KINDS}")
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    directory = Path(path).expanduser() if path is not None else None
    if directory is not None and directory.is_file():
        directory = directory.parent
    found = find_template(directory) if directory is not None else None
    if kind == "template" and found is None:
        raise ChatError(
            f"chat=template, but {path or 'the bundled tokenizer'} has no chat template "
            "(looked for chat_template.jinja "
            "and chat_template in tokenizer_config.json); use chat=human_assistant"
        )
    if kind == "human_assistant" or found is None:
        return HumanAssistantFormat(tok)
    return TemplateFormat(tok, found[0], source=found[1], template_kwargs=template_kwargs)


def as_format(value: Tokenizer | ChatFormat) -> ChatFormat:
    """A chat format from a format (as is) or a tokenizer (its Human/Assistant transcript)."""
    if isinstance(value, ChatFormat):
        return value
    if isinstance(value, Tokenizer):
        return HumanAssistantFormat(value)
    raise TypeError(f"expected a Tokenizer or a ChatFormat, got {type(value).__name__}")
