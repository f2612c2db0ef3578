"""The run directory's files: atomic JSON/JSONL writes, stage records and resumable
chunks of work (`parts/`), so a killed stage leaves no half-written file and restarts
where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxcai.distributed import broadcast

__all__ = ["DONE", "read_jsonl", "run_chunks", "stage_record", "write_json", "write_jsonl"]

DONE = "stage.json"  # a stage is finished once its record exists


def stage_record(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """A finished stage's record (outputs, stats, provenance), or None if not done."""
    path = Path(run_dir) / stage / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: Any) -> None:
    """Write atomically: a reader never sees half a file (and a kill leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, written atomically like `write_json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_chunks(
    parts: Path,
    name: str,
    n: int,
    size: int,
    work: Callable[[int, int], list[dict[str, Any]]],
    *,
    desc: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """`work(lo, hi)` over `[0, n)` in chunks of `size`, each kept in `parts` once
    finished (by process 0), so a restart does only the chunks it had not finished. In a
    multi-process launch process 0 decides which chunks are done (`parts` must be on
    storage every process sees)."""
    rows: list[dict[str, Any]] = []
    for lo in tqdm(range(0, n, size), desc=desc, unit="chunk", disable=not progress):
        path = parts / f"{name}-c{size}-{lo:07d}.jsonl"
        if broadcast(path.is_file()):
            rows += read_jsonl(path)
            continue
        chunk = work(lo, min(n, lo + size))
        if jax.process_index() == 0:
            write_jsonl(path, chunk)
        rows += chunk
    return rows
