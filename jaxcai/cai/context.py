"""What every stage of a CAI run shares: the config, the run directory, the chat
formats, the constitution, the prompt split, the mesh and the outputs so far.

In a multi-process launch the sampling mesh is this process's devices
(`sampling.placement=replicated`: `spread` hands each process its share of the prompts
and gathers the results in prompt order) or every process's (`sharded`: all processes
run every prompt's program together). Either way the gathered texts are those of a
one-process run, and only process 0 writes files."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig

from jaxcai.cai import io
from jaxcai.cai import provenance as prov
from jaxcai.cai.constitution import Constitution
from jaxcai.cai.critique import SamplingSettings
from jaxcai.cai.feedback import FeedbackSettings, ModelJudge
from jaxcai.chat import ChatFormat
from jaxcai.distributed import gather, share, spans_processes
from jaxcai.load import load_model
from jaxcai.sample import SAMPLING_RULES

__all__ = ["RunContext"]


@dataclasses.dataclass
class RunContext:
    """The run a stage belongs to (`run(context, inputs)` receives it)."""

    cfg: DictConfig
    run_dir: Path
    chat: ChatFormat  # the policy's tokenizer and chat format (all policies share them)
    feedback_chat: ChatFormat  # the feedback model's (its own checkpoint's by default)
    constitution: Constitution
    prompts: dict[str, dict[str, list[str]]]  # set -> {"train", "eval"} -> prompts
    prompt_sources: dict[str, Any]
    mesh: Any
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> path
    _models: dict[str, tuple] = dataclasses.field(default_factory=dict)

    @property
    def progress(self) -> bool:
        """Whether to show progress bars (asked for, and this is process 0)."""
        return bool(self.cfg.progress) and jax.process_index() == 0

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (process 0)."""
        return jax.process_index() == 0

    def spread(self, work: Callable[[int, int], list[Any]], lo: int, hi: int) -> list[Any]:
        """`work(lo, hi)`'s items (JSON-able; `work` must give item `i` from the global
        index `i` alone). With a mesh of this process's devices in a multi-process launch
        (`sampling.placement=replicated`), each process does its `share` of `[lo, hi)`
        and the items are gathered in index order; else all of it is done here."""
        if jax.process_count() == 1 or spans_processes(self.mesh):
            return work(lo, hi)
        part = share(hi - lo)
        mine = work(lo + part.start, lo + part.stop) if len(part) else []
        return gather(mine, hi - lo)

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes its files."""
        return self.run_dir / stage

    def model(self, path: str) -> tuple:
        """(config, params) of a policy or reward model, loaded once per path."""
        if path not in self._models:
            self._models.clear()  # keep at most one model in memory between stages
            numerics = {k: self.cfg.model[k] for k in ("dtype", "param_dtype")}
            self._models[path] = load_model(
                path, mesh=self.mesh, rules=SAMPLING_RULES, progress=self.progress, **numerics
            )
        return self._models[path]

    def sampling(self) -> SamplingSettings:
        """The `sampling` section as critique settings."""
        s = self.cfg.sampling
        return SamplingSettings(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            batch_size=s.batch_size,
        )

    def feedback_settings(self) -> FeedbackSettings:
        """The `feedback` section as labelling settings."""
        f = self.cfg.feedback
        return FeedbackSettings(
            principles=f.principles,
            debias=f.debias,
            cot=f.cot,
            cot_max_new_tokens=f.cot_max_new_tokens,
            few_shot=f.few_shot,
        )

    def judge(self) -> ModelJudge:
        """The feedback model (`feedback_model`, else the initial policy) as a judge."""
        path = self.cfg.feedback_model or self.outputs["initial"]
        config, params = self.model(path)
        return ModelJudge(
            config,
            params,
            self.feedback_chat,
            batch_size=self.cfg.sampling.batch_size,
            temperature=self.cfg.sampling.temperature,
            top_p=self.cfg.sampling.top_p,
            mesh=self.mesh,
        )

    def provenance(self, stage: str, **extra: Any) -> dict[str, Any]:
        """The provenance record of a stage's output (`jaxcai.cai.provenance`)."""
        chats = (self.chat, self.feedback_chat)
        return prov.provenance(
            self.cfg, self.constitution, self.prompt_sources, self.outputs, chats, stage, **extra
        )

    def write_dataset(
        self, stage: str, kind: str, filename: str, rows: list[dict[str, Any]], **extra: Any
    ) -> str:
        """`rows` as the stage's JSONL file and as a prepared `kind` dataset beside it
        (`<stage>/dataset`), its provenance recorded; returns the dataset's path."""
        from jaxcai.data import builders

        stage_dir = self.stage_dir(stage)
        if not self.writer:  # process 0 writes it; the runner waits for it
            return str((stage_dir / "dataset").expanduser().absolute())
        io.write_jsonl(stage_dir / filename, rows)
        dataset = builders.prepare(
            kind,
            str(stage_dir / filename),
            stage_dir / "dataset",
            provenance=self.provenance(stage, **extra),
            overwrite=True,
        )
        return str(dataset.path)

    def chunks(
        self, stage: str, name: str, n: int, work: Callable[[int, int], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """`work(lo, hi)` over `[0, n)` in chunks of `chunk_size`, each kept in the stage's
        `parts/` once finished, so a restarted stage does only the unfinished chunks.
        Each chunk is `spread` over the processes."""
        return io.run_chunks(
            self.stage_dir(stage) / "parts",
            name,
            n,
            int(self.cfg.chunk_size),
            lambda lo, hi: self.spread(work, lo, hi),
            desc=f"{stage}: {name}",
            progress=self.progress,
        )
