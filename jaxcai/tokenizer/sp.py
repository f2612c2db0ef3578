"""The sentencepiece backend: a `.model` file (the bundled tokenizer, Llama-2, Gemma...)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from jaxcai.tokenizer.base import Offsets, Tokenizer

__all__ = ["SentencePieceTokenizer"]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with batch encode/decode and conversation spans."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        source: str = "<bytes>",
        directory: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ):
        self.source, self.directory = source, directory
        self._proto = model_proto
        self._extra_stop_ids = tuple(extra_stop_ids)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(f"{source}: not a sentencepiece model ({e})") from e
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.adds_bos = self.bos_id is not None
        self.special_tokens = {
            name: self.sp.id_to_piece(i)
            for name, i in (
                ("bos_token", self.sp.bos_id()),
                ("eos_token", self.sp.eos_id()),
                ("pad_token", self.sp.pad_id()),
                ("unk_token", self.sp.unk_id()),
            )
            if i >= 0
        }

    def __reduce__(self):  # pickles as the model bytes (grain worker processes need it)
        return (_from_proto, (self._proto, self.source, self.directory, self._extra_stop_ids))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, directory: str | None = None, extra_stop_ids=()
    ) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        data = path.read_bytes()
        if _looks_like_tiktoken(data):
            raise ValueError(
                f"{path}: this is a tiktoken BPE file (Llama-3's original/tokenizer.model), "
                "not a sentencepiece model; point at the checkpoint directory or its "
                "tokenizer.json instead"
            )
        return cls(data, source=str(path), directory=directory, extra_stop_ids=extra_stop_ids)

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
    ) -> SentencePieceTokenizer:
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
        return cls.from_file(model_path)

    # ----- the backend ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The padding id (sentencepiece's pad, else 0)."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        base = (self.eos_id,) if self.eos_id is not None else ()
        return tuple(dict.fromkeys((*base, *self._extra_stop_ids)))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def _encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        pieces = self.sp.encode(text, return_type="proto").pieces
        to_char = _byte_to_char(text)
        return [p.id for p in pieces], [(to_char[p.begin], to_char[p.end]) for p in pieces]

    def encode(self, text, *, add_bos: bool = False, add_eos: bool = False):
        # sentencepiece's own batch encode is faster than one call per text.
        bos = add_bos and self.adds_bos
        if isinstance(text, str):
            return self.sp.encode(text, add_bos=bos, add_eos=add_eos)
        return self.sp.encode(list(text), add_bos=bos, add_eos=add_eos)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def save(self, directory: str | os.PathLike) -> list[str]:
        Path(directory).mkdir(parents=True, exist_ok=True)
        target = Path(directory) / "tokenizer.model"
        if Path(self.source).is_file() and Path(self.source).resolve() != target.resolve():
            shutil.copyfile(self.source, target)
        elif not target.exists():
            target.write_bytes(self._proto)
        return ["tokenizer.model"]


def _from_proto(
    model_proto: bytes, source: str, directory: str | None = None, extra_stop_ids=()
) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(
        model_proto, source=source, directory=directory, extra_stop_ids=extra_stop_ids
    )


def _byte_to_char(text: str) -> dict[int, int]:
    """Character index of every UTF-8 byte offset that starts a character (and the end);
    offsets inside a character map to that character."""
    out, total = {}, 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        for k in range(n):
            out[total + k] = i
        total += n
    out[total] = len(text)
    return out


def _looks_like_tiktoken(data: bytes) -> bool:
    """tiktoken files are text lines `<base64 token> <rank>`; sentencepiece is protobuf."""
    head = data[:4096].split(b"\n")[:8]
    lines = [line for line in head if line.strip()]
    if not lines:
        return False
    try:
        return all(
            len(parts := line.decode("ascii").split()) == 2 and parts[1].isdigit() for line in lines
        )
    except UnicodeDecodeError:
        return False
