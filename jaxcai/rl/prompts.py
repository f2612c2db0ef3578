"""Online RL's prompts and the position of a run in them, as one checkpointable state.

`open_prompts` reads a `prompts` dataset (a prepared directory, `bundled:NAME` or a raw
JSONL file of `{"prompt": ...}` lines); another kind is an error naming `data.train`.
`RolloutState` is what a checkpoint must hold for a resumed run to go on exactly: how
far the run is in the prompt stream (each pass a fresh seeded order), how many rollouts
it sampled, and the current rollout's rows with the position of the next update in them.
It has the `get_state` / `set_state` of a grain iterator, so the run's checkpoint saves it
where it saves a data pipeline's position (one file per process).
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

from jaxcai import streams
from jaxcai.data.records import DataError

__all__ = ["RolloutState", "open_prompts"]


def open_prompts(spec: str, *, fmt: str = "jsonl", key: str = "data.train") -> list[str]:
    """The prompt transcripts of a `prompts` dataset's train split."""
    from jaxcai.data.training import open_dataset

    ds = open_dataset(spec, "prompts", fmt=fmt, key=key)
    source = ds.source("train")
    prompts = []
    for i in range(len(source)):
        value = source[i]["prompt"]
        prompts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    if not prompts:
        raise DataError(f"{key}={spec!r} holds no prompts")
    return prompts


def _pack(arrays: dict[str, Any]) -> str:
    """Nested dicts of arrays as base64 `.npz` text (keys joined with `/`)."""
    flat = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for k, v in tree.items():
            walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat.setdefault(prefix + k, v)

    walk(arrays, "")
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _unpack(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as f:
        for key in f.files:
            *parents, name = key.split("/")
            node = out
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = f[key]
    return out


class RolloutState:
    """The prompt stream's position, the rollout count and the current rollout buffer."""

    def __init__(self, n_prompts: int, seed: int, shuffle: bool):
        self.n, self.shuffle = n_prompts, shuffle
        self.base = streams.seed("rl.rollouts", seed)
        self.position = 0  # prompts taken so far (all passes)
        self.rollout = 0  # rollouts sampled so far
        self.buffer: dict[str, np.ndarray] = {}  # the current rollout's update rows
        self.order: list[list[int]] = []  # row indices of each update of the rollout
        self.cursor = 0  # updates of the rollout done

    def take(self, count: int) -> list[int]:
        """The next `count` prompt indices; each pass over the prompts has its own order."""
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.position, self.n)
            perm = (
                streams.rng("rl.prompts", self.base, epoch).permutation(self.n)
                if self.shuffle
                else np.arange(self.n)
            )
            out.append(int(perm[offset]))
            self.position += 1
        return out

    def sample_seeds(self, count: int) -> list[int]:
        """Sampling seeds of the current rollout's `count` prompts."""
        return [streams.draw_seed("rl.samples", self.base, self.rollout, i) for i in range(count)]

    def plan(self, rows: int, per_update: int, epochs: int) -> None:
        """Each epoch a fresh seeded order of the rollout's rows, in updates of `per_update`."""
        self.order, self.cursor = [], 0
        for epoch in range(epochs):
            perm = streams.rng("rl.minibatches", self.base, self.rollout, epoch).permutation(rows)
            self.order += [perm[i : i + per_update].tolist() for i in range(0, rows, per_update)]

    @property
    def exhausted(self) -> bool:
        return self.cursor >= len(self.order)

    # the grain iterator protocol the checkpoint handler uses
    def get_state(self) -> bytes:
        state: dict[str, Any] = {"position": self.position, "rollout": self.rollout,
                                 "cursor": self.cursor, "order": self.order}  # fmt: skip
        if not self.exhausted:
            state["buffer"] = _pack(self.buffer)
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        values = json.loads(state.decode())
        self.position, self.rollout = values["position"], values["rollout"]
        self.cursor, self.order = values["cursor"], values["order"]
        self.buffer = _unpack(values["buffer"]) if "buffer" in values else {}

    def start_prefetch(self) -> None:
        """Nothing runs ahead: rollouts are sampled when the run needs them."""

    def close(self) -> None:
        self.buffer = {}
