"""Calibration of predicted option distributions: accuracy, the probability on the
correct options, the Brier score, ECE and its per-bin table (`calibration`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Calibration", "CalibrationBin", "calibration"]


@dataclasses.dataclass(frozen=True)
class CalibrationBin:
    """Items whose confidence lies in `[lo, hi)` (the last bin includes 1)."""

    lo: float
    hi: float
    count: int
    confidence: float  # mean confidence (nan when empty)
    accuracy: float  # share correct (nan when empty)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Aggregate scores of a set of predicted distributions (see `calibration`)."""

    n: int
    accuracy: float
    p_correct: float
    brier: float
    ece: float
    bins: tuple[CalibrationBin, ...]
    predicted: tuple[int, ...]
    correct: tuple[bool, ...]


def _predict(p: np.ndarray, good: set[int]) -> tuple[int, bool]:
    """(predicted option, correct?): ties go to an incorrect option, so count as wrong."""
    top = np.flatnonzero(p == p.max())
    wrong = [int(k) for k in top if k not in good]
    pred = wrong[0] if wrong else int(top[0])
    return pred, pred in good


def calibration(
    probs: Sequence[Sequence[float]], correct_sets: Sequence[Sequence[int]], *, n_bins: int = 10
) -> Calibration:
    """Accuracy, calibration and the per-bin table of per-item option distributions.

    `probs[i]` is item i's distribution over its options (any number per item),
    `correct_sets[i]` the indices of its correct options. Per item: the prediction is
    the argmax (ties count as wrong); confidence = max prob; p_correct = total prob on
    the correct options; the Brier score is `sum_k (p_k - y_k)^2` with `y_k = 1/|C|` on
    the correct options C and 0 elsewhere (the one-hot when one option is correct). All
    are averaged over items. ECE uses `n_bins` equal-width confidence bins `[k/n,
    (k+1)/n)` (the last closed): `sum_b (count_b / n) * |accuracy_b - confidence_b|`.
    """
    if len(probs) != len(correct_sets):
        raise ValueError(f"{len(probs)} distributions but {len(correct_sets)} correct sets")
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1")
    predicted, correct, conf, p_good, brier = [], [], [], [], []
    for i, (p, c) in enumerate(zip(probs, correct_sets, strict=True)):
        p = np.asarray(p, np.float64)
        good = {int(k) for k in c}
        if p.ndim != 1 or len(p) < 2 or not np.all(np.isfinite(p)):
            raise ValueError(f"item {i}: need a finite distribution over at least 2 options")
        if not good or not good < set(range(len(p))):
            raise ValueError(f"item {i}: correct options {sorted(good)} must be a proper subset")
        pred, ok = _predict(p, good)
        y = np.zeros_like(p)
        y[list(good)] = 1.0 / len(good)
        predicted.append(pred)
        correct.append(ok)
        conf.append(float(p.max()))
        p_good.append(float(p[list(good)].sum()))
        brier.append(float(np.sum((p - y) ** 2)))
    n = len(predicted)
    conf_a, ok_a = np.asarray(conf), np.asarray(correct, np.float64)
    which = np.minimum((conf_a * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        count = int(sel.sum())
        mean_conf = float(conf_a[sel].mean()) if count else math.nan
        acc = float(ok_a[sel].mean()) if count else math.nan
        if count:
            ece += count / n * abs(acc - mean_conf)
        bins.append(CalibrationBin(b / n_bins, (b + 1) / n_bins, count, mean_conf, acc))
    mean = lambda xs: float(np.mean(xs)) if n else math.nan
    return Calibration(
        n=n,
        accuracy=mean(ok_a),
        p_correct=mean(p_good),
        brier=mean(brier),
        ece=float(ece) if n else math.nan,
        bins=tuple(bins),
        predicted=tuple(predicted),
        correct=tuple(correct),
    )
