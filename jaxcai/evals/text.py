"""Task metrics for evaluation by generation: exact match, token F1, ROUGE-L and BLEU.

Every metric takes `predictions` (one string per example) and `references` (per example
a string, or a list of acceptable strings) of the same length, and averages over the
examples. With several references an example scores its best match (EM, F1, ROUGE-L);
BLEU is a corpus statistic and uses all references at once.

Normalisation for exact match and token F1 (the SQuAD recipe), in this order:

    1. lowercase;
    2. delete every ASCII punctuation character (`string.punctuation`);
    3. delete the whole words "a", "an" and "the";
    4. split on whitespace (so runs of spaces, tabs and newlines count as one).

ROUGE-L uses `rouge_score`'s own tokenizer (lowercase, runs of `[a-z0-9]` only, no
stemming), so text in other scripts scores 0 there; BLEU uses sacrebleu's default
`13a` tokenizer on the raw text. EM, F1 and ROUGE-L are in [0, 1], BLEU in [0, 100].
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import sacrebleu

__all__ = ["bleu", "exact_match", "normalize_text", "rouge_l", "text_metrics", "token_f1"]

References = Sequence[str | Sequence[str]]
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> list[str]:
    """The tokens EM and F1 compare: lowercased, punctuation and articles removed."""
    text = text.lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Each example's references as a non-empty list; lengths checked."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; "
            "need one reference (or list of references) per prediction"
        )
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"reference {i}: need a string or a non-empty list of strings")
        out.append(refs)
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _f1(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return float(prediction == reference)  # both empty: a match
    common = sum((collections.Counter(prediction) & collections.Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Share of predictions whose normalised tokens equal those of some reference."""
    refs = _reference_lists(predictions, references)
    return _mean(
        [
            float(any(normalize_text(p) == normalize_text(r) for r in rs))
            for p, rs in zip(predictions, refs, strict=True)
        ]
    )


def token_f1(predictions: Sequence[str], references: References) -> float:
    """Mean bag-of-tokens F1 (after normalisation), best reference per example."""
    refs = _reference_lists(predictions, references)
    return _mean(
        [
            max(_f1(normalize_text(p), normalize_text(r)) for r in rs)
            for p, rs in zip(predictions, refs, strict=True)
        ]
    )


def rouge_l(predictions: Sequence[str], references: References) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence), best reference per example."""
    from rouge_score import rouge_scorer  # imports nltk (seconds): only when needed

    refs = _reference_lists(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return _mean(
        [
            max(scorer.score(r, p)["rougeL"].fmeasure for r in rs)
            for p, rs in zip(predictions, refs, strict=True)
        ]
    )


def bleu(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU (sacrebleu defaults), every example's references used together."""
    refs = _reference_lists(predictions, references)
    if not refs:
        return 0.0
    width = max(len(rs) for rs in refs)
    # sacrebleu wants one stream per reference slot; None fills the slots of examples
    # with fewer references.
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def text_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    """All four metrics: `exact_match`, `token_f1`, `rougeL` (each in [0, 1]) and `bleu`
    (0-100)."""
    return {
        "exact_match": exact_match(predictions, references),
        "token_f1": token_f1(predictions, references),
        "rougeL": rouge_l(predictions, references),
        "bleu": bleu(predictions, references),
    }
