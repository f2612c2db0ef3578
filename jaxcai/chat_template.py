"""The `template` chat format: `TemplateFormat` renders a checkpoint's own Jinja chat
template the way `transformers` does (a sandboxed environment, `raise_exception`,
`strftime_now`, the special tokens as variables), finds the assistant mask without
`{% generation %}` markers, and probes the template's end-of-turn token;
`find_template` reads a checkpoint directory's template.

The assistant mask: the template is also rendered with a unique marker in place of every
message's content, which shows where each content begins and ends in the real rendering.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxcai.chat_format import ChatError, ChatFormat, EncodedChat, check_messages
from jaxcai.tokenizer import Tokenizer, read_json, token_range

__all__ = ["TemplateFormat", "find_template"]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers some templates
    carry) renders its body; the mask is found without it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_MARK = "\ue000jaxcai-{}\ue001"
_MARK_RE = re.compile("\ue000jaxcai-(\\d+)\ue001")


class TemplateFormat(ChatFormat):
    """A checkpoint's Jinja chat template over its tokenizer."""

    kind = "template"

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        *,
        source: str = "<template>",
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        """`template_kwargs` are defaults for every rendering (e.g. Qwen3's
        `enable_thinking=False`); a call's own keywords win."""
        self.tokenizer, self.template, self.source = tokenizer, template, source
        self.template_kwargs = dict(template_kwargs or {})
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(
                f"{source}: the chat template does not parse (line {e.lineno}: {e})"
            ) from None
        self._eot = self._end_of_turn()

    def __reduce__(self):  # grain worker processes pickle it; the template recompiles
        args = (self.tokenizer, self.template, self.source, self.template_kwargs)
        return (_template_format, args)

    def describe(self) -> str:
        extra = f" with {self.template_kwargs}" if self.template_kwargs else ""
        return f"template ({self.source}){extra}"

    def render(self, messages, add_generation_prompt=False, **kwargs):
        msgs = check_messages(messages)
        return self._render(msgs, add_generation_prompt, kwargs)

    def _render(self, msgs: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        variables = {
            **self.tokenizer.special_tokens,
            **self.template_kwargs,
            **kwargs,
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
        }
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return self._compiled.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatError(
                f"{self.source}: the chat template refused the conversation: {e}"
            ) from None

    def encode(self, messages, add_generation_prompt=False, **kwargs):
        msgs = check_messages(messages)
        text = self._render(msgs, add_generation_prompt, kwargs)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        mask = [0] * len(ids)
        spans = []
        for i, (start, end) in self._assistant_chars(msgs, text, add_generation_prompt, kwargs):
            first, last = token_range(offsets, start, end)
            mask[first:last] = [1] * (last - first)
            spans.append((i, first, last))
        return EncodedChat(ids=ids, mask=mask, text=text, spans=spans)

    def _assistant_chars(
        self, msgs: list[dict], text: str, add_generation_prompt: bool, kwargs: dict
    ) -> list[tuple[int, tuple[int, int]]]:
        """Character ranges of each assistant message's content and end-of-turn text."""
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(msgs)]
        skeleton = self._render(marked, add_generation_prompt, kwargs)
        pieces = _MARK_RE.split(skeleton)  # chunk, index, chunk, index, ..., chunk
        chunks, order = pieces[0::2], [int(k) for k in pieces[1::2]]
        ranges = _place_contents(text, chunks, [msgs[i]["content"] for i in order])
        if ranges is None:  # the template branches on content: search for each content
            ranges, order = _search_contents(text, msgs)
        out = []
        for i, (start, end) in zip(order, ranges, strict=True):
            if msgs[i]["role"] != "assistant":
                continue
            out.append((i, (start, end + self._eot_length(text[end:]))))
        return out

    def _eot_length(self, following: str) -> int:
        """Characters after a content up to and including its end-of-turn token (0 if
        the turn is not closed there)."""
        best = None
        for eot in self._eot:
            pos = following.find(eot)
            if pos >= 0 and not following[:pos].strip() and (best is None or pos < best[0]):
                best = (pos, len(eot))
        return best[0] + best[1] if best else 0

    def _end_of_turn(self) -> tuple[str, ...]:
        """The special token(s) that close an assistant turn: the first special token the
        template writes after an assistant message's content (probed), else EOS."""
        specials = self.tokenizer.added_tokens
        found = []
        for probe in (
            [
                {"role": "user", "content": _MARK.format(0)},
                {"role": "assistant", "content": _MARK.format(1)},
            ],
            [
                {"role": "system", "content": _MARK.format(2)},
                {"role": "user", "content": _MARK.format(0)},
                {"role": "assistant", "content": _MARK.format(1)},
            ],
        ):
            try:
                skeleton = self._render(probe, False, {})
            except ChatError:
                continue
            after = skeleton.split(_MARK.format(1), 1)[-1] if _MARK.format(1) in skeleton else ""
            hits = [(after.find(s), -len(s), s) for s in specials if s in after]
            if hits:
                found.append(min(hits)[2])
                break
        eos = self.tokenizer.special_tokens.get("eos_token")
        return tuple(dict.fromkeys([*found, *([eos] if eos else [])]))

    @property
    def end_of_turn(self) -> tuple[str, ...]:
        return self._eot

    @property
    def stop_ids(self):
        ids = [self.tokenizer.token_to_id(s) for s in self._eot]
        return tuple(
            dict.fromkeys([i for i in ids if i is not None] + list(self.tokenizer.stop_ids))
        )

    def encode_text(self, text):
        return self.tokenizer.encode(text)  # the template writes any BOS itself

    def answer_text(self, user_text, assistant_prefix):
        opened = self.render([{"role": "user", "content": user_text.strip()}], True)
        return opened + assistant_prefix.lstrip()


def _template_format(
    tokenizer: Tokenizer, template: str, source: str, template_kwargs: dict
) -> TemplateFormat:
    return TemplateFormat(tokenizer, template, source=source, template_kwargs=template_kwargs)


def _place_contents(
    text: str, chunks: list[str], contents: list[str]
) -> list[tuple[int, int]] | None:
    """Content ranges in `text`, given the template's own text around each content
    (`chunks`, from the marked rendering) and the contents in the order the template
    wrote them; None if `text` does not follow them. A content the template wrote as
    given (or trimmed) is matched as such, so a content that itself holds template text
    (`<|im_end|>\\n<|im_start|>user`, say) is not cut short at it; any other content
    ends where the template's next text begins."""
    if not text.startswith(chunks[0]):
        return None
    pos, ranges = len(chunks[0]), []
    for k, chunk in enumerate(chunks[1:], start=1):
        if k == len(chunks) - 1:
            end = len(text) - len(chunk)
            if end < pos or not text.endswith(chunk):
                return None
        else:
            content = contents[k - 1]
            forms = dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
            end = next(
                (pos + len(f) for f in forms if text.startswith(f + chunk, pos)),
                text.find(chunk, pos),
            )
            if end < 0:
                return None
        ranges.append((pos, end))
        pos = end + len(chunk)
    return ranges


def _search_contents(text: str, msgs: list[dict]) -> tuple[list[tuple[int, int]], list[int]]:
    """Content ranges found by searching each message's (stripped) content in order."""
    ranges, order, cursor = [], [], 0
    for i, m in enumerate(msgs):
        content = m["content"].strip()
        if not content:
            continue
        pos = text.find(content, cursor)
        if pos < 0 and m["role"] == "assistant" and "</think>" in content:
            content = content.split("</think>")[-1].strip()
            pos = text.find(content, cursor)
        if pos < 0:
            if m["role"] == "assistant":
                raise ChatError(
                    f"assistant message {i}: its content does not appear in the rendered "
                    "template, so its tokens cannot be masked"
                )
            continue
        ranges.append((pos, pos + len(content)))
        order.append(i)
        cursor = pos + len(content)
    return ranges, order


# ----- loading --------------------------------------------------------------------------


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; bad JSON is a ChatError naming the file."""
    try:
        return read_json(path)
    except ValueError as e:
        raise ChatError(str(e)) from None


def find_template(directory: str | Path) -> tuple[str, str] | None:
    """(template text, where it came from) of a checkpoint directory, or None.
    `chat_template.jinja` (the newer layout) wins over `tokenizer_config.json`'s
    `chat_template` (a string, or a list of named templates: `default` is taken)."""
    directory = Path(directory)
    for where in (directory, directory / "tokenizer"):
        jinja_file = where / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        json_file = where / "chat_template.json"
        if json_file.is_file():
            value = _json_object(json_file).get("chat_template")
            if isinstance(value, str) and value:
                return value, str(json_file)
        config_file = where / "tokenizer_config.json"
        if config_file.is_file():
            value = _json_object(config_file).get("chat_template")
            if isinstance(value, list):
                named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
                value = named.get("default")
            if isinstance(value, str) and value:
                return value, f"{config_file} (chat_template)"
    return None
