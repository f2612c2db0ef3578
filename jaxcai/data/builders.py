"""TFDS builders for the four dataset kinds, reading local files only.

`prepare(kind, inputs, output)` turns JSONL or hh-rlhf files into a TFDS dataset of
array_record files in `output` (readable with `tfds.data_source`, no TensorFlow needed);
`load(spec)` opens one for reading. Records keep their file order, so example `i` is the
`i`-th valid record. The dataset's metadata (`metadata.json`) records the kind, the
input files with their SHA-256, how many records were skipped and why, the jaxcai
version, and any provenance the caller adds (the CAI pipeline adds its settings).

    from jaxcai.data import builders
    builders.prepare("preference", "hh/train.jsonl", "data/hh", fmt="hh")
    ds = builders.load("data/hh")
    ds.source("train")[0]   # {"prompt": b"...", "chosen": b"...", ...}
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

import jaxcai
from jaxcai.data.records import (
    FORMATS,
    KINDS,
    DataError,
    conversation_text,
    describe_counts,
    expand_inputs,
    read_records,
)
from jaxcai.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLED",
    "PreparedDataset",
    "bundled_path",
    "cache_dir",
    "load",
    "prepare",
]

DATA_VERSION = "1.0.0"
# Files shipped in `jaxcai/data/files/` and the kind each one holds.
BUNDLED = {
    "sft.jsonl": "sft",
    "preferences.jsonl": "preference",
    "pretrain.jsonl": "text",
    "red_team_prompts.jsonl": "prompts",
    "helpful_prompts.jsonl": "prompts",
}


def _features(kind: str) -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    spec: dict[str, Any] = {
        "text": {"text": text()},
        "prompts": {
            "prompt": text(),
            "tags": tfds.features.Sequence(text()),
            "metadata": text(),  # JSON object
        },
        "sft": {"prompt": text(), "response": text(), "metadata": text()},
        "preference": {
            "prompt": text(),
            "chosen": text(),
            "rejected": text(),
            "p_chosen": np.float32,
            "metadata": text(),
        },
    }[kind]
    spec["source"] = text()  # file:line of the record
    return tfds.features.FeaturesDict(spec)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _token_count(tok: Tokenizer, kind: str, record: dict[str, Any]) -> int:
    """Tokens of the longest sequence a record becomes (bos and eos included)."""
    if kind == "text":
        return len(tok.encode(record["text"])) + 2
    if kind == "prompts":
        return len(tok.encode(record["prompt"] + "\n\nAssistant:")) + 1
    responses = [record["response"]] if kind == "sft" else [record["chosen"], record["rejected"]]
    return max(len(tok.encode(conversation_text(record["prompt"], r))) + 2 for r in responses)


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a dataset of `KIND` from local files (no downloads ever happen)."""

    KIND = ""
    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {DATA_VERSION: "jaxcai dataset layout 1"}

    def __init__(
        self,
        *,
        splits: Mapping[str, str | Sequence[str]] | None = None,
        fmt: str = "jsonl",
        fields: Mapping[str, str] | None = None,
        skip_invalid: bool = False,
        max_tokens: int | None = None,
        tokenizer: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        self._splits = dict(splits or {})
        self._fmt = fmt
        self._fields = dict(fields or {})
        self._skip_invalid = skip_invalid
        self._max_tokens = max_tokens
        self._tokenizer = tokenizer
        self._provenance = dict(provenance or {})
        super().__init__(**kwargs)

    # TFDS prints download sizes and the temporary directory; nothing is downloaded here
    # and `prepare` reports the final directory itself.
    def _log_download_bytes(self) -> None:
        log.info("preparing a %s dataset from %s", self.KIND, self._splits)

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"jaxcai {self.KIND} dataset prepared from local files.",
            features=_features(self.KIND),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # example i is the i-th valid record
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        meta = self.info.metadata
        meta.update(
            kind=self.KIND,
            format=self._fmt,
            fields=self._fields,
            skip_invalid=self._skip_invalid,
            max_tokens=self._max_tokens,
            tokenizer=self._tokenizer,
            jaxcai_version=jaxcai.__version__,
            inputs={},
            skipped={},
            provenance=self._provenance,
        )
        return {name: self._generate_examples(name, files) for name, files in self._splits.items()}

    def _generate_examples(self, split: str, files: str | Sequence[str]):
        paths = expand_inputs(files)
        self.info.metadata["inputs"][split] = [
            {"path": str(p.resolve()), "sha256": _sha256(p)} for p in paths
        ]
        skipped: collections.Counter = collections.Counter()
        tok = Tokenizer.load(self._tokenizer) if self._max_tokens else None
        records = read_records(
            [str(p) for p in paths],
            self.KIND,
            self._fmt,
            fields=self._fields,
            skipped=skipped if self._skip_invalid else None,
        )
        index = 0
        for record in records:
            if tok is not None:
                n = _token_count(tok, self.KIND, record)
                if n > self._max_tokens:
                    error = DataError(
                        f"{record['source']}: {n} tokens exceed max_tokens={self._max_tokens}",
                        reason="too_long",
                    )
                    if not self._skip_invalid:
                        raise error
                    skipped[error.reason] += 1
                    continue
            for key in ("metadata",):
                if key in record:
                    record[key] = json.dumps(record[key], ensure_ascii=False, sort_keys=True)
            yield index, record
            index += 1
        self.info.metadata["skipped"][split] = dict(sorted(skipped.items()))
        if skipped:
            log.warning(
                "%s split %r: skipped %d invalid records (%s)",
                self.KIND,
                split,
                sum(skipped.values()),
                describe_counts(skipped),
            )
        if index == 0:
            raise DataError(
                f"split {split!r}: no usable records in {', '.join(map(str, paths))}",
                reason="empty",
            )


class JaxcaiText(_LocalFilesBuilder):
    """Raw documents for the `lm` objective."""

    KIND = "text"


class JaxcaiPrompts(_LocalFilesBuilder):
    """Prompts for sampling (the CAI pipeline's red-team and helpfulness sets)."""

    KIND = "prompts"


class JaxcaiSft(_LocalFilesBuilder):
    """Conversations whose final Assistant turn is learned."""

    KIND = "sft"


class JaxcaiPreference(_LocalFilesBuilder):
    """Prompt, chosen and rejected responses, an optional soft label `p_chosen`."""

    KIND = "preference"


BUILDERS: dict[str, type[_LocalFilesBuilder]] = {
    b.KIND: b for b in (JaxcaiText, JaxcaiPrompts, JaxcaiSft, JaxcaiPreference)
}


@dataclasses.dataclass
class PreparedDataset:
    """A prepared dataset on disk: its kind, metadata, and random-access split sources."""

    path: Path
    builder: Any  # tfds.core.ReadOnlyBuilder

    @property
    def kind(self) -> str:
        return self.builder.info.metadata["kind"]

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.builder.info.metadata)

    @property
    def splits(self) -> list[str]:
        return sorted(self.builder.info.splits.keys())

    def num_examples(self, split: str = "train") -> int:
        return self.builder.info.splits[split].num_examples

    def source(self, split: str = "train"):
        """A random-access data source (`len`, `[i]`, pickles to worker processes)."""
        if split not in self.builder.info.splits:
            raise DataError(f"{self.path}: no split {split!r} (splits: {self.splits})")
        return self.builder.as_data_source(split=split)

    def records(self, split: str = "train") -> Iterator[dict[str, Any]]:
        """Decoded records in order (text as `str`, metadata as a dict)."""
        src = self.source(split)
        for i in range(len(src)):
            yield decode_record(src[i])


def decode_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes -> str, JSON metadata -> dict, arrays -> lists, as stored by `prepare`."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, list | np.ndarray) and key == "tags":
            value = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
        elif isinstance(value, np.floating):
            value = float(value)
        out[key] = value
    if "metadata" in out:
        out["metadata"] = json.loads(out["metadata"])
    return out


def prepare(
    kind: str,
    inputs: str | Sequence[str],
    output: str | os.PathLike,
    *,
    fmt: str = "jsonl",
    eval_inputs: str | Sequence[str] | None = None,
    fields: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    max_tokens: int | None = None,
    tokenizer: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> PreparedDataset:
    """Build a `kind` dataset from local `inputs` (path, glob or list) into `output`.

    `eval_inputs` become an `eval` split beside `train`. With `max_tokens`, a record
    longer than that under `tokenizer` is an error (or a counted skip). The dataset is
    written to a temporary directory and moved into place when complete.
    """
    if kind not in KINDS:
        raise DataError(f"kind={kind!r}: choose one of {KINDS}")
    if fmt not in FORMATS:
        raise DataError(f"format={fmt!r}: choose one of {FORMATS}")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"max_tokens={max_tokens}: must be at least 2")
    output = Path(output).expanduser().absolute()
    if (output / "dataset_info.json").exists() and not overwrite:
        raise DataError(f"{output} already holds a dataset (pass overwrite=true to replace it)")
    if output.exists() and any(output.iterdir()) and not (output / "dataset_info.json").exists():
        raise DataError(f"{output} exists and is not a dataset directory; choose another output")
    splits = {"train": inputs}
    if eval_inputs:
        splits["eval"] = eval_inputs
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        builder = BUILDERS[kind](
            data_dir=str(tmp),
            file_format="array_record",
            splits=splits,
            fmt=fmt,
            fields=fields,
            skip_invalid=skip_invalid,
            max_tokens=max_tokens,
            tokenizer=tokenizer,
            provenance=provenance,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
            )
        )
        built = Path(builder.data_dir)
        if overwrite and output.exists():
            shutil.rmtree(output)
        elif output.exists() and not any(output.iterdir()):
            output.rmdir()
        try:
            os.replace(built, output)
        except OSError:
            # Another process (a second host, say) prepared the same cache entry first.
            if not (output / "dataset_info.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load(output)


def load(spec: str | os.PathLike) -> PreparedDataset:
    """Open a prepared dataset directory (or `bundled:NAME`, prepared on first use)."""
    if str(spec).startswith("bundled:"):
        return _bundled(str(spec).split(":", 1)[1])
    path = Path(spec).expanduser().absolute()
    if not (path / "dataset_info.json").exists():
        if path.is_file():
            raise DataError(
                f"{path} is a file, not a prepared dataset; prepare it with "
                f"`jaxcai-data kind=... input={path} output=DIR`"
            )
        raise DataError(f"{path}: no prepared dataset here (dataset_info.json is missing)")
    try:
        builder = tfds.builder_from_directory(str(path))
    except Exception as e:  # tfds raises several types for damaged metadata
        raise DataError(f"{path}: unreadable dataset metadata ({e})") from e
    if builder.info.metadata is None or builder.info.metadata.get("kind") not in KINDS:
        raise DataError(f"{path}: not a jaxcai dataset (metadata.json has no kind)")
    return PreparedDataset(path, builder)


def cache_dir() -> Path:
    """Where prepared copies of bundled and raw files live (`$JAXCAI_CACHE` overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jaxcai"
    return Path(os.environ.get("JAXCAI_CACHE", default)).expanduser() / "datasets"


def bundled_path(name: str) -> Path:
    """A file shipped in `jaxcai/data/files/`."""
    if name not in BUNDLED:
        raise DataError(f"bundled:{name}: no such bundled file (choose one of {sorted(BUNDLED)})")
    return Path(str(resources.files("jaxcai") / "data" / "files" / name))


def prepare_cached(
    kind: str, inputs: str | Sequence[str], *, fmt: str = "jsonl", skip_invalid: bool = False
) -> PreparedDataset:
    """Prepare raw files once into the cache, keyed by their content and the options."""
    paths = expand_inputs(inputs)
    key = hashlib.sha256(
        json.dumps(
            [DATA_VERSION, kind, fmt, skip_invalid, [(str(p.resolve()), _sha256(p)) for p in paths]]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{paths[0].stem}-{kind}-{key}"
    if (target / "dataset_info.json").exists():
        try:
            return load(target)
        except DataError:
            log.warning("%s: damaged cached dataset, preparing it again", target)
            shutil.rmtree(target, ignore_errors=True)
    try:
        return prepare(kind, [str(p) for p in paths], target, fmt=fmt, skip_invalid=skip_invalid)
    except DataError:
        if (target / "dataset_info.json").exists():  # prepared meanwhile by another process
            return load(target)
        raise


def _bundled(name: str) -> PreparedDataset:
    path = bundled_path(name)
    return prepare_cached(BUNDLED[name], str(path))
