"""Where sequences end, read on the host: stop ids, stop strings cut out of the text,
and each finished sequence's kept tokens, log-probs, reason and text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxcai.sample.device import LENGTH, RUNNING, STOP_ID, STOP_REASONS, STOP_STRING

__all__ = ["Stops", "cut_at_stop_string", "first_stop", "keep_row"]


@dataclasses.dataclass(frozen=True)
class Stops:
    """Where sequences end: stop ids on device, stop strings read on the host."""

    ids: Sequence[int]
    strings: Sequence[str]
    tokenizer: Any
    check_every: int


def cut_at_stop_string(tok, ids: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """(tokens to keep, text) when the decoded ids contain a stop string, else None: the
    text is cut before the earliest stop string, the tokens to those whose text it holds."""
    text = tok.decode(ids)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return None
    kept = text[: min(hits)]
    keep = 0
    while keep < len(ids) and kept.startswith(tok.decode(ids[: keep + 1])):
        keep += 1
    return keep, kept


def first_stop(ids: list[int], stop_ids: Sequence[int]) -> int:
    """Index of the first stop id in `ids` (its length if none)."""
    stops = set(stop_ids)
    return next((k for k, t in enumerate(ids) if t in stops), len(ids))


def keep_row(
    ids: list[int],
    logps: list[float],
    why: int,
    cut: tuple[int, str] | None,
    stops: Stops,
    out: dict,
    n: int,
) -> None:
    """Sequence `n`'s kept tokens, log-probs, stop reason and text into `out`, from the
    ids it generated, why it stopped and its stop-string cut (when `why` is STOP_STRING)."""
    if why == STOP_STRING:
        keep = cut[0]
    elif why == STOP_ID:
        keep = first_stop(ids, stops.ids)
    else:
        why = LENGTH if why == RUNNING else why
        keep = len(ids)
    out["tokens"][n], out["logps"][n] = ids[:keep], logps[:keep]
    out["reasons"][n] = STOP_REASONS[why]
    if out["texts"] is not None:
        out["texts"][n] = cut[1] if why == STOP_STRING else stops.tokenizer.decode(ids[:keep])
