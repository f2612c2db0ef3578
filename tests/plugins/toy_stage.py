"""A CAI stage from outside jaxcai, for `tests/test_cai_stages.py`: it needs the critique
stage's SFT data and counts its examples. Importing this module registers it; a run
picks it up with `plugins=[toy_stage]` (this directory on the Python path)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxcai.cai import io
from jaxcai.cai.context import RunContext
from jaxcai.cai.stages import Stage, register
from jaxcai.data.training import open_dataset


@dataclasses.dataclass
class CountExamples(Stage):
    """The number of SFT examples the critique stage made (`toy_count/count.json`)."""

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        data = open_dataset(inputs["critique"], "sft", key="inputs.critique")
        stats = {"examples": sum(1 for _ in data.records("train"))}
        path = context.stage_dir(self.name) / "count.json"
        io.write_json(path, stats)
        return str(path), stats


TOY = register(CountExamples("toy_count", needs=("critique",), produces="results"))
