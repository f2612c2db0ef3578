"""Raw data files -> validated records of the four dataset kinds.

Kinds and their record fields (all text is `str`):

    text        text                                         raw documents (`lm`)
    prompts     prompt, tags (list), metadata (dict)         sampling prompts (CAI)
    sft         prompt, response, metadata                   the response is learned
    preference  prompt, chosen, rejected, p_chosen, metadata  rm / dpo

A stored `prompt` is always a conversation transcript ending on a Human turn,
`"\\n\\nHuman: ...[\\n\\nAssistant: ...\\n\\nHuman: ...]"`; a plain string in a JSONL file
becomes a one-turn transcript. `response`, `chosen` and `rejected` are the text of the
final Assistant turn only. Every record also carries `source`, the `file:line` it came
from, so errors found later (at training time) still name it.

Formats:

    jsonl   one JSON object per line; `fields` maps our names to the file's keys
            (`{"prompt": "question"}`); `prompt` may be plain text, a transcript or a
            list of chat messages (`{"role", "content"}`, ending on a user message);
            `response`, `chosen` and `rejected` may be text or a one-message list
            (an assistant message). An `sft` line may instead hold a whole
            conversation as `messages`, ending on the assistant message learned.
    hh      Anthropic hh-rlhf lines `{"chosen": transcript, "rejected": transcript}`:
            the prompt is the shared prefix up to the last "\\n\\nAssistant:", the
            responses what follows it. `sft` keeps the chosen side; `prompts` the prefix.

Bad records raise `DataError` naming file and line; `read_records(..., skipped=Counter)`
counts them by reason instead.
"""

from __future__ import annotations

import collections
import glob
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jaxcai.chat import ChatError, check_messages, transcript_from_messages
from jaxcai.tokenizer import ConversationError, parse_conversation

T = TypeVar("T")

__all__ = [
    "FORMATS",
    "KINDS",
    "DataError",
    "read_lines",
    "conversation_text",
    "describe_counts",
    "expand_inputs",
    "normalise_prompt",
    "read_records",
    "split_hh",
]

KINDS = ("text", "prompts", "sft", "preference")
FORMATS = ("jsonl", "hh")
ASSISTANT = "\n\nAssistant:"
_HEADER = re.compile(r"\n\n(Human|Assistant):")
TEXT_FIELDS = {
    "text": ("text",),
    "prompts": ("prompt",),
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
}
OPTIONAL_FIELDS = {
    "text": (),
    "prompts": ("tags", "metadata"),
    "sft": ("metadata",),
    "preference": ("p_chosen", "metadata"),
}


class DataError(ValueError):
    """A record or file that cannot be used; the message names file and line.

    `reason` is the key under which a skipped record is counted."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


def describe_counts(counts: Mapping[str, int]) -> str:
    """`"reason: n, ..."` for a skip counter, sorted by reason."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def expand_inputs(inputs: str | Sequence[str]) -> list[Path]:
    """Files named by a path, a glob, or a list of them (sorted, de-duplicated). An
    existing file is taken as named even if its path holds glob characters (`[`, `*`)."""
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    if not patterns:
        raise DataError("no input files given")
    paths: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser())
        literal = Path(pattern).is_file() or not glob.has_magic(pattern)
        matches = [pattern] if literal else sorted(glob.glob(pattern))
        if not matches:
            raise DataError(f"no file matches {pattern!r}", reason="missing_file")
        for m in matches:
            if not Path(m).is_file():
                raise DataError(f"input file not found: {m}", reason="missing_file")
            if Path(m) not in paths:
                paths.append(Path(m))
    return paths


def normalise_prompt(prompt: str, where: str) -> str:
    """A prompt as a transcript ending on a Human turn (plain text becomes one turn)."""
    text = prompt.strip()
    if not text:
        raise DataError(f"{where}: the prompt is empty", reason="empty_field")
    if not _HEADER.search("\n\n" + text):
        return f"\n\nHuman: {text}"
    text = "\n\n" + text
    if text.endswith(ASSISTANT):  # an open Assistant header: the response would follow
        text = text[: -len(ASSISTANT)].rstrip()
    try:
        turns = parse_conversation(text)
    except ConversationError as e:
        raise DataError(f"{where}: prompt is not a valid transcript ({e})") from None
    if turns[-1].role != "Human":
        raise DataError(f"{where}: a prompt transcript must end with a Human turn")
    if any(not t.text.strip() for t in turns):
        raise DataError(f"{where}: prompt transcript has an empty turn", reason="empty_field")
    return text


def conversation_text(prompt: str, response: str) -> str:
    """The transcript of a stored prompt answered by `response` (the final turn)."""
    return f"{prompt}{ASSISTANT} {response.strip()}"


def split_hh(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of an hh-rlhf pair of transcripts."""
    parts = []
    for name, transcript in (("chosen", chosen), ("rejected", rejected)):
        cut = transcript.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"{where}: the {name} transcript has no '\\n\\nAssistant:' turn")
        response = transcript[cut + len(ASSISTANT) :]
        if "\n\nHuman:" in response:
            raise DataError(f"{where}: the {name} transcript does not end with an Assistant turn")
        parts.append((transcript[:cut], response.strip()))
    (prompt_c, resp_c), (prompt_r, resp_r) = parts
    if prompt_c != prompt_r:
        raise DataError(
            f"{where}: chosen and rejected differ before their last Assistant turn",
            reason="prompt_mismatch",
        )
    for name, text in (("chosen", resp_c), ("rejected", resp_r)):
        if not text:
            raise DataError(f"{where}: the {name} response is empty", reason="empty_field")
    return prompt_c, resp_c, resp_r


def _text_field(record: Mapping[str, Any], key: str, name: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}", reason="missing_field")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {key!r} must be text, got {type(value).__name__}", reason="not_text"
        )
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty", reason="empty_field")
    return value


def _message_list(value: Any, name: str, where: str) -> list[dict[str, str]]:
    """A JSON list of chat messages, checked, with no empty content."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages")
    try:
        messages = check_messages(value, f"{where}: field {name!r}")
    except ChatError as e:
        raise DataError(str(e), reason="bad_value") from None
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise DataError(f"{where}: field {name!r} message {i} is empty", reason="empty_field")
    return messages


def _prompt_from_messages(messages: list[dict[str, str]], name: str, where: str) -> str:
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the {name!r} messages must end with a user message")
    try:
        return transcript_from_messages(messages)
    except ChatError as e:
        raise DataError(f"{where}: field {name!r}: {e}", reason="bad_value") from None


def _conversation_fields(raw: Mapping[str, Any], kind: str, key, where: str) -> dict[str, Any]:
    """Chat-message forms of the text fields, as the text forms they stand for."""
    out: dict[str, Any] = {}
    if kind == "sft" and key("messages") in raw and key("prompt") not in raw:
        messages = _message_list(raw[key("messages")], key("messages"), where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(
                f"{where}: field {key('messages')!r} must end with the assistant message "
                "to learn, after at least one user message"
            )
        out["prompt"] = _prompt_from_messages(messages[:-1], key("messages"), where)
        out["response"] = messages[-1]["content"]
        return out
    if isinstance(raw.get(key("prompt")), list):
        messages = _message_list(raw[key("prompt")], key("prompt"), where)
        out["prompt"] = _prompt_from_messages(messages, key("prompt"), where)
    for name in ("response", "chosen", "rejected"):
        if isinstance(raw.get(key(name)), list):
            messages = _message_list(raw[key(name)], key(name), where)
            if len(messages) != 1 or messages[0]["role"] != "assistant":
                raise DataError(
                    f"{where}: field {key(name)!r} as a list must hold one assistant message"
                )
            out[name] = messages[0]["content"]
    return out


def _optional(record: Mapping[str, Any], key: str, name: str, where: str) -> Any:
    value = record.get(key)
    if value is None:
        return {"tags": [], "metadata": {}, "p_chosen": 1.0}[name]
    if name == "tags":
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise DataError(f"{where}: field {key!r} must be a list of strings", reason="bad_value")
    elif name == "metadata":
        if not isinstance(value, dict):
            raise DataError(f"{where}: field {key!r} must be a JSON object", reason="bad_value")
    elif name == "p_chosen":
        try:
            number = float(value) if isinstance(value, int | float) else math.nan
        except OverflowError:
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or not 0 <= number <= 1:
            raise DataError(
                f"{where}: field {key!r} must be a number in [0, 1], got {value!r}",
                reason="bad_value",
            )
        value = number
    return value


def _parse_line(
    line: str, kind: str, fmt: str, fields: Mapping[str, str], where: str
) -> dict[str, Any]:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    key = lambda name: fields.get(name, name)
    record: dict[str, Any] = {"source": where}
    if fmt == "hh":
        chosen = _text_field(raw, key("chosen"), "chosen", where)
        rejected = _text_field(raw, key("rejected"), "rejected", where)
        prompt, resp_c, resp_r = split_hh(chosen, rejected, where)
        record["prompt"] = normalise_prompt(prompt, where)
        if kind == "sft":
            record["response"] = resp_c
        elif kind == "preference":
            record.update(chosen=resp_c, rejected=resp_r)
    else:
        converted = _conversation_fields(raw, kind, key, where)
        for name in TEXT_FIELDS[kind]:
            if name in converted:
                record[name] = converted[name]
            else:
                record[name] = _text_field(raw, key(name), name, where)
        if "prompt" in record:
            record["prompt"] = normalise_prompt(record["prompt"], where)
        for name in ("response", "chosen", "rejected"):
            if name in record:
                record[name] = record[name].strip()
    if kind == "preference" and record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: chosen and rejected responses are identical", reason="identical")
    for name in OPTIONAL_FIELDS[kind]:
        record[name] = _optional(raw, key(name), name, where)
    return record


def read_lines(
    path: Path, parse: Callable[[str, str], T], skipped: collections.Counter | None = None
) -> Iterator[T]:
    """`parse(line, "file:line")` of each non-blank line of `path`. A line that is not
    UTF-8, or that `parse` rejects with a `DataError`, raises; with a `skipped` counter it
    is counted by reason and left out instead (a missing file always raises)."""
    with path.open("rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{where}: not UTF-8 text ({e.reason} at byte {e.start})",
                        reason="encoding",
                    ) from None
                yield parse(line, where)
            except DataError as e:
                if skipped is None or e.reason == "missing_file":
                    raise
                skipped[e.reason] += 1


def read_records(
    inputs: str | Sequence[str],
    kind: str,
    fmt: str = "jsonl",
    *,
    fields: Mapping[str, str] | None = None,
    skipped: collections.Counter | None = None,
) -> Iterator[dict[str, Any]]:
    """Validated records of `kind` from files in `fmt`, in file and line order.

    With a `skipped` counter, bad records are counted by reason and left out; without
    one, the first bad record raises `DataError` naming its file and line.
    """
    if kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; choose one of {KINDS}")
    if fmt not in FORMATS:
        raise DataError(f"unknown input format {fmt!r}; choose one of {FORMATS}")
    if fmt == "hh" and kind == "text":
        raise DataError("format=hh holds conversations; use kind=prompts, sft or preference")
    fields = dict(fields or {})
    for path in expand_inputs(inputs):
        yield from read_lines(
            path, lambda line, where: _parse_line(line, kind, fmt, fields, where), skipped
        )
