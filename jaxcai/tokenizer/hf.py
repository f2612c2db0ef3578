"""The `tokenizer.json` backend: Hugging Face `tokenizers` (byte-level BPE of Llama-3 and
Qwen, byte-fallback BPE of Llama-2/Mistral/Gemma, Unigram, WordPiece).

Special tokens come from the checkpoint the way `transformers` reads them:
`tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `add_bos_token`,
`clean_up_tokenization_spaces`), then `special_tokens_map.json`; whether a BOS leads a
sequence from `add_bos_token`, else from the post-processor; extra stop ids from
`generation_config.json` (`eos_token_id`, an id or a list).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, pre_tokenizers

from jaxcai.tokenizer.base import Offsets, Tokenizer

__all__ = ["HFTokenizer", "read_json"]

SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} when the file is absent); bad JSON names the file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_string(value: Any) -> str | None:
    """A special token as written in the configs: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` with the checkpoint's special-token settings."""

    def __init__(
        self,
        tokenizer_json: str,
        *,
        files: dict[str, str] | None = None,
        source: str = "<tokenizer.json>",
        directory: str | None = None,
    ):
        self.source, self.directory = source, directory
        self._json = tokenizer_json
        self.files = dict(files or {})  # side files' texts, kept for save() and pickling
        try:
            self.tk = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises plain Exceptions
            raise ValueError(f"{source}: not a Hugging Face tokenizer.json ({e})") from e
        config = self._config("tokenizer_config.json")
        _rebuild_like_transformers(self.tk, config)
        special_map = self._config("special_tokens_map.json")
        generation = self._config("generation_config.json")

        self.special_tokens = {}
        ids: dict[str, int | None] = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token, where = _token_string(config.get(name)), "tokenizer_config.json"
            if not token:
                token, where = _token_string(special_map.get(name)), "special_tokens_map.json"
            ids[name] = self.tk.token_to_id(token) if token else None
            if token and ids[name] is None:
                raise ValueError(f"{source}: {name} {token!r} ({where}) is not in the vocabulary")
            if token:
                self.special_tokens[name] = token
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self._pad = ids["pad_token"]
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.eos_id is None and gen_eos:
            self.eos_id = int(gen_eos[0])
        self._stop = tuple(
            dict.fromkeys(([self.eos_id] if self.eos_id is not None else []) + gen_eos)
        )
        if isinstance(config.get("add_bos_token"), bool):
            self.adds_bos = config["add_bos_token"] and self.bos_id is not None
        else:  # the post-processor decides, as in `transformers`
            plain = self.tk.encode("a", add_special_tokens=False).ids
            full = self.tk.encode("a", add_special_tokens=True).ids
            self.adds_bos = (
                self.bos_id is not None and len(full) > len(plain) and full[0] == self.bos_id
            )
        # `transformers` skips this cleanup for BPE models (it would eat real spaces).
        bpe = type(self.tk.model).__name__ == "BPE"
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and not bpe
        added = self.tk.get_added_tokens_decoder()  # id -> AddedToken
        self._vocab_size = max(
            self.tk.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1
        )

    def _config(self, name: str) -> dict[str, Any]:
        text = self.files.get(name)
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.directory or self.source}/{name}: invalid JSON ({e})") from e
        return value if isinstance(value, dict) else {}

    @property
    def config(self) -> dict[str, Any]:
        """`tokenizer_config.json` as read ({} when the checkpoint has none)."""
        return self._config("tokenizer_config.json")

    def __reduce__(self):  # grain worker processes need to pickle it
        return (
            _rebuild,
            (self._json, self.files, self.source, self.directory),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """A `tokenizer.json`, with the side files found beside it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        files = {}
        for name in SIDE_FILES:
            side = path.parent / name
            if side.is_file():
                files[name] = side.read_text(encoding="utf-8")
                if name.endswith(".json"):
                    read_json(side)  # a malformed side file fails here, named
        return cls(
            path.read_text(encoding="utf-8"),
            files=files,
            source=str(path),
            directory=str(path.parent),
        )

    # ----- the backend ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """The pad token's id, else EOS, else 0 (padding is always masked)."""
        if self._pad is not None:
            return self._pad
        return self.eos_id if self.eos_id is not None else 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    @property
    def added_tokens(self) -> list[str]:
        return [t.content for t in self.tk.get_added_tokens_decoder().values() if t.content]

    def _encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        enc = self.tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode(self, text, *, add_bos: bool = False, add_eos: bool = False):
        if isinstance(text, str):
            return self._wrap(self.tk.encode(text, add_special_tokens=False).ids, add_bos, add_eos)
        batch = self.tk.encode_batch(list(text), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in batch]

    def _decode(self, ids: list[int]) -> str:
        text = self.tk.decode(ids, skip_special_tokens=False)
        return _clean_up_spaces(text) if self._cleanup else text

    def save(self, directory: str | os.PathLike) -> list[str]:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self._json, encoding="utf-8")
        written = ["tokenizer.json"]
        for name, text in self.files.items():
            if name == "generation_config.json" and (out / name).exists():
                continue  # the model's own generation settings win
            (out / name).write_text(text, encoding="utf-8")
            written.append(name)
        return written


def _rebuild_like_transformers(tk: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
    """Where `transformers` 5 rebuilds a class's pipeline instead of using the file's,
    do the same, so ids match `AutoTokenizer`. Llama-2/Mistral-style byte-fallback BPE
    (`tokenizer_class` LlamaTokenizer) gets a Metaspace pre-tokenizer that adds the word
    prefix once at the start ("first"; with `legacy: true`, after special tokens too)
    instead of the file's Prepend normalizer. Qwen2 and Gemma classes rebuild what their
    files already hold."""
    if config.get("tokenizer_class") not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    legacy = config.get("legacy", False)
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)


def _rebuild(tokenizer_json: str, files: dict[str, str], source: str, directory: str | None):
    return HFTokenizer(tokenizer_json, files=files, source=source, directory=directory)


def _clean_up_spaces(text: str) -> str:
    """`transformers`' `clean_up_tokenization`: no space before punctuation and
    contractions (used when `clean_up_tokenization_spaces` is true)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text
