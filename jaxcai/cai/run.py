"""The runner behind `jaxcai-cai`: every registered stage in one run directory.

Stages run in the order their declarations allow (`stages.order`): a stage comes after
every stage it needs or uses. A stage whose `stage.json` exists is done and skipped, so
an interrupted run resumes by running the same command again: sampling stages keep
finished chunks of prompts (`parts/`), training stages resume from their last
checkpoint. `inputs.<stage>=PATH` hands a stage's output in from elsewhere instead of
running it. Every dataset records its provenance in its TFDS metadata, every trained
model in `provenance.json` and `MODEL_CARD.md` beside its checkpoints; `report.md`
gathers the numbers and plots. `plugins` names modules to import first: each registers
its own stages.

A multi-process launch (`distributed.enabled=true`, every process running the same
command on a shared run directory) runs every stage: the training stages as
`jaxcai-train` does, the sampling stages with each process sampling its share of the
prompts (`sampling.placement`, see `jaxcai.cai.context`); the datasets are byte for byte
those of a one-process run. Process 0 writes the files; every stage ends at a barrier.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from jaxcai import distributed
from jaxcai.cai import io, stages
from jaxcai.cai.constitution import load_constitution
from jaxcai.cai.context import RunContext
from jaxcai.cai.settings import (
    chat_formats,
    load_plugins,
    sampling_mesh,
    split_prompts,
    validate_cai,
)
from jaxcai.cai.stages import PipelineError, Stage
from jaxcai.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["run_cai", "stage_inputs"]


def stage_inputs(stage: Stage, outputs: dict[str, str]) -> dict[str, str]:
    """The outputs a stage reads: every stage it needs (a `PipelineError` naming the
    missing ones if any has no output) and those it uses that have one."""
    missing = [n for n in stage.needs if n not in outputs]
    if missing:
        raise PipelineError(
            f"stage {stage.name} needs the output of {missing}: add them to `stages` or hand "
            f"them in with inputs.<stage>=PATH"
        )
    return {n: outputs[n] for n in (*stage.needs, *stage.uses) if n in outputs}


def _given(cfg: DictConfig, stage: Stage) -> str | None:
    """The path handed in for a stage with `inputs.<stage>`, if any."""
    given = (cfg.inputs or {}).get(stage.name)
    if given and stage.always:
        raise ConfigError(f"config inputs.{stage.name}: set `policy` for the starting model")
    return str(given) if given else None


def _context(cfg: DictConfig, run_dir: Path) -> RunContext:
    """Check the config and load what every stage shares."""
    policy_chat, feedback_chat = chat_formats(cfg)  # checks the model paths too
    if jax.process_index() == 0:
        (run_dir / "cai.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    prompts, sources = split_prompts(cfg)
    mesh = sampling_mesh(cfg)
    constitution = load_constitution(cfg.cai.constitution)
    return RunContext(
        cfg, run_dir, policy_chat, feedback_chat, constitution, prompts, sources, mesh
    )


def _run_stage(context: RunContext, stage: Stage) -> dict[str, Any]:
    """Run one stage and write its record (`stage.json`)."""
    inputs = stage_inputs(stage, context.outputs)
    log.info("stage %s: running", stage.name)
    start = time.perf_counter()
    path, stats = stage.run(context, inputs)
    record = {"stage": stage.name, "outputs": {stage.produces: path}, "stats": stats}
    record["seconds"] = round(time.perf_counter() - start, 1)
    if jax.process_index() == 0:
        io.write_json(context.stage_dir(stage.name) / io.DONE, record)
    distributed.barrier(f"jaxcai-cai stage {stage.name}")  # its files are written
    return record


def run_cai(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run the pipeline's stages in order in `run_dir`, skipping finished ones; returns
    each stage's record and writes `report.md`."""
    from jaxcai.cai.report import write_report
    from jaxcai.loop import initialize_distributed

    if cfg.get("distributed"):
        initialize_distributed(cfg.distributed)  # before anything touches the devices
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    load_plugins(cfg)
    validate_cai(cfg)
    context = _context(cfg, run_dir)
    wanted = set(cfg.stages)
    records: dict[str, Any] = {}
    for stage in stages.order():
        record = distributed.broadcast(io.stage_record(run_dir, stage.name))  # process 0's
        given = _given(cfg, stage)
        if given:
            record = {"stage": stage.name, "outputs": {"given": given}, "stats": {}, "given": True}
        elif record is not None:
            log.info("stage %s: done (%s), skipped", stage.name, run_dir / stage.name / io.DONE)
        elif stage.always or stage.name in wanted:
            record = _run_stage(context, stage)
        if record is not None:
            records[stage.name] = record
            outputs = record["outputs"]
            context.outputs[stage.name] = outputs.get("given") or outputs[stage.produces]
    if jax.process_index() == 0:
        write_report(run_dir, records)
    return records
