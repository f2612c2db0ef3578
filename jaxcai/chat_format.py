"""The chat-format interface and its Human/Assistant transcript: `ChatFormat` (render,
encode with an assistant mask, prompt ids, stop ids), `EncodedChat`, `ChatError`, the
checks on messages, messages <-> stored Human/Assistant transcripts, and
`HumanAssistantFormat`. The module docstring of `jaxcai.chat` describes both formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxcai.tokenizer import Tokenizer
from jaxcai.tokenizer.transcript import (
    ConversationError,
    Turn,
    format_conversation,
    parse_conversation,
)

__all__ = [
    "ChatError",
    "ChatFormat",
    "EncodedChat",
    "HumanAssistantFormat",
    "Message",
    "check_messages",
    "messages_from_transcript",
    "transcript_from_messages",
]

Message = Mapping[str, str]
_ROLE_TO_TURN = {"user": "Human", "assistant": "Assistant", "system": "System"}
_TURN_TO_ROLE = {v: k for k, v in _ROLE_TO_TURN.items()}


class ChatError(ValueError):
    """A conversation, template or chat setting that cannot be used (names what, where)."""


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """`ids` of the rendered `text`; `mask[i]` is 1 where token i is assistant content or
    its end-of-turn token; `spans` are those tokens `[start, end)` per assistant message,
    as `(message index, start, end)`."""

    ids: list[int]
    mask: list[int]
    text: str
    spans: list[tuple[int, int, int]]


# ----- messages <-> transcripts ---------------------------------------------------------


def check_messages(messages: Sequence[Message], where: str = "conversation") -> list[dict]:
    """Messages as plain dicts with a known role and string content, or a ChatError."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}: message {i} needs 'role' and 'content', got {m!r:.80}")
        if m["role"] not in _ROLE_TO_TURN:
            raise ChatError(
                f"{where}: message {i} has role {m['role']!r}; roles are {sorted(_ROLE_TO_TURN)}"
            )
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: message {i} content must be text")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def messages_from_transcript(text: str) -> list[dict]:
    """A Human/Assistant transcript (a stored prompt) as messages."""
    try:
        turns = parse_conversation(text)
    except ConversationError as e:
        raise ChatError(f"not a transcript: {e}") from None
    return [{"role": _TURN_TO_ROLE[t.role], "content": t.text.strip()} for t in turns]


def transcript_from_messages(messages: Sequence[Message]) -> str:
    """Messages as a Human/Assistant transcript (how prompts are stored)."""
    msgs = check_messages(messages)
    if any(m["role"] == "system" for m in msgs[1:]):
        raise ChatError("only the first message may be a system message")
    return format_conversation([Turn(_ROLE_TO_TURN[m["role"]], m["content"]) for m in msgs])


# ----- the interface --------------------------------------------------------------------


class ChatFormat:
    """Conversations -> text and tokens for one tokenizer (see the module docstring)."""

    kind: str = ""
    tokenizer: Tokenizer

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        raise NotImplementedError

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any
    ) -> EncodedChat:
        raise NotImplementedError

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer: end-of-turn tokens and the tokenizer's EOS ids."""
        raise NotImplementedError

    stop_strings: tuple[str, ...] = ()

    def encode_text(self, text: str) -> list[int]:
        """Ids of a text this format rendered (a BOS only where rendering does not add one)."""
        raise NotImplementedError

    def prompt_ids(self, messages: Sequence[Message], **kwargs: Any) -> list[int]:
        """The conversation opened for the assistant's next message: what a sampler
        continues."""
        return self.encode_text(self.render(messages, add_generation_prompt=True, **kwargs))

    def answer_text(self, user_text: str, assistant_prefix: str) -> str:
        """The text whose continuation scores a multiple-choice answer: `user_text` asked
        by the user and `assistant_prefix` (e.g. "The answer is:") begun by the
        assistant. The Human/Assistant format joins them as plain text, as the paper
        writes its feedback questions; a template puts them in a user turn and the
        opened assistant turn."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


class HumanAssistantFormat(ChatFormat):
    """The `\\n\\nHuman: / \\n\\nAssistant:` transcript; see the module docstring."""

    kind = "human_assistant"
    stop_strings = ("\n\nHuman:",)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __reduce__(self):
        return (HumanAssistantFormat, (self.tokenizer,))

    def render(self, messages, add_generation_prompt=False, **kwargs):
        msgs = check_messages(messages)
        turns = [Turn(_ROLE_TO_TURN[m["role"]], m["content"]) for m in msgs]
        return format_conversation(turns, open_assistant=add_generation_prompt)

    def encode(self, messages, add_generation_prompt=False, **kwargs):
        msgs = check_messages(messages)
        text = self.render(msgs, add_generation_prompt)
        closes = bool(msgs) and msgs[-1]["role"] == "assistant" and not add_generation_prompt
        enc = self.tokenizer.encode_conversation(text, add_bos=True, add_eos=closes)
        mask = [0] * len(enc.ids)
        spans = []
        for i, span in enumerate(enc.spans):
            if span.role != "Assistant" or i >= len(msgs):
                continue
            end = len(enc.ids) if closes and i == len(msgs) - 1 else span.end
            mask[span.start : end] = [1] * (end - span.start)
            spans.append((i, span.start, end))
        return EncodedChat(ids=enc.ids, mask=mask, text=text, spans=spans)

    @property
    def stop_ids(self):
        return self.tokenizer.stop_ids

    def encode_text(self, text):
        return self.tokenizer.encode(text, add_bos=True)

    def answer_text(self, user_text, assistant_prefix):
        # The paper's feedback question is plain text running into the answer's start.
        return user_text + assistant_prefix
