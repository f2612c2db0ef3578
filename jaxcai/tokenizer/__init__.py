"""Tokenizers: one `Tokenizer` interface, two backends.

- `tokenizer.json` (Hugging Face `tokenizers`): what Qwen, Llama-3, Gemma and most
  current checkpoints ship (`jaxcai.tokenizer.hf.HFTokenizer`);
- sentencepiece `.model` (`jaxcai.tokenizer.sp.SentencePieceTokenizer`): the bundled
  tokenizer and older checkpoints.

`load(path)` takes a checkpoint directory, a `tokenizer.json` or a `.model`; in a
directory it prefers `tokenizer.json`, as `transformers` does. The Human/Assistant
transcript helpers (`format_conversation`, ...) live in `jaxcai.tokenizer.transcript`
and are re-exported here; `jaxcai.chat` builds chat formats on top.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from jaxcai.tokenizer.base import Tokenizer, token_range
from jaxcai.tokenizer.hf import HFTokenizer, read_json
from jaxcai.tokenizer.sp import SentencePieceTokenizer
from jaxcai.tokenizer.transcript import (
    ROLES,
    ConversationError,
    EncodedConversation,
    Turn,
    TurnSpan,
    answer_context,
    format_conversation,
    parse_conversation,
)

__all__ = [
    "ROLES",
    "ConversationError",
    "EncodedConversation",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "Turn",
    "TurnSpan",
    "answer_context",
    "default_tokenizer_path",
    "find_tokenizer",
    "format_conversation",
    "load",
    "parse_conversation",
    "token_range",
]

LOOKED_FOR = ("tokenizer.json", "tokenizer.model")


class TokenizerError(FileNotFoundError):
    """No usable tokenizer where one was named."""


def default_tokenizer_path() -> Path:
    """The small tokenizer the package ships (trained by `scripts/train_tokenizer.py`)."""
    return Path(str(resources.files("jaxcai") / "assets" / "tokenizer.model"))


def find_tokenizer(directory: str | os.PathLike) -> Path | None:
    """The tokenizer file a directory holds (`tokenizer.json` first), or None. A jaxcai
    training run keeps its tokenizer in `tokenizer/`."""
    directory = Path(directory)
    for where in (directory, directory / "tokenizer"):
        for name in LOOKED_FOR:
            if (where / name).is_file():
                return where / name
    return None


def load(path: str | os.PathLike | None = None) -> Tokenizer:
    """A checkpoint directory, a `tokenizer.json` or a sentencepiece `.model`; the
    tokenizer shipped with the package when `path` is None."""
    if path is None:
        return SentencePieceTokenizer.from_file(default_tokenizer_path())
    path = Path(path).expanduser()
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            present = sorted(p.name for p in path.iterdir())[:20]
            raise TokenizerError(
                f"{path}: no tokenizer found (looked for {', '.join(LOOKED_FOR)} and "
                f"tokenizer/{{{','.join(LOOKED_FOR)}}}; the directory holds {present})"
            )
        path = found
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    generation = read_json(path.parent / "generation_config.json").get("eos_token_id")
    extra = [generation] if isinstance(generation, int) else list(generation or [])
    return SentencePieceTokenizer.from_file(path, directory=str(path.parent), extra_stop_ids=extra)
