"""The Constitutional AI pipeline behind `jaxcai-cai` (the public names, kept here).

The pipeline is a graph of stage modules (`jaxcai.cai.stages`), run by
`jaxcai.cai.run.run_cai`; see those modules. This module re-exports what callers import.
"""

from __future__ import annotations

from jaxcai.cai.io import DONE, stage_record
from jaxcai.cai.run import run_cai
from jaxcai.cai.settings import validate_cai
from jaxcai.cai.stages import STAGES, PipelineError, train_config

__all__ = [
    "DONE",
    "STAGES",
    "PipelineError",
    "run_cai",
    "stage_record",
    "train_config",
    "validate_cai",
]
