"""Multiple-choice evaluation: score every option as a continuation of its prompt.

A choice file is JSONL, one item a line:

    {"prompt": "...Which response is less harmful?\\nThe answer is:",
     "correct": " (A)", "incorrect": [" (B)"], "id": "q1", "metadata": {...}}

`correct` is one option or a list of them (all acceptable), `incorrect` a non-empty
list; `id` (any JSON value, kept as text) and `metadata` (an object) are optional.

How the text is joined: an option is appended to its prompt exactly as written, so the
scored text is `prompt + option`. Options should therefore start with a space when the
prompt does not end with one (`"The answer is:"` + `" (A)"`). The joined text is encoded
in one go (with a leading bos) and the option's tokens are those after the prompt's own
encoding; where the tokenizer merges text across the join, the tokens from the first
difference on count as the option's. (Encoding the option alone would be wrong with a
sentencepiece tokenizer, which prefixes a word boundary to every text it encodes.)
A prompt too long for the model keeps its bos and its end.

In a checkpoint's chat template (a `jaxcai.chat.TemplateFormat` passed for `tok`) the
prompt is the user's turn and each option the start of the assistant's answer: the
scored text is `fmt.answer_text(prompt, "") + option` (the option without its leading
blank, as an answer begins). A `Tokenizer`, or the Human/Assistant format, scores the
raw `prompt + option` as above.

Per item, the options' log-probs (summed over their tokens, or their per-token mean with
`normalize="mean"`) are softmaxed into probabilities. The prediction is the most
probable option; an item counts as correct only when some correct option beats every
incorrect one (a tie counts as wrong, and the reported prediction is then an incorrect
option). See `jaxcai.evals.calibration` for the aggregate metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcai.chat import ChatFormat, HumanAssistantFormat, as_format
from jaxcai.data.records import DataError, expand_inputs, read_lines
from jaxcai.evals.calibration import Calibration, CalibrationBin, calibration
from jaxcai.model_config import ModelConfig
from jaxcai.sample import score
from jaxcai.tokenizer import Tokenizer

__all__ = [
    "NORMALIZE",
    "CalibrationBin",
    "Calibration",
    "ChoiceDataError",
    "ChoiceItem",
    "ChoiceReport",
    "ItemResult",
    "calibration",
    "choice_files",
    "encode_options",
    "evaluate_choices",
    "option_ids",
    "read_choice_file",
]

NORMALIZE = ("sum", "mean")


class ChoiceDataError(DataError):
    """A choice item that cannot be used; the message names `file:line`, `reason` is the
    key it is counted under when skipping."""


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One question: the prompt, its acceptable and its wrong continuations."""

    prompt: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    id: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """Correct options first, then incorrect ones (indices used in results)."""
        return self.correct + self.incorrect


# ----- reading ------------------------------------------------------------------------


def _options(raw: dict, key: str, where: str, *, single_ok: bool) -> tuple[str, ...]:
    if key not in raw:
        raise ChoiceDataError(f"{where}: missing field {key!r}", "missing_field")
    value = raw[key]
    if isinstance(value, str) and single_ok:
        value = [value]
    if not isinstance(value, list):
        raise ChoiceDataError(f"{where}: field {key!r} must be a list of strings", "not_text")
    if not value:
        reason = "no_incorrect" if key == "incorrect" else "empty_field"
        raise ChoiceDataError(f"{where}: field {key!r} has no options", reason)
    for v in value:
        if not isinstance(v, str):
            raise ChoiceDataError(
                f"{where}: field {key!r} holds a {type(v).__name__}, not a string", "not_text"
            )
        if not v.strip():
            raise ChoiceDataError(f"{where}: field {key!r} has an empty option", "empty_field")
    return tuple(value)


def _parse(line: str, where: str) -> ChoiceItem:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise ChoiceDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ChoiceDataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    prompt = raw.get("prompt")
    if "prompt" not in raw:
        raise ChoiceDataError(f"{where}: missing field 'prompt'", "missing_field")
    if not isinstance(prompt, str):
        raise ChoiceDataError(f"{where}: field 'prompt' must be a string", "not_text")
    if not prompt.strip():
        raise ChoiceDataError(f"{where}: field 'prompt' is empty", "empty_field")
    correct = _options(raw, "correct", where, single_ok=True)
    incorrect = _options(raw, "incorrect", where, single_ok=False)
    options = correct + incorrect
    if len(set(options)) != len(options):
        raise ChoiceDataError(f"{where}: an option appears twice", "duplicate_option")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ChoiceDataError(f"{where}: field 'metadata' must be a JSON object", "bad_value")
    item_id = raw.get("id")
    return ChoiceItem(
        prompt=prompt,
        correct=correct,
        incorrect=incorrect,
        id=where if item_id is None else str(item_id),
        metadata=metadata,
        source=where,
    )


def read_choice_file(
    path: str | Path, skipped: collections.Counter | None = None
) -> list[ChoiceItem]:
    """The items of a choice JSONL file (blank lines ignored). A bad line raises
    `ChoiceDataError` naming `file:line`; with a `skipped` counter it is counted by reason
    and left out instead. An item without `id` is named by its `file:line`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChoiceDataError(f"choice file not found: {path}", "missing_file")
    return list(read_lines(path, _parse, skipped))


def choice_files(spec: str | Sequence[str]) -> list[Path]:
    """Files named by a path, glob, `bundled:NAME` (a file in `jaxcai/data/files/`) or a
    list of them."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths = []
    for s in specs:
        if s.startswith("bundled:"):
            name = s.split(":", 1)[1]
            path = Path(str(resources.files("jaxcai") / "data" / "files" / name))
            if not name or "/" in name or not path.is_file():
                raise ChoiceDataError(f"{s}: no such bundled file", "missing_file")
            s = str(path)
        paths += [p for p in expand_inputs(s) if p not in paths]
    return paths


# ----- metrics (pure) -----------------------------------------------------------------


# ----- the harness --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One item's outcome; `probs` follow `ChoiceItem.options` (correct ones first)."""

    id: str
    probs: tuple[float, ...]
    predicted: int
    correct: bool
    n_correct: int  # options 0..n_correct-1 are the correct ones


@dataclasses.dataclass(frozen=True)
class ChoiceReport:
    """Aggregate metrics and per-item results of a multiple-choice evaluation."""

    metrics: Calibration
    items: tuple[ItemResult, ...]
    normalize: str = "sum"
    truncated: int = 0  # items whose prompt lost its start to fit the model

    @property
    def n(self) -> int:
        return self.metrics.n

    @property
    def accuracy(self) -> float:
        return self.metrics.accuracy

    @property
    def p_correct(self) -> float:
        return self.metrics.p_correct

    @property
    def brier(self) -> float:
        return self.metrics.brier

    @property
    def ece(self) -> float:
        return self.metrics.ece

    def summary(self) -> dict[str, float | int | str]:
        """The headline numbers."""
        m = self.metrics
        return {
            "n": m.n,
            "accuracy": m.accuracy,
            "p_correct": m.p_correct,
            "brier": m.brier,
            "ece": m.ece,
            "normalize": self.normalize,
            "truncated": self.truncated,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (NaNs of empty bins become null)."""
        nan_none = lambda x: None if isinstance(x, float) and math.isnan(x) else x
        return {
            **{k: nan_none(v) for k, v in self.summary().items()},
            "bins": [
                {k: nan_none(v) for k, v in dataclasses.asdict(b).items()}
                for b in self.metrics.bins
            ],
            "items": [dataclasses.asdict(r) | {"probs": list(r.probs)} for r in self.items],
        }

    def markdown(self) -> str:
        """The metrics, then the calibration table (non-empty bins)."""
        m = self.metrics
        lines = [
            "| metric | value |",
            "|---|---|",
            f"| items | {m.n} |",
            f"| accuracy | {m.accuracy:.4f} |",
            f"| mean p(correct) | {m.p_correct:.4f} |",
            f"| Brier score | {m.brier:.4f} |",
            f"| ECE ({len(m.bins)} bins) | {m.ece:.4f} |",
            "",
            "| confidence | items | mean confidence | accuracy |",
            "|---|---|---|---|",
        ]
        for b in m.bins:
            if b.count:
                close = "]" if b is m.bins[-1] else ")"
                lines.append(
                    f"| [{b.lo:.2g}, {b.hi:.2g}{close} | {b.count} | {b.confidence:.4f} "
                    f"| {b.accuracy:.4f} |"
                )
        return "\n".join(lines)


def option_ids(fmt: ChatFormat, context: str, option: str) -> tuple[list[int], list[int]]:
    """(context ids, option ids) of `context + option` encoded as one text the way the
    format encodes its renderings (`fmt.encode_text`: a BOS first for the Human/Assistant
    transcript, none added to a template's text): the option's ids are the ones the model
    sees after the context; tokens merged across the join count as the option's."""
    add_bos = isinstance(fmt, HumanAssistantFormat)
    return fmt.tokenizer.split_continuation(context, option, add_bos=add_bos)


def _scored_texts(fmt: ChatFormat, item: ChoiceItem) -> tuple[str, list[str]]:
    """(context, options) as scored: the raw prompt and options for the Human/Assistant
    format; in a template the prompt as the user's turn and each option (without its
    leading blank, unless that would make two options equal) beginning the answer."""
    if isinstance(fmt, HumanAssistantFormat):
        return item.prompt, list(item.options)
    stripped = [o.lstrip() for o in item.options]
    if len(set(stripped)) < len(stripped):
        stripped = list(item.options)
    return fmt.answer_text(item.prompt, ""), stripped


def encode_options(
    tok: Tokenizer | ChatFormat, item: ChoiceItem, max_len: int
) -> tuple[list[list[int]], list[list[int]], bool]:
    """(prompt ids, option ids) per option and whether prompts were cut to fit `max_len`
    (they keep their bos and their end; every option gets the same prompt length)."""
    fmt = as_format(tok)
    context, options = _scored_texts(fmt, item)
    pairs = [option_ids(fmt, context, o) for o in options]
    longest = max(len(p) + len(c) for p, c in pairs)
    excess = longest - 1 - max_len  # score runs len(prompt) + len(option) - 1 positions
    if excess <= 0:
        return [p for p, _ in pairs], [c for _, c in pairs], False
    # The Human/Assistant text keeps its first id (the bos); a template's text keeps its
    # first id only when that is the bos the template wrote.
    bos = fmt.tokenizer.bos_id
    prompts = []
    for p, _ in pairs:
        lead = 1 if isinstance(fmt, HumanAssistantFormat) or (p[:1] == [bos]) else 0
        if len(p) - excess < 1 + lead:
            raise ValueError(f"{item.source}: an option is too long for max_seq_len={max_len}")
        prompts.append([*p[:lead], *p[lead + excess :]])
    return prompts, [c for _, c in pairs], True


def evaluate_choices(
    config: ModelConfig,
    params: Any,
    tok: Tokenizer | ChatFormat,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    normalize: str = "sum",
    progress: bool = False,
) -> ChoiceReport:
    """Score every option of every item in batches with `jaxcai.sample.score` and report
    accuracy, calibration and per-item results. `tok` is a `Tokenizer` (the raw prompt +
    option) or a `ChatFormat` (see the module docstring)."""
    fmt = as_format(tok)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: choose one of {NORMALIZE}")
    if not items:
        raise ValueError("no choice items to evaluate")
    flat_p, flat_c, truncated = [], [], 0
    for item in items:
        prompts, options, cut = encode_options(fmt, item, config.max_seq_len)
        flat_p += prompts
        flat_c += options
        truncated += cut
    logps = score(
        config,
        params,
        flat_p,
        flat_c,
        pad_id=fmt.tokenizer.pad_id,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    ).astype(np.float64)
    if normalize == "mean":
        logps = logps / np.asarray([len(c) for c in flat_c], np.float64)
    probs, start = [], 0
    for item in items:
        lp = logps[start : start + len(item.options)]
        start += len(item.options)
        e = np.exp(lp - lp.max())
        probs.append(e / e.sum())
    metrics = calibration(probs, [range(len(item.correct)) for item in items])
    results = tuple(
        ItemResult(item.id, tuple(float(x) for x in p), pred, ok, len(item.correct))
        for item, p, pred, ok in zip(items, probs, metrics.predicted, metrics.correct, strict=True)
    )
    return ChoiceReport(metrics, results, normalize, truncated)
