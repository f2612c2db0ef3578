"""A CAI stage's declaration and the registry the runner reads.

A stage is an object with a `name`, the stages whose outputs it `needs` (it cannot run
without them), those it `uses` when they are there (it runs after them), what it
`produces` (`model`, `dataset` or `results`) and `run(context, inputs) -> (path, stats)`,
where `inputs` maps each needed or used stage that has an output to its path. A module
registers its stages with `register` as it is imported; the runner orders them from
these declarations alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxcai.cai.context import RunContext

__all__ = [
    "PRODUCTS",
    "PipelineError",
    "Stage",
    "get",
    "order",
    "register",
    "registered",
    "runnable",
]

PRODUCTS = ("model", "dataset", "results")


class PipelineError(RuntimeError):
    """A stage cannot run: a missing input, an empty dataset, ..."""


@dataclasses.dataclass
class Stage:
    """A stage's declaration; subclasses implement `run`."""

    name: str
    needs: tuple[str, ...] = ()
    produces: str = "results"
    uses: tuple[str, ...] = ()  # optional inputs: read when present, always ordered first
    samples: bool = False  # samples text (spread over the processes: `sampling.placement`)
    always: bool = False  # runs in every pipeline (the initial policy), never handed in

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """Do the stage's work in `context.stage_dir(self.name)`; return the path of its
        output and its stats."""
        raise NotImplementedError(f"stage {self.name} has no run()")


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to the registry (at import of the module that defines it)."""
    if not isinstance(stage, Stage):
        raise TypeError(f"register() takes a Stage, got {type(stage).__name__}")
    if not stage.name or not stage.name.isidentifier():
        raise PipelineError(f"stage name {stage.name!r}: use a Python identifier")
    if stage.produces not in PRODUCTS:
        raise PipelineError(
            f"stage {stage.name} produces {stage.produces!r}: choose one of {PRODUCTS}"
        )
    old = _REGISTRY.get(stage.name)
    if old is not None and type(old) is not type(stage):
        raise PipelineError(
            f"stage {stage.name} is registered twice ({type(old).__qualname__} and "
            f"{type(stage).__qualname__})"
        )
    _REGISTRY[stage.name] = stage
    return stage


def registered() -> list[Stage]:
    """Every registered stage, in registration order."""
    return list(_REGISTRY.values())


def get(name: str) -> Stage:
    """The registered stage `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(f"no stage {name!r}; stages are {tuple(_REGISTRY)}") from None


def order(stages: Iterable[Stage] | None = None) -> list[Stage]:
    """The stages in an order where each comes after every stage it needs or uses
    (among those given); ties keep registration order. A cycle is a `PipelineError`."""
    stages = registered() if stages is None else list(stages)
    names = {s.name for s in stages}
    for s in stages:
        unknown = [n for n in s.needs if n not in _REGISTRY]
        if unknown:
            raise PipelineError(f"stage {s.name} needs unknown stages {unknown}")
    after = {s.name: {n for n in (*s.needs, *s.uses) if n in names} for s in stages}
    done: list[Stage] = []
    left = list(stages)
    while left:
        ready = next((s for s in left if after[s.name] <= {d.name for d in done}), None)
        if ready is None:
            raise PipelineError(f"stages {[s.name for s in left]} need each other (a cycle)")
        done.append(ready)
        left.remove(ready)
    return done


def runnable() -> tuple[str, ...]:
    """The names `stages=` may list: every registered stage but those that always run,
    in run order."""
    return tuple(s.name for s in order() if not s.always)
