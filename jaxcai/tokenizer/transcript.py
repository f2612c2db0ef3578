"""The Human/Assistant transcript: the Constitutional AI paper's conversation text.

    "\\n\\nHuman: <text>\\n\\nAssistant: <text>\\n\\nHuman: ..."

Stored prompts are transcripts ending on a Human turn. A leading `\\n\\nSystem:` turn is
allowed, so a conversation with a system message keeps it through storage. This module
is text only: `jaxcai.chat` turns transcripts into messages for any chat format.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

__all__ = [
    "ROLES",
    "ConversationError",
    "Turn",
    "TurnSpan",
    "answer_context",
    "format_conversation",
    "parse_conversation",
    "turn_bounds",
]

ROLES = ("Human", "Assistant", "System")
HEADER = re.compile(r"\n\n(Human|Assistant|System):")


class ConversationError(ValueError):
    """A conversation string or turn list that does not follow the format."""


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "Human", "Assistant" or (first only) "System"
    text: str


@dataclasses.dataclass(frozen=True)
class TurnSpan:
    """Tokens `[start, end)` hold the content of one turn (its header excluded)."""

    role: str
    start: int
    end: int


def header(role: str) -> str:
    if role not in ROLES:
        raise ConversationError(f"unknown role {role!r}; roles are {ROLES}")
    return f"\n\n{role}:"


def format_conversation(
    turns: Sequence[Turn | tuple[str, str]], *, open_assistant: bool = False
) -> str:
    """Join turns as `\\n\\nHuman: ...\\n\\nAssistant: ...`.

    With `open_assistant`, an empty `\\n\\nAssistant:` header is appended for the model to
    continue (a sampling prompt).
    """
    parts = []
    for turn in turns:
        role, text = (turn.role, turn.text) if isinstance(turn, Turn) else turn
        parts.append(f"{header(role)} {text.strip()}")
    if open_assistant:
        parts.append(header("Assistant"))
    return "".join(parts)


def answer_context(prompt: str) -> str:
    """A stored prompt (a transcript ending on a Human turn) opened for the assistant's
    answer: the text a sampler continues."""
    return f"{prompt.rstrip()}{header('Assistant')}"


def turn_bounds(text: str) -> list[tuple[str, int, int]]:
    """(role, content start, content end) character offsets of each turn in `text`."""
    headers = list(HEADER.finditer(text))
    if not headers or headers[0].start() != 0:
        raise ConversationError(
            "a conversation must start with '\\n\\nHuman:' or '\\n\\nAssistant:', got "
            f"{text[:40]!r}"
        )
    bounds = []
    for i, m in enumerate(headers):
        if m.group(1) == "System" and i:
            raise ConversationError("only the first turn of a conversation may be System")
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        start = m.end() + (1 if text[m.end() : m.end() + 1] == " " else 0)
        bounds.append((m.group(1), start, end))
    return bounds


def parse_conversation(text: str) -> list[Turn]:
    """Split a formatted conversation back into turns (inverse of `format_conversation`)."""
    return [Turn(role, text[start:end]) for role, start, end in turn_bounds(text)]


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    ids: list[int]
    spans: list[TurnSpan]
    text: str
