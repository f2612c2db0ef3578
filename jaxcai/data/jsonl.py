"""JSONL records -> token arrays for the trainer.

Record kinds (one JSON object per line):

    text        {"text": str}                                   lm: packed raw text
    sft         {"prompt": str, "response": str}                sft: loss on the response
    preference  {"prompt", "chosen", "rejected", "p_chosen"?}   rm / dpo

A prompt is the Human turn's text, or a whole conversation already in the
`\\n\\nHuman: ...\\n\\nAssistant: ...` format (ending on a Human turn). Every sequence is
`bos + conversation + eos`; the loss mask covers the final Assistant turn and the eos.

Arrays are `[N, max_len]`: `tokens` (model input), `targets` (next token), `mask`
(targets counted by the loss), `segment_ids` (0 = padding). Bad records raise
`DataError` naming file and line, or, with `skip_bad`, are counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from jaxcai.tokenizer import ConversationError, Tokenizer, format_conversation

__all__ = ["DataError", "Dataset", "load_dataset", "resolve_path"]

FIELDS = {
    "text": {"text": str},
    "sft": {"prompt": str, "response": str},
    "preference": {"prompt": str, "chosen": str, "rejected": str},
}
KIND_OF_OBJECTIVE = {"lm": "text", "sft": "sft", "rm": "preference", "dpo": "preference"}


class DataError(ValueError):
    """A record or file that cannot be used; the message names file and line."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason  # the counter key when records are skipped


@dataclasses.dataclass
class Dataset:
    """Token arrays with a leading example axis, and the records skipped on the way."""

    arrays: dict[str, Any]  # nested dict of np.ndarray, all [N, ...]
    skipped: collections.Counter
    source: str

    def __len__(self) -> int:
        return len(next(iter(_leaves(self.arrays))))

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        return _map(lambda a: a[indices], self.arrays)

    def split(self, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """(rest, held-out) with `fraction` of the examples held out (at least one)."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n)
        n_eval = max(1, int(round(n * fraction)))
        if n_eval >= n:
            raise DataError(f"{self.source}: {n} examples are too few to hold out {fraction:.0%}")
        return (
            Dataset(self.take(np.sort(order[n_eval:])), self.skipped, self.source),
            Dataset(self.take(np.sort(order[:n_eval])), collections.Counter(), self.source),
        )


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _map(fn, tree: Any) -> Any:
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def resolve_path(spec: str) -> Path:
    """A path, or `bundled:NAME` for a file shipped in `jaxcai/data/files/`."""
    if spec.startswith("bundled:"):
        return Path(str(resources.files("jaxcai") / "data" / "files" / spec.split(":", 1)[1]))
    return Path(spec).expanduser()


def _check_record(line: str, kind: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, typ in FIELDS[kind].items():
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} ({kind} record)")
        if not isinstance(record[key], typ) or not record[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string")
    p = record.get("p_chosen")
    if (
        kind == "preference"
        and p is not None
        and (isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1)
    ):
        raise DataError(f"{where}: p_chosen must be a number in [0, 1], got {p!r}")
    return record


def _read_records(path: Path, kind: str, skip_bad: bool, skipped: collections.Counter):
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, _check_record(line, kind, where)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped[e.reason] += 1


def conversation_text(prompt: str, response: str) -> str:
    """The conversation a prompt/response pair becomes (response as the last turn)."""
    if prompt.startswith("\n\n"):
        prefix = prompt.rstrip()
        if not prefix.endswith("\n\nAssistant:"):
            prefix += "\n\nAssistant:"
        return f"{prefix} {response.strip()}"
    return format_conversation([("Human", prompt), ("Assistant", response)])


def _encode_response(
    tok: Tokenizer, prompt: str, response: str, where: str
) -> tuple[list[int], list[int]]:
    """(ids with bos/eos, loss mask over ids): the mask covers the last turn and eos."""
    try:
        enc = tok.encode_conversation(
            conversation_text(prompt, response), add_bos=True, add_eos=True
        )
    except ConversationError as e:
        raise DataError(f"{where}: {e}") from None
    last = enc.spans[-1]
    if last.role != "Assistant":
        raise DataError(f"{where}: the conversation must end with the Assistant's response")
    mask = [0] * len(enc.ids)
    mask[last.start :] = [1] * (len(enc.ids) - last.start)
    return enc.ids, mask


def _row(ids: list[int], mask: list[int], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(ids) - 1
    out = {
        "tokens": np.full(max_len, pad_id, np.int32),
        "targets": np.full(max_len, pad_id, np.int32),
        "mask": np.zeros(max_len, np.int32),
        "segment_ids": np.zeros(max_len, np.int32),
    }
    out["tokens"][:n] = ids[:-1]
    out["targets"][:n] = ids[1:]
    out["mask"][:n] = mask[1:]
    out["segment_ids"][:n] = 1
    return out


def _stack(rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    if not rows:
        raise DataError(f"{source}: no usable records")
    keys = rows[0].keys()
    return {
        k: _stack([r[k] for r in rows], source)
        if isinstance(rows[0][k], dict)
        else np.stack([r[k] for r in rows])
        for k in keys
    }


def _pack_text(docs: list[list[int]], max_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Concatenate documents and cut rows of `max_len + 1` ids; loss never crosses documents."""
    ids = np.concatenate([np.asarray(d, np.int32) for d in docs])
    doc = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)])
    rows = []
    for start in range(0, len(ids) - 1, max_len):
        chunk, chunk_doc = ids[start : start + max_len + 1], doc[start : start + max_len + 1]
        n = len(chunk) - 1
        row = _row(chunk.tolist(), [1] * len(chunk), max_len, pad_id)
        row["mask"][:n] = chunk_doc[1:] == chunk_doc[:-1]
        _, row["segment_ids"][:n] = np.unique(chunk_doc[:-1], return_inverse=True)
        row["segment_ids"][:n] += 1
        rows.append(row)
    return rows


def load_dataset(
    spec: str, objective: str, tok: Tokenizer, max_len: int, *, skip_bad: bool = False
) -> Dataset:
    """Read and tokenize a JSONL file for an objective (`lm`, `sft`, `rm`, `dpo`)."""
    path = resolve_path(spec)
    kind = KIND_OF_OBJECTIVE[objective]
    skipped: collections.Counter = collections.Counter()
    rows, docs = [], []
    for where, record in _read_records(path, kind, skip_bad, skipped):
        try:
            if kind == "text":
                docs.append(tok.encode(record["text"], add_bos=True, add_eos=True))
                continue
            if kind == "sft":
                pairs = {"": (record["prompt"], record["response"])}
            else:
                pairs = {k: (record["prompt"], record[k]) for k in ("chosen", "rejected")}
            row = {}
            for name, (prompt, response) in pairs.items():
                ids, mask = _encode_response(tok, prompt, response, where)
                if len(ids) - 1 > max_len:
                    raise DataError(
                        f"{where}: {len(ids)} tokens do not fit data.max_len={max_len}"
                        " (+1 for the shifted target)",
                        reason="too_long",
                    )
                seq = _row(ids, mask, max_len, tok.pad_id)
                if name:
                    row[name] = seq
                else:
                    row = seq
            if kind == "preference":
                p = record.get("p_chosen")
                row["p_chosen"] = np.float32(1.0 if p is None else p)
            rows.append(row)
        except DataError as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
    if kind == "text":
        if not docs:
            raise DataError(f"{path}: no usable records")
        rows = _pack_text(docs, max_len, tok.pad_id)
    return Dataset(_stack(rows, str(path)), skipped, str(path))
