"""The grain input pipeline: prepared records -> fixed-shape token rows for the train step.

Per example (pure functions, run in grain's map stage):

* `text` documents become `bos + text + eos`; rows are cut from their concatenation
  (grain's concat-then-split), so no token is wasted and the loss never crosses a
  document boundary (segment ids keep them apart).
* `sft` conversations (a stored prompt answered by the response) become the chat
  format's tokens (`jaxcai.chat`): with the Human/Assistant transcript
  `bos + prompt + "\\n\\nAssistant: " + response + eos`, with a checkpoint's template
  its rendering, ending at the response's end-of-turn token. The loss mask covers the
  response tokens and that end-of-turn (or eos) token only; earlier assistant turns of
  the prompt are context.
* `preference` pairs become a chosen and a rejected sequence of the same layout; with
  `pack_pairs` a batch's pairs are then packed, several per row with each prompt once
  (`jaxcai.data.pairs`).

**Truncation policy** (`data.truncate=true`): a sequence longer than `max_len + 1`
tokens (one more than a row, for the shifted target) keeps the *end* of its prompt and
the *start* of its response. The prompt keeps `bos` (when it starts with one) and its
last tokens: as many as the
whole response leaves room for, but never fewer than `max_prompt_len` tokens in all
(default `max_len // 2`, `bos` included); the response fills the rest (losing its `eos`
when cut). With
`truncate=false` an over-long example is an error naming its `file:line`.

Rows (`[rows, length]` int32): `tokens` (model input), `targets` (next token), `mask`
(targets counted by the loss), `segment_ids` (1, 2, ... per packed example, 0 =
padding), `positions` (per segment), plus `weight` (1 for a real row). Pairs hold
`chosen` and `rejected` rows of one shared length, and `p_chosen`.

Lengths: `pad="fixed"` pads every row to `max_len`; `pad="bucket"` pads a batch to the
smallest of a few bucket lengths that fits its longest row, so jit compiles one program
per bucket, not per batch. SFT rows are packed first-fit with several examples per row
(`pack=true`); text rows are always full.

Training order: the example stream is a seeded permutation per epoch
(`MapDataset.shuffle` then `repeat`), sliced `shard_index::shard_count` so each host
reads only its own examples, disjoint from the others'. The iterator's state
(`get_state`/`set_state`, saved in the orbax checkpoint) resumes on the exact next batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxcai.chat import ChatError, ChatFormat, as_format, messages_from_transcript
from jaxcai.data.pairs import SEQ_KEYS, PackPairs
from jaxcai.data.records import DataError
from jaxcai.tokenizer import Tokenizer

__all__ = [
    "IndexedSource",
    "Layout",
    "encode_example",
    "pad_rows",
    "pad_sequences",
    "response_sequence",
    "train_iterator",
]

EMPTY = -1  # index of a padding row in an index batch: zero weight, zero loss mask


@dataclasses.dataclass(frozen=True)
class Layout:
    """How examples become rows: length, truncation, packing and padding."""

    kind: str  # text | sft | preference
    max_len: int
    max_prompt_len: int | None = None  # tokens kept from a truncated prompt (None: max_len//2)
    truncate: bool = True
    pack: bool = True  # sft: several examples per row
    pad: str = "fixed"  # fixed | bucket
    buckets: tuple[int, ...] = ()  # bucket lengths; () = powers of two from 64, and max_len
    pack_pairs: bool = False  # preference: pairs packed with a shared prompt (data.pairs)

    def __post_init__(self):
        if self.kind not in ("text", "sft", "preference"):
            raise ValueError(f"Layout.kind={self.kind!r}: choose text, sft or preference")
        if self.max_len < 2:
            raise ValueError(f"Layout.max_len={self.max_len}: must be at least 2")
        if self.max_prompt_len is not None and not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(
                f"Layout.max_prompt_len={self.max_prompt_len}: must be in (0, {self.max_len})"
            )
        if self.pad not in ("fixed", "bucket"):
            raise ValueError(f"Layout.pad={self.pad!r}: choose fixed or bucket")

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_len or max(1, self.max_len // 2)

    def bucket_lengths(self) -> tuple[int, ...]:
        if self.pad == "fixed":
            return (self.max_len,)
        chosen = self.buckets or tuple(2**k for k in range(6, 20) if 2**k < self.max_len)
        return tuple(sorted({b for b in chosen if b < self.max_len} | {self.max_len}))

    def pair_row_lengths(self) -> tuple[int, ...]:
        """Row lengths of packed pairs: the buckets (unless `buckets` are given, powers of
        two from 64 and 1.5 times each, a step of at most 1.5x) up to `2 * max_len` (the
        longest a packed pair can be), and twice that, so long pairs can share a row."""
        top = 2 * self.max_len
        steps = [b for k in range(6, 21) for b in (2**k, 3 * 2 ** (k - 1))]
        chosen = self.buckets or tuple(b for b in steps if b < top)
        return tuple(sorted({b for b in chosen if b < top} | {top, 2 * top}))

    @property
    def packs_pairs(self) -> bool:
        return self.kind == "preference" and self.pack_pairs

    @property
    def fixed_width(self) -> bool:
        """Whether every batch has rows of `max_len` (packed rows always fill it)."""
        if self.packs_pairs:
            return False
        packed = self.kind == "text" or (self.kind == "sft" and self.pack)
        return packed or len(self.bucket_lengths()) == 1

    def row_length(self, longest: int) -> int:
        """The padded length of a batch whose longest row has `longest` tokens."""
        return next(b for b in self.bucket_lengths() if b >= longest)


# ----- one example --------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def response_sequence(prompt_ids: list[int], response_ids: list[int]) -> dict[str, np.ndarray]:
    """One unpadded sequence: `tokens` / `targets` shifted by one, `mask` on the targets
    that are response ids."""
    ids = np.asarray(prompt_ids + response_ids, np.int32)
    mask = np.zeros(len(ids) - 1, np.int32)
    mask[len(prompt_ids) - 1 :] = 1
    return {"tokens": ids[:-1], "targets": ids[1:], "mask": mask}


def pad_id_of(tok: Tokenizer | ChatFormat) -> int:
    """The padding id of a tokenizer or of a chat format's tokenizer."""
    return as_format(tok).tokenizer.pad_id


def encode_response(
    tok: Tokenizer | ChatFormat, prompt: str, response: str, layout: Layout, source: str
) -> dict[str, np.ndarray]:
    """Token arrays of one prompt/response conversation in the chat format (a bare
    tokenizer means the Human/Assistant transcript), truncated as documented."""
    fmt = as_format(tok)
    try:
        messages = messages_from_transcript(prompt)
        enc = fmt.encode([*messages, {"role": "assistant", "content": response.strip()}])
    except ChatError as e:
        raise DataError(f"{source}: {e}") from None
    if not enc.spans or enc.spans[-1][0] != len(messages):
        raise DataError(f"{source}: the chat format dropped the response")
    _, start, end = enc.spans[-1]
    prompt_ids, response_ids = enc.ids[:start], enc.ids[start:end]
    total = len(prompt_ids) + len(response_ids)
    budget = layout.max_len + 1
    if total > budget:
        if not layout.truncate:
            raise DataError(
                f"{source}: {total} tokens do not fit data.max_len={layout.max_len} "
                "(+1 for the shifted target); raise data.max_len or set data.truncate=true",
                reason="too_long",
            )
        lead = int(fmt.tokenizer.bos_id is not None and prompt_ids[:1] == [fmt.tokenizer.bos_id])
        keep = min(len(prompt_ids), max(budget - len(response_ids), layout.prompt_budget))
        prompt_ids = [*prompt_ids[:lead], *prompt_ids[len(prompt_ids) - keep + lead :]]
        response_ids = response_ids[: budget - len(prompt_ids)]
    return response_sequence(prompt_ids, response_ids)


def encode_example(
    raw: dict[str, Any],
    tok: Tokenizer | ChatFormat,
    layout: Layout,
    ref: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """A prepared record (as read from the data source) -> variable-length arrays."""
    source = _text(raw.get("source", "?"))
    if layout.kind == "text":
        ids = as_format(tok).tokenizer.encode(_text(raw["text"]), add_bos=True, add_eos=True)
        ids = np.asarray(ids, np.int32)
        return {"tokens": ids[:-1], "targets": ids[1:], "mask": np.ones(len(ids) - 1, np.int32)}
    prompt = _text(raw["prompt"])
    if layout.kind == "sft":
        return encode_response(tok, prompt, _text(raw["response"]), layout, source)
    out: dict[str, Any] = {
        side: encode_response(tok, prompt, _text(raw[side]), layout, source)
        for side in ("chosen", "rejected")
    }
    out["p_chosen"] = np.float32(raw.get("p_chosen", 1.0))
    if ref is not None:
        index = int(raw["index"])
        out["ref_chosen_logps"] = np.float32(ref["ref_chosen_logps"][index])
        out["ref_rejected_logps"] = np.float32(ref["ref_rejected_logps"][index])
    return out


def sequence_length(example: dict[str, Any]) -> int:
    """Tokens of an encoded example's longest row (of either side, for a pair)."""
    if "tokens" in example:
        return len(example["tokens"])
    return max(len(example["chosen"]["tokens"]), len(example["rejected"]["tokens"]))


# ----- rows ---------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[dict[str, np.ndarray]], length: int, pad_id: int):
    """Unpacked sequences -> padded rows with one segment each."""
    n = len(seqs)
    out = {
        "tokens": np.full((n, length), pad_id, np.int32),
        "targets": np.full((n, length), pad_id, np.int32),
        "mask": np.zeros((n, length), np.int32),
        "segment_ids": np.zeros((n, length), np.int32),
        "positions": np.zeros((n, length), np.int32),
    }
    for i, seq in enumerate(seqs):
        k = len(seq["tokens"])
        for key in SEQ_KEYS:
            out[key][i, :k] = seq[key]
        out["segment_ids"][i, :k] = 1
        out["positions"][i, :k] = np.arange(k)
    return out


def pad_rows(
    examples: Sequence[dict[str, Any]], layout: Layout, pad_id: int, length: int | None = None
) -> dict[str, Any]:
    """Stack encoded (unpacked) examples into rows of `length` (default: the batch's
    bucket); pairs pad chosen and rejected to the same length."""
    if length is None:
        length = layout.row_length(max(sequence_length(e) for e in examples))
    if "tokens" in examples[0]:  # single sequences (a pair's sides are nested)
        rows = pad_sequences(examples, length, pad_id)
    else:
        rows = {
            side: pad_sequences([e[side] for e in examples], length, pad_id)
            for side in ("chosen", "rejected")
        }
        for key in ("p_chosen", "ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                rows[key] = np.asarray([e[key] for e in examples], np.float32)
    rows["weight"] = np.ones(len(examples), np.float32)
    return rows


def repad(rows: dict[str, Any], length: int, pad_id: int) -> dict[str, Any]:
    """Rows padded on the right to a longer `length` (hosts agreeing on a bucket)."""

    def pad(key: str, a: np.ndarray) -> np.ndarray:
        if a.ndim < 2 or a.shape[1] == length:
            return a
        value = pad_id if key in ("tokens", "targets") else 0
        return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=value)

    return {
        k: repad(v, length, pad_id) if isinstance(v, dict) else pad(k, v) for k, v in rows.items()
    }


def _packed_rows(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features (`tokens_segment_ids`, ...) -> our row keys."""
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "mask": packed["mask"],
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
    }


class _Collate:
    """grain batch_fn: encoded examples -> padded rows (picklable for worker processes)."""

    def __init__(self, layout: Layout, pad_id: int):
        self.layout, self.pad_id = layout, pad_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_rows(examples, self.layout, self.pad_id)


def _sequence_keys(example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: example[k] for k in SEQ_KEYS}


def _stack_packed(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    out["weight"] = np.ones(len(rows), np.float32)
    return out


# ----- sources ------------------------------------------------------------------------


class IndexedSource:
    """A random-access view of a data source (optionally a subset of its indices) whose
    records carry `index`, their position in the view."""

    def __init__(self, source, indices: np.ndarray | None = None, origin: str = ""):
        self.source = source
        self.indices = None if indices is None else np.asarray(indices, np.int64)
        self.origin = origin  # where the records come from (dataset path and split)

    @property
    def fingerprint(self) -> str:
        """Identifies the records of this view (origin, size and subset indices)."""
        h = hashlib.sha256(f"{self.origin}|{len(self.source)}".encode())
        if self.indices is not None:
            h.update(self.indices.tobytes())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(i) if self.indices is None else int(self.indices[i])
        return {**self.source[j], "index": int(i)}

    def __repr__(self) -> str:
        return f"IndexedSource({self.origin or self.source!r}, {len(self)} records)"


class _Encode:
    """grain map: raw record -> encoded example."""

    def __init__(self, tok: Tokenizer | ChatFormat, layout: Layout, ref):
        self.tok, self.layout, self.ref = tok, layout, ref

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        return encode_example(raw, self.tok, self.layout, self.ref)


def train_iterator(
    source: IndexedSource,
    tok: Tokenizer | ChatFormat,
    layout: Layout,
    *,
    rows_per_batch: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
    workers: int = 0,
    read_threads: int = 1,
    ref: dict[str, np.ndarray] | None = None,
    groups: int = 1,
    row_multiple: int = 1,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this shard's batches of `rows_per_batch`.

    Every host builds the same seeded stream and keeps every `shard_count`-th example,
    starting at `shard_index`, so the shards are disjoint and together cover each epoch.
    Packed pairs (`layout.pack_pairs`) come as `groups` micro-batches of
    `rows_per_batch / groups` pairs each, in a multiple of `row_multiple` rows per
    micro-batch; their pair indices start at this shard's first pair of a micro-batch.
    """
    if len(source) < shard_count:
        raise DataError(f"{len(source)} examples cannot feed {shard_count} data shards")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)[shard_index::shard_count]
    ds = ds.map(_Encode(tok, layout, ref))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * rows_per_batch)
    )
    lengths = {k: layout.max_len for k in SEQ_KEYS}
    if layout.kind == "text":
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths)
        it = it.map(_packed_rows).batch(rows_per_batch, batch_fn=_stack_packed)
    elif layout.kind == "sft" and layout.pack:
        it = grain.experimental.FirstFitPackIterDataset(
            it.map(_sequence_keys),
            length_struct=lengths,
            num_packing_bins=rows_per_batch,
            shuffle_bins=False,
        )
        it = it.map(_packed_rows).batch(rows_per_batch, batch_fn=_stack_packed)
    elif layout.packs_pairs:
        if rows_per_batch % groups:
            raise ValueError(f"{rows_per_batch} pairs per batch do not split into {groups} groups")
        offset = shard_index * (rows_per_batch // groups)
        pack = PackPairs(layout.pair_row_lengths(), pad_id_of(tok), groups, row_multiple, offset)
        it = it.batch(rows_per_batch, batch_fn=pack)
    else:
        it = it.batch(rows_per_batch, batch_fn=_Collate(layout, pad_id_of(tok)))
    if workers > 0:
        _parse_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return _JsonStateIterator(iter(it))


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags, which no jaxcai entry point parses."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _tuples_restored(state: Any) -> Any:
    """A state after a JSON round trip, with the tuples grain compares by value restored
    (concat-then-split marks "no remainder" with the slice tuple `(-1, -1)`)."""
    if isinstance(state, dict):
        return {
            k: {f: tuple(v) for f, v in s.items()}
            if k == "remainder_slices" and isinstance(s, dict)
            else _tuples_restored(s)
            for k, s in state.items()
        }
    if isinstance(state, list):
        return [_tuples_restored(v) for v in state]
    return state


class _JsonStateIterator(grain.DatasetIterator):
    """The pipeline's iterator; its state survives the JSON file it is checkpointed in."""

    def __init__(self, inner: grain.DatasetIterator):
        super().__init__(inner)
        self._inner = inner

    def __next__(self):
        return next(self._inner)

    def get_state(self) -> dict[str, Any]:
        return self._inner.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._inner.set_state(_tuples_restored(state))

    def close(self) -> None:
        """Stop grain's worker processes and free their shared memory."""
        self._inner.close()
