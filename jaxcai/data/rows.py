"""Random-access rows of a split (evaluation, reference log-probs), by example index.

`ArrayRows` holds rows in memory; `MapRows` encodes examples on demand; `eval_rows` gives
every example of a split once, in order, as `max_len` rows. An index of `EMPTY` is a
padding row: zero weight, zero loss mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxcai.chat import ChatFormat
from jaxcai.data.pipeline import (
    EMPTY,
    SEQ_KEYS,
    IndexedSource,
    Layout,
    _Encode,
    _packed_rows,
    _stack_packed,
    encode_example,
    pad_id_of,
    pad_rows,
)
from jaxcai.tokenizer import Tokenizer

__all__ = ["ArrayRows", "MapRows", "eval_rows"]


class ArrayRows:
    """Rows held in memory as arrays with a leading example axis."""

    def __init__(self, arrays: dict[str, Any], pad_id: int = 0):
        self.arrays, self.pad_id = arrays, pad_id

    def __len__(self) -> int:
        return len(self.arrays["weight"])

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        """Rows at `indices` (any shape); `EMPTY` indices give zero-weight, masked rows."""
        valid = indices != EMPTY
        rows = _map(lambda a: a[np.where(valid, indices, 0)], self.arrays)
        return _zero_invalid(rows, valid)


class MapRows:
    """Examples encoded on demand from an `IndexedSource`, padded to `max_len`."""

    def __init__(
        self, source: IndexedSource, tok: Tokenizer | ChatFormat, layout: Layout, ref=None
    ):
        self.source, self.tok, self.layout, self.ref = source, tok, layout, ref

    def __len__(self) -> int:
        return len(self.source)

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        flat = np.asarray(indices).reshape(-1)
        valid = flat != EMPTY
        examples = [
            encode_example(self.source[int(i) if ok else 0], self.tok, self.layout, self.ref)
            for i, ok in zip(flat, valid, strict=True)
        ]
        rows = pad_rows(examples, self.layout, pad_id_of(self.tok), length=self.layout.max_len)
        rows = _zero_invalid(rows, valid)
        return _map(lambda a: a.reshape(*np.shape(indices), *a.shape[1:]), rows)


def _map(fn, tree: Any) -> Any:
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _zero_invalid(rows: dict[str, Any], valid: np.ndarray) -> dict[str, Any]:
    def walk(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value)
            elif key == "mask":
                tree[key] = value * valid[..., None]
            elif key == "weight":
                tree[key] = value * valid

    walk(rows)
    return rows


def eval_rows(
    source: IndexedSource, tok: Tokenizer | ChatFormat, layout: Layout, ref=None
) -> ArrayRows:
    """Every example of `source` once, in order, as `max_len` rows in memory (text is
    concatenated and split; other kinds take one row per example, unpacked)."""
    fixed = dataclasses.replace(layout, pad="fixed", pack=False)
    if layout.kind != "text":
        rows = MapRows(source, tok, fixed, ref).take(np.arange(len(source)))
        return ArrayRows(rows, pad_id_of(tok))
    it = grain.MapDataset.source(source).map(_Encode(tok, fixed, None)).to_iter_dataset()
    it = grain.experimental.ConcatThenSplitIterDataset(
        it, length_struct={k: layout.max_len for k in SEQ_KEYS}
    ).map(_packed_rows)
    return ArrayRows(_stack_packed(list(it)), pad_id_of(tok))
