"""A training run's data from its `data` config: datasets, splits, iterators, eval rows.

`training_data(cfg.data, objective, tok, seed)` opens the train and eval datasets (a
prepared directory, `bundled:NAME`, or a raw JSONL file prepared once into the cache),
checks their kind against the objective, holds out an eval split when none is given, and
with `data.truncate=false` checks every example's length up front (an error naming
`file:line`, or a counted skip with `data.skip_invalid=true`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxcai.chat import ChatFormat
from jaxcai.data import builders
from jaxcai.data.pipeline import IndexedSource, Layout, encode_example, train_iterator
from jaxcai.data.records import DataError, describe_counts
from jaxcai.data.rows import ArrayRows, MapRows, eval_rows
from jaxcai.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["TrainData", "open_dataset", "training_data"]


def open_dataset(
    spec: str, kind: str, *, fmt: str = "jsonl", skip_invalid: bool = False, key: str = "data"
) -> builders.PreparedDataset:
    """A prepared dataset of `kind` named by `spec` (directory, `bundled:NAME`, raw file)."""
    path = Path(spec).expanduser()
    if not spec.startswith("bundled:") and path.is_file():
        ds = builders.prepare_cached(kind, str(path), fmt=fmt, skip_invalid=skip_invalid)
    else:
        ds = builders.load(spec)
    if ds.kind != kind:
        raise DataError(f"{key}={spec!r} holds a {ds.kind!r} dataset; this run needs {kind!r}")
    _report_skips(ds, spec)
    return ds


def _report_skips(ds: builders.PreparedDataset, spec: str) -> None:
    for split, counts in (ds.metadata.get("skipped") or {}).items():
        if counts:
            log.warning(
                "%s (%s): %d invalid records were skipped when it was prepared (%s)",
                spec,
                split,
                sum(counts.values()),
                describe_counts(counts),
            )


@dataclasses.dataclass
class TrainData:
    """The train and eval views of a run, and how their rows are laid out."""

    train: IndexedSource
    eval: IndexedSource
    layout: Layout
    tok: Tokenizer | ChatFormat  # a bare tokenizer means the Human/Assistant transcript
    skipped: collections.Counter  # examples left out at load time, by reason

    def iterator(self, **options: Any):
        """This data shard's endless, checkpointable batch iterator: `train_iterator`
        over the train split, with its keyword options (`rows_per_batch`, `seed`,
        `shard_index`, `shard_count`, `shuffle`, `workers`, `read_threads`, `ref`)."""
        return train_iterator(self.train, self.tok, self.layout, **options)

    def rows(self, split: str) -> MapRows:
        """Random-access `max_len` rows of a split (for reference log-probs)."""
        fixed = dataclasses.replace(self.layout, pad="fixed", pack=False)
        return MapRows(getattr(self, split), self.tok, fixed)

    def eval_rows(self, ref: dict[str, np.ndarray] | None = None) -> ArrayRows:
        return eval_rows(self.eval, self.tok, self.layout, ref)


def _length_check(
    source: IndexedSource,
    tok: Tokenizer | ChatFormat,
    layout: Layout,
    skip: bool,
    skipped: collections.Counter,
) -> IndexedSource:
    """With `truncate=false`: every example must fit `max_len` (or is skipped, counted)."""
    keep = []
    for i in range(len(source)):
        try:
            encode_example(source[i], tok, layout)
            keep.append(i)
        except DataError as e:
            if not skip:
                raise
            skipped[e.reason] += 1
    if not keep:
        raise DataError(f"{source!r}: no example fits data.max_len={layout.max_len}")
    if len(keep) == len(source):
        return source
    base = source.indices if source.indices is not None else np.arange(len(source))
    return IndexedSource(source.source, base[np.asarray(keep)], source.origin)


def training_data(cfg: Any, objective: Any, tok: Tokenizer | ChatFormat, seed: int) -> TrainData:
    """Open and split the datasets a `data` config names, for an objective (its name or
    its `jaxcai.objectives.Objective` record, whose `data_kind` says what to open)."""
    if isinstance(objective, str):
        from jaxcai import objectives  # the objective layer sits above the data layer

        objective = objectives.get(objective)
    kind = objective.data_kind
    layout = Layout(
        kind=kind,
        max_len=cfg.max_len,
        max_prompt_len=cfg.get("max_prompt_len"),
        truncate=cfg.get("truncate", True),
        pack=cfg.get("pack", True),
        pad=cfg.get("pad", "fixed"),
        buckets=tuple(cfg.get("buckets") or ()),
        pack_pairs=cfg.get("pack_pairs", False),
    )
    opts = {"fmt": cfg.get("format", "jsonl"), "skip_invalid": cfg.skip_invalid}
    train_ds = open_dataset(cfg.train, kind, key="data.train", **opts)
    train = IndexedSource(train_ds.source("train"), origin=f"{train_ds.path}:train")
    if cfg.eval:
        eval_ds = open_dataset(cfg.eval, kind, key="data.eval", **opts)
        split = "eval" if "eval" in eval_ds.splits else "train"
        evaluation = IndexedSource(eval_ds.source(split), origin=f"{eval_ds.path}:{split}")
    elif "eval" in train_ds.splits:
        evaluation = IndexedSource(train_ds.source("eval"), origin=f"{train_ds.path}:eval")
    else:
        n = len(train)
        n_eval = max(1, int(round(n * cfg.eval_fraction)))
        if n_eval >= n:
            raise DataError(
                f"data.train={cfg.train!r}: {n} examples are too few to hold out "
                f"data.eval_fraction={cfg.eval_fraction}"
            )
        order = np.random.default_rng(seed).permutation(n)
        evaluation = IndexedSource(train.source, np.sort(order[:n_eval]), train.origin)
        train = IndexedSource(train.source, np.sort(order[n_eval:]), train.origin)
    skipped: collections.Counter = collections.Counter()
    if not layout.truncate and kind != "text":
        train = _length_check(train, tok, layout, cfg.skip_invalid, skipped)
        evaluation = _length_check(evaluation, tok, layout, cfg.skip_invalid, skipped)
        if skipped:
            log.warning(
                "skipped %d examples that do not fit data.max_len=%d (%s)",
                sum(skipped.values()),
                layout.max_len,
                describe_counts(skipped),
            )
    return TrainData(train, evaluation, layout, tok, skipped)
