"""`Tokenizer`: the interface both backends (sentencepiece, `tokenizer.json`) implement.

A backend supplies `_encode_offsets(text) -> (ids, char offsets)` for one text without
special tokens added, `_decode(ids)`, and its special ids; everything else (batch forms,
BOS/EOS, conversation spans, `split_continuation`) is shared here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxcai.tokenizer.transcript import EncodedConversation, format_conversation, turn_bounds

__all__ = ["Tokenizer", "token_range"]

Offsets = list[tuple[int, int]]


def token_range(offsets: Offsets, start: int, end: int) -> tuple[int, int]:
    """Tokens `[first, last)` covering characters `[start, end)` of the encoded text.

    A token that straddles the start (the space after a header, say) belongs to the
    range; several tokens of one character (byte fallback) share its offsets, so a token
    belongs if it ends past `start` or begins at it, and the range stops at the first
    token that begins at or after `end`."""
    n = len(offsets)
    first = next((i for i, (b, e) in enumerate(offsets) if e > start or b >= start), n)
    last = next((i for i in range(first, n) if offsets[i][0] >= end), n)
    return first, last


class Tokenizer:
    """Text <-> ids. `Tokenizer.load(path)` picks the backend (see `jaxcai.tokenizer.load`).

    Attributes every backend sets: `source` (where it was read from), `bos_id`, `eos_id`
    (None when the vocabulary has none), `pad_id`, `stop_ids` (ids that end generation:
    EOS and the checkpoint's `generation_config.json` EOS ids), `adds_bos` (whether the
    model expects a BOS in front of a sequence) and `directory` (the checkpoint directory
    it came from, or None)."""

    source: str = "<unknown>"
    directory: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    adds_bos: bool = True
    special_tokens: dict[str, str] = {}  # bos/eos/pad/unk token strings (template variables)

    # ----- what a backend provides ------------------------------------------------------

    def _encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (a special token such as `<|im_end|>`), or None."""
        raise NotImplementedError

    @property
    def added_tokens(self) -> list[str]:
        """Special and added token strings (`<|im_end|>`, ...): what a chat template may
        write around a message."""
        return [t for t in self.special_tokens.values() if t]

    def save(self, directory: str) -> list[str]:
        """Write the tokenizer files into `directory`; returns the names written."""
        raise NotImplementedError

    # ----- shared -----------------------------------------------------------------------

    @classmethod
    def load(cls, path=None) -> Tokenizer:
        """`jaxcai.tokenizer.load`: a checkpoint directory, a `tokenizer.json` or a
        `.model`; the tokenizer shipped with the package when `path` is None."""
        from jaxcai.tokenizer import load

        return load(path)

    @staticmethod
    def train(files, model_path, **options) -> Tokenizer:
        """Train a sentencepiece model (`SentencePieceTokenizer.train`)."""
        from jaxcai.tokenizer.sp import SentencePieceTokenizer

        return SentencePieceTokenizer.train(files, model_path, **options)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,) if self.eos_id is not None else ()

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.adds_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode(
        self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int] | list[list[int]]:
        """Ids of one text, or a list of id lists for a list of texts. Special-token
        strings in the text become their ids (as `transformers` does); `add_bos` adds the
        BOS only for models that use one (`adds_bos`)."""
        if isinstance(text, str):
            return self._wrap(self._encode_offsets(text)[0], add_bos, add_eos)
        return [self._wrap(self._encode_offsets(t)[0], add_bos, add_eos) for t in text]

    def encode_with_offsets(self, text: str, *, add_bos: bool = False) -> tuple[list[int], Offsets]:
        """Ids and each token's `(start, end)` character offsets in `text` (a BOS added
        by `add_bos` gets `(0, 0)`)."""
        ids, offsets = self._encode_offsets(text)
        if add_bos and self.adds_bos and self.bos_id is not None:
            return [self.bos_id, *ids], [(0, 0), *offsets]
        return list(ids), list(offsets)

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id list, or a list of texts for a list of id lists."""
        if len(ids) and not isinstance(ids[0], int | np.integer):
            return [self._decode([int(i) for i in row]) for row in ids]
        return self._decode([int(i) for i in ids])

    def split_continuation(
        self, prompt: str, continuation: str, *, add_bos: bool = True
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, continuation ids) of `prompt + continuation` encoded as one text:
        the continuation's ids are the ones the model sees after the prompt. (Encoded on
        its own, " (A)" may tokenize differently.) Where the join merges tokens, the
        merged ones count as the continuation's."""
        alone = self.encode(prompt, add_bos=add_bos)
        joined = self.encode(prompt + continuation, add_bos=add_bos)
        cut = 0
        while cut < min(len(alone), len(joined)) and alone[cut] == joined[cut]:
            cut += 1
        if cut == len(joined):  # the continuation added no tokens; keep its last one
            cut -= 1
        return joined[:cut], joined[cut:]

    def encode_conversation(
        self,
        conversation: str | Sequence,
        *,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> EncodedConversation:
        """Token ids of a Human/Assistant transcript and the token span of each turn's
        content (ids equal `encode(text)`)."""
        from jaxcai.tokenizer.transcript import TurnSpan

        text = conversation if isinstance(conversation, str) else format_conversation(conversation)
        bounds = turn_bounds(text)
        ids, offsets = self._encode_offsets(text)
        full = self._wrap(list(ids), add_bos, add_eos)
        lead = 1 if add_bos and self.adds_bos and self.bos_id is not None else 0
        spans = []
        for role, start, end in bounds:
            first, last = token_range(offsets, start, end)
            spans.append(TurnSpan(role, first + lead, last + lead))
        return EncodedConversation(ids=full, spans=spans, text=text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size})"
