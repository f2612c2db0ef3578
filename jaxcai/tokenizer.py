"""Sentencepiece tokenizer and the Human/Assistant conversation format.

Conversations are written the way the Constitutional AI data writes them:

    "\\n\\nHuman: <text>\\n\\nAssistant: <text>\\n\\nHuman: ..."

`encode_conversation` tokenizes the whole string once (so ids equal `encode(text)`) and
returns, for each turn, the token span of its content, using sentencepiece's byte
offsets. A token that straddles a header and the content (the space after the colon,
say) belongs to the content.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import sentencepiece as spm

__all__ = [
    "ROLES",
    "ConversationError",
    "EncodedConversation",
    "Tokenizer",
    "Turn",
    "TurnSpan",
    "answer_context",
    "default_tokenizer_path",
    "format_conversation",
    "load",
    "parse_conversation",
]

ROLES = ("Human", "Assistant")
_HEADER = re.compile(r"\n\n(Human|Assistant):")


class ConversationError(ValueError):
    """A conversation string or turn list that does not follow the format."""


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "Human" or "Assistant"
    text: str


@dataclasses.dataclass(frozen=True)
class TurnSpan:
    """Tokens `[start, end)` hold the content of one turn (its header excluded)."""

    role: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    ids: list[int]
    spans: list[TurnSpan]
    text: str


def _header(role: str) -> str:
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
        parts.append(f"{_header(role)} {text.strip()}")
    if open_assistant:
        parts.append(_header("Assistant"))
    return "".join(parts)


def answer_context(prompt: str) -> str:
    """A stored prompt (a transcript ending on a Human turn) opened for the assistant's
    answer: the text a sampler continues."""
    return f"{prompt.rstrip()}{_header('Assistant')}"


def _turn_bounds(text: str) -> list[tuple[str, int, int]]:
    """(role, content start, content end) character offsets of each turn in `text`."""
    headers = list(_HEADER.finditer(text))
    if not headers or headers[0].start() != 0:
        raise ConversationError(
            "a conversation must start with '\\n\\nHuman:' or '\\n\\nAssistant:', got "
            f"{text[:40]!r}"
        )
    bounds = []
    for i, m in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        start = m.end() + (1 if text[m.end() : m.end() + 1] == " " else 0)
        bounds.append((m.group(1), start, end))
    return bounds


def parse_conversation(text: str) -> list[Turn]:
    """Split a formatted conversation back into turns (inverse of `format_conversation`)."""
    return [Turn(role, text[start:end]) for role, start, end in _turn_bounds(text)]


def default_tokenizer_path() -> Path:
    """The small tokenizer the package ships (trained by `scripts/train_tokenizer.py`)."""
    return Path(str(resources.files("jaxcai") / "assets" / "tokenizer.model"))


class Tokenizer:
    """A sentencepiece model with batch encode/decode and conversation spans."""

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>"):
        self.source = source
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(f"{source}: not a sentencepiece model ({e})") from e

    def __reduce__(self):  # pickles as the model bytes (grain worker processes need it)
        return (_from_proto, (self._proto, self.source))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """Load a `.model` file; with no path, the tokenizer shipped with the package."""
        path = Path(path) if path is not None else default_tokenizer_path()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    @classmethod
    def train(
        cls,
        files: Iterable[str | os.PathLike],
        model_path: str | os.PathLike,
        *,
        vocab_size: int = 1024,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        num_threads: int = 1,
        extra_symbols: Sequence[str] = (),
    ) -> Tokenizer:
        """Train a byte-fallback sentencepiece model on text files and write `model_path`.

        Ids: pad 0, unk 1, bos 2, eos 3. Text is not normalised and whitespace is kept,
        so `decode(encode(text)) == text` for any text; `\\n` is its own piece.
        """
        files = [str(f) for f in files]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"tokenizer training file not found: {f}")
        model_path = Path(model_path)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "sp")
            spm.SentencePieceTrainer.train(
                input=",".join(files),
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                user_defined_symbols=["\n", *extra_symbols],
                num_threads=num_threads,
                minloglevel=2,
                input_sentence_size=0,
                shuffle_input_sentence=False,
            )
            model_path.write_bytes(Path(prefix + ".model").read_bytes())
        return cls.load(model_path)

    # ----- ids --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The padding id (sentencepiece's pad, else 0)."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    # ----- encode / decode --------------------------------------------------------------

    def encode(
        self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int] | list[list[int]]:
        """Ids of one text, or a list of id lists for a list of texts."""
        if isinstance(text, str):
            return self.sp.encode(text, add_bos=add_bos, add_eos=add_eos)
        return self.sp.encode(list(text), add_bos=add_bos, add_eos=add_eos)

    def split_continuation(
        self, prompt: str, continuation: str, *, add_bos: bool = True
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, continuation ids) of `prompt + continuation` encoded as one text:
        the continuation's ids are the ones the model sees after the prompt. (Encoded on
        its own, " (A)" would gain sentencepiece's leading-space piece and differ.) Where
        the join merges tokens, the merged ones count as the continuation's."""
        alone = self.encode(prompt, add_bos=add_bos)
        joined = self.encode(prompt + continuation, add_bos=add_bos)
        cut = 0
        while cut < min(len(alone), len(joined)) and alone[cut] == joined[cut]:
            cut += 1
        if cut == len(joined):  # the continuation added no tokens; keep its last one
            cut -= 1
        return joined[:cut], joined[cut:]

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id list, or a list of texts for a list of id lists."""
        if len(ids) and not isinstance(ids[0], int | np.integer):
            return [self.sp.decode([int(i) for i in row]) for row in ids]
        return self.sp.decode([int(i) for i in ids])

    def encode_conversation(
        self,
        conversation: str | Sequence[Turn | tuple[str, str]],
        *,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> EncodedConversation:
        """Token ids of a conversation and the token span of each turn's content."""
        text = conversation if isinstance(conversation, str) else format_conversation(conversation)
        bounds = _turn_bounds(text)
        pieces = self.sp.encode(text, return_type="proto").pieces
        # Byte offsets of each piece in the UTF-8 text; map turn bounds to bytes too.
        char_to_byte = _char_to_byte(text)
        offset = 1 if add_bos else 0
        spans = []
        for role, start_char, end_char in bounds:
            start_b, end_b = char_to_byte[start_char], char_to_byte[end_char]
            # Byte-fallback pieces of one character share its start offset (begin == end
            # for all but the last), so a piece belongs to the turn if it ends past the
            # start or begins at it.
            first = next(
                (i for i, p in enumerate(pieces) if p.end > start_b or p.begin >= start_b),
                len(pieces),
            )
            last = next(
                (i for i, p in enumerate(pieces) if p.begin >= end_b and i >= first), len(pieces)
            )
            spans.append(TurnSpan(role, first + offset, last + offset))
        ids = [p.id for p in pieces]
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return EncodedConversation(ids=ids, spans=spans, text=text)


def _from_proto(model_proto: bytes, source: str) -> Tokenizer:
    return Tokenizer(model_proto, source=source)


def _char_to_byte(text: str) -> list[int]:
    """Byte offset in UTF-8 of every character index (and of the end)."""
    offsets, total = [], 0
    for ch in text:
        offsets.append(total)
        total += len(ch.encode("utf-8"))
    offsets.append(total)
    return offsets


def load(path: str | os.PathLike | None = None) -> Tokenizer:
    """`Tokenizer.load`: a sentencepiece `.model`, or the bundled one when `path` is None."""
    return Tokenizer.load(path)
